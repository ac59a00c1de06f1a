"""meshd.io.raft's transport: the leader's idle heartbeats to non-voters are thinned, and
nothing else is.

Real SiteRaft instances (meshd's own pysyncobj conf, encrypted TCP on loopback): two voters
and one non-voter (a pysyncobj readonly node), all ticked by the test in one thread. Each
member counts the append-entries messages it receives, by sender.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import trio
from pysyncobj import FAIL_REASON
from pysyncobj.monotonic import monotonic as raft_clock

from meshd import commands as cmds
from meshd.io import raft as raft_module
from meshd.io.raft import RaftNode, SiteRaft, make_conf
from meshd.io import snapshots
from meshd.io.ports import free_port
from meshd.io.snapshots import SnapshotStore

# Far beyond the test's length: the leader is the one the test elects.
ELECTION_TIMEOUT = 30.0
APPEND_PERIOD = 0.05  # pysyncobj's heartbeat period: 20 a second to each voter
STEP_TIMEOUT = 10.0  # upper bound of any one wait (each takes a few ticks on an idle machine)

# The non-voter heartbeat period these tests run with: the mechanism at a third of the
# daemon's period, so that a window of three periods stays short.
NONVOTER_HEARTBEAT_PERIOD = 1.0


@pytest.fixture(autouse=True)
def _short_nonvoter_period(monkeypatch):
    monkeypatch.setattr(raft_module, "NONVOTER_HEARTBEAT_PERIOD", NONVOTER_HEARTBEAT_PERIOD)


class CountingRaft(SiteRaft):
    """A SiteRaft that counts the append-entries messages it receives."""

    def __init__(self, *args, **kwargs):
        self.append_entries = Counter()  # "heartbeat" | "entries"
        super().__init__(*args, **kwargs)

    def _SyncObj__onMessageReceived(self, node, message):
        if isinstance(message, dict) and message.get("type") == "append_entries":
            self.append_entries["entries" if message.get("entries") else "heartbeat"] += 1
        super()._SyncObj__onMessageReceived(node, message)


class Site:
    def __init__(self, tmp_path):
        voters = {n: f"127.0.0.1:{free_port('127.0.0.1')}" for n in ("a", "b")}
        self.applied = Counter()  # member -> commands applied
        self.nodes: dict[str, CountingRaft] = {}
        for name, address in [*voters.items(), ("nonvoter", None)]:
            store = SnapshotStore()
            conf = make_conf(data_dir=tmp_path / name, password="site secret",
                             bind_address=address or "127.0.0.1:0", min_timeout=ELECTION_TIMEOUT,
                             max_timeout=ELECTION_TIMEOUT + 1, append_period=APPEND_PERIOD, snapshots=store)
            partners = [a for n, a in voters.items() if a != address]
            self.nodes[name] = CountingRaft(address, partners, conf, self._hook(name), lambda: None, store)
        self.seq = 0

    def _hook(self, name):
        def on_applied(command, result):
            self.applied[name] += 1
        return on_applied

    def tick(self):
        for node in self.nodes.values():
            node.doTick(0.002)

    def until(self, condition):
        deadline = time.monotonic() + STEP_TIMEOUT
        while not condition():
            assert time.monotonic() < deadline, "the step did not happen"
            self.tick()

    def run_for(self, seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.tick()

    def propose(self):
        self.seq += 1
        wire = cmds.encode(cmds.Heartbeat(node_id="n1", seq=self.seq),
                           cmds.Envelope(ts=float(self.seq), request_id=f"req-{self.seq}"))
        outcome = []
        self.nodes["a"].apply_command(wire, callback=lambda result, error: outcome.append(error))
        return outcome

    def close(self):
        for node in self.nodes.values():
            node._doDestroy()


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path)
    try:
        leader = s.nodes["a"]
        s.until(lambda: len(leader._SyncObj__connectedNodes) == 2 and len(leader.readonlyNodes) == 1)  # b and the non-voter
        leader._SyncObj__raftElectionDeadline = 0  # a's election timer fires
        s.until(lambda: leader._isLeader() and s.nodes["nonvoter"]._getLeader() is not None)
        outcome = s.propose()  # a first command: every member caught up and applied
        s.until(lambda: outcome and s.applied["nonvoter"] == 1 and s.applied["b"] == 1)
        assert outcome == [FAIL_REASON.SUCCESS]
        yield s
    finally:
        s.close()


def test_an_idle_leader_heartbeats_a_non_voter_once_a_period_and_voters_every_heartbeat(site):
    window = 3 * NONVOTER_HEARTBEAT_PERIOD
    before = {name: node.append_entries.copy() for name, node in site.nodes.items()}
    site.run_for(window)
    heard = {name: node.append_entries["heartbeat"] - before[name]["heartbeat"] for name, node in site.nodes.items()}
    assert heard["b"] >= 0.5 * window / APPEND_PERIOD  # a voter: every heartbeat (60 due)
    assert 2 <= heard["nonvoter"] <= window / NONVOTER_HEARTBEAT_PERIOD + 1  # 3 due, not 60


def test_a_non_voter_gets_each_new_entry_and_commit_at_once(site):
    for n in range(2, 7):
        started = time.monotonic()
        outcome = site.propose()
        site.until(lambda: outcome and site.applied["nonvoter"] == n)
        # Applied on the non-voter within a few voter heartbeats, not a non-voter period:
        # the entry and the commit index that follows it are news, so neither waits.
        assert time.monotonic() - started < NONVOTER_HEARTBEAT_PERIOD / 2
        assert site.applied["b"] == n
    assert site.nodes["nonvoter"].append_entries["entries"] >= 5


# --- a snapshot that is slow to load ------------------------------------------------------

# Real election timeouts, short: the test waits a few of them.
MIN_TIMEOUT, MAX_TIMEOUT = 0.3, 0.4
SLOW_LOAD_S = 1.0  # a snapshot loading this long on a small board: well past MAX_TIMEOUT


def _start(tmp_path, name, addresses, store, voter=True):
    conf = make_conf(data_dir=tmp_path / name, password="site secret",
                     bind_address=addresses[name] if voter else "127.0.0.1:0",
                     min_timeout=MIN_TIMEOUT, max_timeout=MAX_TIMEOUT, append_period=APPEND_PERIOD, snapshots=store)
    conf.logCompactionMinEntries = 50  # compact after a few commands, not 20,000
    return RaftNode(addresses[name] if voter else None, [a for n, a in addresses.items() if n != name], conf,
                    lambda command, result: None, lambda: None, tick=APPEND_PERIOD, snapshots=store)


def _wait_for_leader(nodes):
    deadline = time.monotonic() + STEP_TIMEOUT
    while not any(n.raft._isLeader() for n in nodes.values()):
        assert time.monotonic() < deadline, "no leader"
        time.sleep(0.02)
    return next(n for n in nodes.values() if n.raft._isLeader())


def test_an_idle_non_voter_ticks_at_its_tick_period_between_the_leaders_rare_messages(tmp_path):
    # Its election deadline passes between two of the leader's messages (a second apart,
    # longer than an election timeout); a non-voter holds no elections, so its Raft thread
    # must not wake at once for one, over and over, until the next message.
    addresses = {n: f"127.0.0.1:{free_port('127.0.0.1')}" for n in ("a", "b")}
    nodes = {}
    try:
        for name in ("a", "b"):
            nodes[name] = _start(tmp_path, name, addresses, SnapshotStore())
        _wait_for_leader(nodes)
        nonvoter = _start(tmp_path, "nonvoter", {**addresses, "nonvoter": None}, SnapshotStore(), voter=False)
        nodes["nonvoter"] = nonvoter
        deadline = time.monotonic() + STEP_TIMEOUT
        while nonvoter.raft._getLeader() is None:
            assert time.monotonic() < deadline, "the non-voter found no leader"
            time.sleep(0.02)
        ticks = []
        tick = nonvoter.raft.doTick
        nonvoter.raft.doTick = lambda wait: (ticks.append(wait), tick(wait))
        window = 3 * NONVOTER_HEARTBEAT_PERIOD
        time.sleep(window)
        # One tick per tick period, and a few more for the messages that arrive (the
        # leader's heartbeats once a period): about 60 + 3, not thousands.
        assert len(ticks) <= 1.5 * window / APPEND_PERIOD
    finally:
        for node in nodes.values():
            node.close()


def _heartbeat(seq: int, node_id: str = "n1") -> dict:
    return cmds.encode(cmds.Heartbeat(node_id=node_id, seq=seq),
                       cmds.Envelope(ts=float(seq), request_id=f"req-{node_id}-{seq}"))


def _two_voters_with_a_compacted_log(tmp_path, addresses, nodes) -> RaftNode:
    """a and b (two of three voters: a quorum) commit 120 commands and compact their log, so
    c, started later with nothing, gets the leader's snapshot."""
    for name in ("a", "b"):
        nodes[name] = _start(tmp_path, name, addresses, SnapshotStore())
    leader = _wait_for_leader(nodes)
    done = []
    for seq in range(1, 121):
        leader.raft.apply_command(_heartbeat(seq), callback=lambda result, error: done.append(error))
    deadline = time.monotonic() + 20
    while not (len(done) == 120 and leader.raft.raftLastApplied > 60
               and leader.raft._SyncObj__raftLog[0][1] > 1):  # the log compacted into a snapshot
        assert time.monotonic() < deadline, "the leader did not compact its log"
        time.sleep(0.05)
    return leader


