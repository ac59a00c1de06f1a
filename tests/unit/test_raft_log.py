"""A leader's re-send of entries a follower already holds must delete none of them.

Real SiteRaft instances (meshd's own pysyncobj conf, encrypted TCP on loopback) in one
thread, each ticked by the test: a member the test does not tick is a stopped process. The
network is the real one except for a shim on each member's transport that can hold back
(delay) or drop (lose with a broken connection) its outgoing messages per destination.
Elections happen only when the test makes a member's election deadline pass (the timeouts
are set far beyond the test's length), so every step happens in the order written.

The sequence that pysyncobj's follower code turns into a lost command (see the module
header of meshd/io/raft.py):
1. b misses two entries (lost on a broken connection) while c takes them; from then on a's
   messages to c are held back, so c lags.
2. b rejects two append-entries that a sent past b's log (two "reset" answers in flight).
   a takes the first, re-sends from b's gap; b appends, a commits with b (a and b are the
   majority), and b applies everything.
3. a takes the second reset and re-sends the same entries again, in two messages (the
   commands are large: two per message). Only the first reaches b before a stops.
   pysyncobj deletes everything after b's gap ("truncating already-applied log entries"),
   leaving b with fewer entries than it acknowledged.
4. With a stopped, c and b hold elections; c lacks the entries committed in step 2, and b's
   shortened log no longer outranks c's, so c can win and overwrite them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict

import pytest
from pysyncobj import FAIL_REASON

from meshd import commands as cmds
from meshd.io.ports import free_port
from meshd.io.raft import SiteRaft, make_conf
from meshd.io.snapshots import SnapshotStore

NAMES = ("a", "b", "c")
# Far beyond the test's length: no member starts an election unless the test says so.
ELECTION_TIMEOUT = 30.0
# pysyncobj's heartbeat period; short, so that the steps that wait for a send are quick.
APPEND_PERIOD = 0.05
# Each command is padded past half of pysyncobj's 64 KiB append-entries batch
# (appendEntriesBatchSizeBytes), so a message carries two entries and a re-send of four is
# two messages, the shape of a re-send of a few large plans or reports.
PAD = 40_000
# Upper bound of any one wait in the sequence (each takes a few ticks on an idle machine).
STEP_TIMEOUT = 10.0


class Truncations(logging.Handler):
    """Counts pysyncobj's 'truncating already-applied log entries' lines."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def emit(self, record):
        if "truncating already-applied" in record.getMessage():
            self.count += 1


