"""meshd.io.raft: a voter whose Raft data was set aside (meshd.io.raftdata) rebuilds the site's
state from the leader, and until then neither votes nor stands for election.

Real SiteRaft instances (meshd's own pysyncobj conf, encrypted TCP on loopback), three voters
ticked by the test in one thread the way RaftNode._run ticks them.
"""

from __future__ import annotations

import time

from pysyncobj import FAIL_REASON

from meshd import commands as cmds
from meshd.io.ports import free_port
from meshd.io.raft import SiteRaft, make_conf
from meshd.io.raftdata import check_raft_dir, seal, set_aside
from meshd.io.snapshots import SnapshotStore

LONG_TIMEOUT = 30.0  # a and b never stand on their own: the test says who stands
SHORT_TIMEOUT = 0.3  # c would stand after this much silence, were it not recovering
APPEND_PERIOD = 0.05
STEP_TIMEOUT = 10.0


class Site:
    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.addresses = {n: f"127.0.0.1:{free_port('127.0.0.1')}" for n in ("a", "b", "c")}
        self.nodes: dict[str, SiteRaft] = {}
        for name in self.addresses:
            self.start(name)

    def start(self, name: str, recovering: bool = False, timeout: float = LONG_TIMEOUT) -> SiteRaft:
        store = SnapshotStore()
        conf = make_conf(data_dir=self.tmp / name, password="site secret", bind_address=self.addresses[name],
                         min_timeout=timeout, max_timeout=timeout + 0.1, append_period=APPEND_PERIOD,
                         snapshots=store)
        partners = [a for n, a in self.addresses.items() if n != name]
        node = SiteRaft(self.addresses[name], partners, conf, lambda command, result: None, lambda: None, store,
                        recovering=recovering)
        self.nodes[name] = node
        return node

    def stop(self, name: str) -> None:
        self.nodes.pop(name)._doDestroy()

    def tick(self):
        for node in self.nodes.values():  # what RaftNode._run does after each tick
            node.doTick(0.002)
            node.after_tick()
            node.refresh_status()

    def until(self, condition):
        deadline = time.monotonic() + STEP_TIMEOUT
        while not condition():
            assert time.monotonic() < deadline, "the step did not happen"
            self.tick()

    def run_for(self, seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.tick()

    def commit(self, leader: SiteRaft, count: int) -> None:
        outcome: list = []
        for seq in range(count):
            wire = cmds.encode(cmds.Heartbeat(node_id="n1", seq=seq + 1),
                               cmds.Envelope(ts=float(seq), request_id=f"req-{time.monotonic()}-{seq}"))
            leader.apply_command(seal(wire), callback=lambda result, error: outcome.append(error))
        self.until(lambda: len(outcome) == count)
        assert set(outcome) == {FAIL_REASON.SUCCESS}

    def close(self):
        for node in self.nodes.values():
            node._doDestroy()


def test_a_voter_with_its_raft_data_set_aside_neither_votes_nor_stands_until_it_holds_the_sites_state(tmp_path):
    site = Site(tmp_path)
    try:
        a = site.nodes["a"]
        site.until(lambda: len(a._SyncObj__connectedNodes) == 2)
        a._SyncObj__raftElectionDeadline = 0
        site.until(lambda: a._isLeader())
        site.commit(a, 8)
        site.until(lambda: all(n.raftLastApplied == a.raftLastApplied for n in site.nodes.values()))
        applied = a.site_state.applied
        assert applied >= 8

        site.stop("c")
        check_raft_dir(tmp_path / "c" / "raft")  # sound: the test sets it aside as if it were not
        set_aside(tmp_path / "c" / "raft")
        site.stop("a")  # the leader goes: b and a recovering c are left
        c = site.start("c", recovering=True, timeout=SHORT_TIMEOUT)
        b = site.nodes["b"]
        site.until(lambda: len(c._SyncObj__connectedNodes) == 1)
        site.run_for(4 * SHORT_TIMEOUT)
        assert not c._isLeader() and c.raftCurrentTerm == 0, "a recovering voter stood for election"
        b._SyncObj__raftElectionDeadline = 0  # b stands: c's vote would elect it
        site.run_for(1.0)
        assert not b._isLeader(), "a recovering voter gave its vote"
        assert c.status.recovering and c.site_state.applied == 0

        a = site.start("a")  # its data intact: a and b elect it, and c takes the state from it
        site.until(lambda: len(a._SyncObj__connectedNodes) == 2)

        stood = [0.0]

        def a_leads():  # a stands (every half second) until its term passes b's, which stood above
            if not a._isLeader() and time.monotonic() - stood[0] > 0.5:
                stood[0] = time.monotonic()
                a._SyncObj__raftElectionDeadline = 0
            return a._isLeader()

        site.until(a_leads)
        leader = a
        site.until(lambda: not c.status.recovering)
        # a leader just elected commits its predecessor's entries only through one of its term:
        # a commit index before that (here 1: a restarted) did not end the recovery
        assert c.site_state.applied >= applied
        site.commit(leader, 2)
        site.until(lambda: c.raftLastApplied == leader.raftLastApplied)
        assert c.site_state.applied == leader.site_state.applied
        assert set(c.site_state.applied_requests) == set(leader.site_state.applied_requests) and c.site_state.applied_requests
    finally:
        site.close()