def test_a_follower_slow_to_load_the_leaders_snapshot_starts_no_election(tmp_path):
    addresses = {n: f"127.0.0.1:{free_port('127.0.0.1')}" for n in ("a", "b", "c")}
    nodes = {}
    try:
        leader = _two_voters_with_a_compacted_log(tmp_path, addresses, nodes)
        term = leader.raft.raftCurrentTerm

        slow = SnapshotStore()
        load = slow.read
        loads = []

        def slow_read(path):
            time.sleep(SLOW_LOAD_S)  # on c's Raft thread, before the state is in, as a large load
            meta = load(path)
            # What c's next tick will see: time left before c would stand for election.
            loads.append(nodes["c"].raft._SyncObj__raftElectionDeadline - raft_clock())
            return meta

        slow.read = slow_read
        nodes["c"] = _start(tmp_path, "c", addresses, slow)
        deadline = time.monotonic() + STEP_TIMEOUT
        while not loads:
            assert time.monotonic() < deadline, "the leader sent c no snapshot"
            time.sleep(0.02)
        caught_up = time.monotonic() + 3 * MAX_TIMEOUT
        while time.monotonic() < caught_up:  # several election timeouts after the load
            time.sleep(0.02)
        assert loads[0] > 0.5 * MIN_TIMEOUT  # a fresh election timeout after the load
        deadline = time.monotonic() + STEP_TIMEOUT
        while nodes["c"].raft.raftLastApplied < 120:  # (a busy machine may send it twice: each load is slow)
            assert time.monotonic() < deadline, "c did not catch up"
            time.sleep(0.02)
        assert nodes["c"].raft.raftCurrentTerm == term and leader.raft._isLeader()
        assert leader.raft.raftCurrentTerm == term  # nobody held an election
    finally:
        for node in nodes.values():
            node.close()