class Site:
    def __init__(self, tmp_path):
        addresses = {n: f"127.0.0.1:{free_port()}" for n in NAMES}
        self.name_of = {a: n for n, a in addresses.items()}
        self.applications = {n: Counter() for n in NAMES}  # request id -> times applied
        self.acknowledged: set[str] = set()  # request ids whose proposer was told SUCCESS
        self.rules: dict[tuple[str, str], str] = {}  # (from, to) -> "hold" | "drop"
        self.held: dict[tuple[str, str], list] = defaultdict(list)
        self.nodes: dict[str, SiteRaft] = {}
        self.seq = 0
        for n in NAMES:
            store = SnapshotStore()
            conf = make_conf(data_dir=tmp_path / n, password="site secret", bind_address=addresses[n],
                             min_timeout=ELECTION_TIMEOUT, max_timeout=ELECTION_TIMEOUT + 1,
                             append_period=APPEND_PERIOD, snapshots=store)
            self.nodes[n] = SiteRaft(addresses[n], [addresses[m] for m in NAMES if m != n], conf,
                                     self._hook(n), lambda: None, store)
            self._shim(n)

    def _hook(self, name):
        def on_applied(command, result):
            self.applications[name][command.get("request_id")] += 1
        return on_applied

    def _shim(self, name):
        transport = self.nodes[name]._SyncObj__transport
        send = transport.send

        def shimmed(node, message):
            to = self.name_of.get(getattr(node, "address", None))
            rule = self.rules.get((name, to))
            if rule == "drop":
                return True
            if rule == "hold":
                self.held[(name, to)].append((send, node, message))
                return True
            return send(node, message)

        transport.send = shimmed

    def release(self, frm, to, count=None, where=lambda message: True):
        """Send on the held messages (the first `count` of those `where` picks), in order."""
        queue, kept, sent = self.held[(frm, to)], [], 0
        for send, node, message in queue:
            if (count is None or sent < count) and where(message):
                send(node, message)
                sent += 1
            else:
                kept.append((send, node, message))
        self.held[(frm, to)] = kept

    def tick(self, *names):
        for n in names:
            self.nodes[n].doTick(0.002)

    def until(self, condition, *names, also=lambda: None):
        deadline = time.monotonic() + STEP_TIMEOUT
        while not condition():
            assert time.monotonic() < deadline, "a step of the sequence did not happen"
            self.tick(*names)
            also()

    def last_index(self, name):
        return self.nodes[name]._SyncObj__getCurrentLogIndex()

    def leader(self, among=NAMES):
        leaders = [n for n in among if self.nodes[n]._isLeader()]
        return leaders[0] if leaders else None

    def elect(self, name, among=NAMES):
        """`name`'s election deadline passes (its timer fires); tick until the vote is over."""
        self.nodes[name]._SyncObj__raftElectionDeadline = 0
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            self.tick(*among)

    def propose(self, on, count=1):
        for _ in range(count):
            self.seq += 1
            request_id = f"req-{self.seq}"
            wire = cmds.encode(cmds.Heartbeat(node_id="n1", seq=self.seq),
                               cmds.Envelope(ts=float(self.seq), request_id=request_id))
            wire["pad"] = "x" * PAD  # ignored by the command's reader; only makes the entry large

            def done(result, error, request_id=request_id):
                if error == FAIL_REASON.SUCCESS:
                    self.acknowledged.add(request_id)

            self.nodes[on].apply_command(wire, callback=done)

    def close(self):
        for node in self.nodes.values():
            node._doDestroy()


@pytest.fixture
def site(tmp_path):
    truncations = Truncations()
    logging.getLogger("pysyncobj").addHandler(truncations)
    s = Site(tmp_path)
    s.truncations = truncations
    try:
        s.until(lambda: all(len(node._SyncObj__connectedNodes) == 2 for node in s.nodes.values()), *NAMES)
        s.elect("a")
        assert s.leader() == "a"
        yield s
    finally:
        logging.getLogger("pysyncobj").removeHandler(truncations)
        s.close()


def _resend_to_b_twice(site):
    """Steps 1 to 3 of the module docstring; returns the index b had applied before a's
    second re-send and the messages of that re-send."""
    a, b = site.nodes["a"], site.nodes["b"]
    site.propose("a", 3)
    site.until(lambda: len(site.acknowledged) == site.seq
               and all(site.nodes[n].raftLastApplied == site.last_index("a") for n in NAMES), *NAMES)
    gap = site.last_index("b")

    site.rules[("a", "b")] = "drop"  # 1. b misses two entries
    site.propose("a", 2)
    site.until(lambda: len(site.acknowledged) == site.seq
               and site.nodes["c"].raftLastApplied == site.last_index("a") == gap + 2, "a", "c")
    site.rules[("a", "c")] = "hold"  # c lags from here on
    site.rules[("a", "b")] = None

    site.rules[("b", "a")] = "hold"  # 2. two rejections of b's gap in flight
    for _ in range(2):
        site.propose("a", 1)
        sent = len(site.held[("b", "a")])
        site.until(lambda: len(site.held[("b", "a")]) > sent, "a", "b")
    resets = lambda m: m.get("reset")  # noqa: E731
    assert sum(1 for _, _, m in site.held[("b", "a")] if resets(m)) >= 2
    site.release("b", "a", 1, where=resets)
    site.until(lambda: site.last_index("b") == site.last_index("a"), "a", "b")

    def answer_with_successes():
        site.release("b", "a", where=lambda m: m.get("success"))

    site.until(lambda: b.raftLastApplied == site.last_index("a") and a.raftLastApplied == site.last_index("a"),
               "a", "b", also=answer_with_successes)
    applied_by_b = b.raftLastApplied

    site.rules[("a", "b")] = "hold"  # 3. the second re-send: only its first message gets through
    site.rules[("b", "a")] = None
    site.release("b", "a")
    first = lambda m: m.get("prevLogIdx") == gap  # noqa: E731
    site.until(lambda: any(first(m) for _, _, m in site.held[("a", "b")]), "a")
    resend = [m for _, _, m in site.held[("a", "b")] if m.get("prevLogIdx", -1) >= gap]
    position = next(i for i, (_, _, m) in enumerate(site.held[("a", "b")]) if first(m))
    site.release("a", "b", position + 1)
    for _ in range(20):
        site.tick("b")
    return applied_by_b, resend


