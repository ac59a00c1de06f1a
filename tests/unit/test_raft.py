"""meshd.io.raft's transport: the leader's idle heartbeats to non-voters are thinned, and
nothing else is.

Real SiteRaft instances (meshd's own pysyncobj conf, encrypted TCP on loopback): two voters
and one non-voter (a pysyncobj readonly node), all ticked by the test in one thread. Each
member counts the append-entries messages it receives, by sender.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
from pysyncobj import FAIL_REASON
from pysyncobj.monotonic import monotonic as raft_clock

from meshd import commands as cmds
from meshd.io.raft import NONVOTER_HEARTBEAT_PERIOD, RaftNode, SiteRaft, make_conf
from meshd.io.runtime import free_port
from meshd.io.snapshots import SnapshotStore

# Far beyond the test's length: the leader is the one the test elects.
ELECTION_TIMEOUT = 30.0
APPEND_PERIOD = 0.05  # pysyncobj's heartbeat period: 20 a second to each voter
STEP_TIMEOUT = 10.0  # upper bound of any one wait (each takes a few ticks on an idle machine)


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


def test_a_follower_slow_to_load_the_leaders_snapshot_starts_no_election(tmp_path):
    addresses = {n: f"127.0.0.1:{free_port('127.0.0.1')}" for n in ("a", "b", "c")}
    nodes = {}
    try:
        for name in ("a", "b"):  # two of three voters: a quorum; c starts later, with nothing
            nodes[name] = _start(tmp_path, name, addresses, SnapshotStore())
        leader = _wait_for_leader(nodes)
        done = []
        for seq in range(120):
            wire = cmds.encode(cmds.Heartbeat(node_id="n1", seq=seq + 1),
                               cmds.Envelope(ts=float(seq + 1), request_id=f"req-{seq}"))
            leader.raft.apply_command(wire, callback=lambda result, error: done.append(error))
        deadline = time.monotonic() + 20
        while not (len(done) == 120 and leader.raft.raftLastApplied > 60
                   and leader.raft._SyncObj__raftLog[0][1] > 1):  # the log compacted into a snapshot
            assert time.monotonic() < deadline, "the leader did not compact its log"
            time.sleep(0.05)
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
        assert nodes["c"].raft.raftCurrentTerm == term and leader.raft._isLeader()
        assert leader.raft.raftCurrentTerm == term  # nobody held an election
        assert nodes["c"].raft.raftLastApplied >= 120
    finally:
        for node in nodes.values():
            node.close()