class SlowState(SnapshotStore):
    """Loads the leader's snapshot as a large one loads: its state takes SLOW_LOAD_S to come."""

    def __init__(self) -> None:
        super().__init__()
        self.loading = threading.Event()

    def read(self, path: str) -> tuple:
        opened = snapshots.open_snapshot(Path(path).read_bytes())

        def finish():
            self.loading.set()
            time.sleep(SLOW_LOAD_S)
            return opened.finish()

        self.install(finish)
        return opened.meta


def test_a_follower_loading_the_leaders_snapshot_keeps_answering_and_applies_what_came_meanwhile(tmp_path):
    addresses = {n: f"127.0.0.1:{free_port('127.0.0.1')}" for n in ("a", "b", "c")}
    nodes = {}
    try:
        leader = _two_voters_with_a_compacted_log(tmp_path, addresses, nodes)
        slow = SlowState()
        nodes["c"] = c = _start(tmp_path, "c", addresses, slow)
        assert slow.loading.wait(STEP_TIMEOUT), "the leader sent c no snapshot"
        loading_since = time.monotonic()
        before = c.snapshot().applied
        for seq in range(121, 131):  # committed while c loads
            leader.raft.apply_command(_heartbeat(seq), callback=lambda result, error: None)
        submitted = []  # and one c itself submits, as its trio side does

        def submit_on_c():
            submitted.append(trio.run(c.submit, _heartbeat(1, node_id="n2"), STEP_TIMEOUT))

        submitter = threading.Thread(target=submit_on_c)
        submitter.start()
        ages = []
        while time.monotonic() < loading_since + 0.8 * SLOW_LOAD_S:
            heard = dict(leader.status.contacts).get(addresses["c"])
            if heard is not None:
                ages.append(time.monotonic() - heard)
            assert c.snapshot().applied == before  # readers keep the state from before the snapshot
            time.sleep(0.02)
        # c's Raft thread answered the leader all along: with the load on it, c was silent
        # for the whole second
        assert ages and max(ages) < 0.5 * SLOW_LOAD_S
        submitter.join(STEP_TIMEOUT)
        # the result of the command (the state has no members: a refusal), once it was applied
        assert submitted and isinstance(submitted[0], cmds.Refused) and submitted[0].code == "not-member"
        deadline = time.monotonic() + STEP_TIMEOUT
        while c.raft.site_state.applied != leader.raft.site_state.applied:
            assert time.monotonic() < deadline, "c did not apply what was committed during its load"
            time.sleep(0.02)
        ours, theirs = c.snapshot(), leader.snapshot()
        assert ours.nodes == theirs.nodes and ours.applied_order == theirs.applied_order
        assert ours.applied > before
    finally:
        for node in nodes.values():
            node.close()