def test_a_second_resend_of_held_entries_deletes_none_of_them(site):
    """A duplicate re-send (both of a follower's rejections answered) leaves its log whole:
    pysyncobj's "truncating already-applied log entries" never fires and every member ends
    with the same state, each command applied once."""
    applied_by_b, resend = _resend_to_b_twice(site)
    assert len(resend) >= 2, "the re-send came in one message; the sequence needs two"
    assert site.last_index("b") >= applied_by_b, "b deleted entries it had applied"
    assert site.truncations.count == 0

    site.rules = {}
    site.release("a", "b")
    site.release("a", "c")
    site.propose("a", 2)
    site.until(lambda: all(site.nodes[n].raftLastApplied == site.last_index("a") for n in NAMES)
               and len(site.acknowledged) == site.seq, *NAMES)
    _assert_one_history(site)


def test_an_election_during_a_stalled_resend_loses_no_committed_command(site):
    """The leader stops between the two messages of its second re-send; the others elect a
    new leader, which takes more commands; the old leader comes back. Every command that was
    acknowledged is applied on every member, exactly once, and the members agree."""
    _resend_to_b_twice(site)
    acknowledged_before = set(site.acknowledged)
    assert len(acknowledged_before) == 7

    site.rules[("a", "b")] = site.rules[("a", "c")] = "drop"  # a stops, its unsent messages with it
    site.held[("a", "b")].clear()
    site.held[("a", "c")].clear()
    for candidate in ("c", "b", "c", "b"):  # the first timers to fire, then the next ones
        site.elect(candidate, among=("b", "c"))
        if site.leader(("b", "c")):
            break
    new_leader = site.leader(("b", "c"))
    assert new_leader is not None
    site.propose(new_leader, 4)
    site.until(lambda: site.nodes[new_leader].raftLastApplied == site.last_index(new_leader), "b", "c")

    site.rules = {}  # a comes back
    site.until(lambda: all(site.nodes[n].raftLastApplied == site.last_index(new_leader) for n in NAMES)
               and len(site.acknowledged) == site.seq, *NAMES)
    _assert_one_history(site)
    assert acknowledged_before <= set(site.nodes["c"].site_state.applied_order)
    assert site.truncations.count == 0


def _assert_one_history(site):
    states = {n: site.nodes[n].site_state for n in NAMES}
    orders = {n: list(s.applied_order) for n, s in states.items()}
    assert orders["a"] == orders["b"] == orders["c"], orders
    assert len({s.applied for s in states.values()}) == 1
    assert len({s.last_ts for s in states.values()}) == 1
    for n in NAMES:
        assert set(site.applications[n]) == set(orders[n]) == site.acknowledged
        assert set(site.applications[n].values()) == {1}, (n, site.applications[n])