def _lone_voter(tmp_path):
    address = f"127.0.0.1:{free_port('127.0.0.1')}"
    store = SnapshotStore()
    conf = make_conf(data_dir=tmp_path / "lone", password="site secret", bind_address=address, min_timeout=0.3,
                     max_timeout=0.6, append_period=APPEND_PERIOD, snapshots=store)
    return RaftNode(address, [], conf, lambda command, result: None, lambda: None, tick=APPEND_PERIOD,
                    snapshots=store)


def test_a_raft_thread_whose_ticks_keep_failing_is_reported_stalled(tmp_path, monkeypatch):
    from meshd.io import raft as raftmod
    monkeypatch.setattr(raftmod, "RAFT_STALL_LIMIT", 0.5)
    node = _lone_voter(tmp_path)
    try:
        time.sleep(0.3)
        assert node.stalled_for(time.monotonic()) is None  # ticking
        def broken(timeout):
            raise OSError("journal damaged")
        node.raft.doTick = broken
        deadline = time.monotonic() + STEP_TIMEOUT
        while node.stalled_for(time.monotonic()) is None:
            assert time.monotonic() < deadline, "a Raft thread failing every tick was never reported"
            time.sleep(0.05)
        seconds, why = node.stalled_for(time.monotonic())
        assert seconds > 0.5 and "ticks" in why
    finally:
        node.close()
    assert node.stalled_for(time.monotonic()) is None  # stopped on purpose: not a stall


@pytest.mark.parametrize("now, awake_since, ticked_at, traffic_at, expected", [
    (100.0, 0.0, 99.9, 99.0, None),  # ticking and talking
    (100.0, 0.0, 99.9, None, None),  # ticking, no voter connected (alone, cut off): silence is fine
    (100.0, 0.0, 80.0, 99.0, (20.0, "its ticks keep failing or stopped")),
    (100.0, 0.0, 99.9, 80.0, (20.0, "no Raft message to or from its connected voters")),
    (100.0, 95.0, 50.0, 50.0, None),  # frozen until 95: counted from then
    (100.0, 80.0, 50.0, 50.0, (20.0, "its ticks keep failing or stopped")),
])
def test_raft_stall(now, awake_since, ticked_at, traffic_at, expected):
    from meshd.io.raft import raft_stall
    assert raft_stall(now, awake_since, ticked_at, traffic_at, limit=15.0) == expected


def test_a_voter_whose_raft_messages_stop_is_reported_stalled_though_it_ticks(tmp_path, monkeypatch):
    """Two real voters: while they talk, neither is stalled; once one of them neither sends
    nor receives a message (its ticks still go through), it is, and the reason says so.
    The other, still sending its heartbeats or vote requests, is not."""
    from meshd.io import raft as raftmod
    monkeypatch.setattr(raftmod, "RAFT_STALL_LIMIT", 1.0)
    addresses = {n: f"127.0.0.1:{free_port('127.0.0.1')}" for n in ("a", "b")}
    nodes = {}
    try:
        for name in addresses:
            nodes[name] = _start(tmp_path, name, addresses, SnapshotStore())
        _wait_for_leader(nodes)
        time.sleep(0.5)
        for node in nodes.values():
            assert node.stalled_for(time.monotonic()) is None
        mute = nodes["a"]
        # Its ticks return (as a tick does whose poller lost its sockets) but do no Raft
        # work: nothing is read or sent, while its connection to b stays open.
        mute.raft.doTick = lambda timeout: time.sleep(timeout)
        deadline = time.monotonic() + STEP_TIMEOUT
        while mute.stalled_for(time.monotonic()) is None:
            assert time.monotonic() < deadline, "a voter that stopped talking was never reported"
            time.sleep(0.05)
        seconds, why = mute.stalled_for(time.monotonic())
        assert seconds > 1.0 and why == "no Raft message to or from its connected voters"
        assert time.monotonic() - mute._ticked_at < 0.5  # its ticks go on
        assert nodes["b"].stalled_for(time.monotonic()) is None
    finally:
        for node in nodes.values():
            node.close()


def test_a_message_announcing_an_absurd_term_is_dropped(tmp_path):
    from meshd.io.raft import MAX_TERM_JUMP
    node = _lone_voter(tmp_path)
    node.close()  # its thread stopped: the test drives the handler itself
    raft = node.raft
    term = raft.raftCurrentTerm
    vote = {"type": "request_vote", "last_log_term": 0, "last_log_index": 0}
    for absurd in (2**60, term + MAX_TERM_JUMP + 1):
        raft._SyncObj__onMessageReceived(None, dict(vote, term=absurd))
        assert raft.raftCurrentTerm == term
    raft._SyncObj__onMessageReceived(None, dict(vote, term=term + 5))  # a real election elsewhere: taken
    assert raft.raftCurrentTerm == term + 5


def test_a_journal_holding_an_absurd_term_is_refused_at_start_naming_the_file(tmp_path):
    """A flipped byte in the journal's term would become the whole site's term at this
    node's first vote request: the node refuses to start on it instead."""
    from pysyncobj.journal import createJournal
    from meshd.io.raft import MAX_TERM, RaftDataError
    node = _lone_voter(tmp_path)
    node.close()
    journal_path = tmp_path / "lone" / "raft" / "journal"
    journal = createJournal(str(journal_path))
    journal.setCurrentTerm(MAX_TERM * 1000, None)
    journal._destroy()
    with pytest.raises(RaftDataError, match=f"journal {journal_path} holds term {MAX_TERM * 1000}"):
        _lone_voter(tmp_path)
