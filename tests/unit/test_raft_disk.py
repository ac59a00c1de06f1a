"""meshd.io.raft on a full disk: a leader whose data dir's filesystem fills up steps down (it
could commit nothing) and stands for no election, the site elects another leader and goes
on, and once space is freed the member takes the entries it missed.

Real SiteRaft instances (three voters, encrypted TCP on loopback, ticked by the test as
RaftNode._run ticks them); the leader's data dir is a real tmpfs, really filled (root only).
"""

from __future__ import annotations

import time

from pysyncobj import FAIL_REASON

from meshd import commands as cmds
from meshd.io.ports import free_port
from meshd.io.raft import SiteRaft, make_conf
from meshd.io.raftdata import seal
from meshd.io.snapshots import SnapshotStore

from tests.smalldisk import fill

TIMEOUT = 30.0  # nobody stands on its own: the test says who stands
STEP_TIMEOUT = 10.0


def test_a_leader_whose_disk_fills_steps_down_and_catches_up_once_space_returns(tmp_path, small_disk):
    addresses = {n: f"127.0.0.1:{free_port('127.0.0.1')}" for n in "abc"}
    nodes: dict[str, SiteRaft] = {}
    for name, address in addresses.items():
        store = SnapshotStore()
        conf = make_conf(data_dir=tmp_path / name, password="site secret", bind_address=address,
                         min_timeout=TIMEOUT, max_timeout=TIMEOUT + 1, append_period=0.05, snapshots=store)
        nodes[name] = SiteRaft(address, [a for n, a in addresses.items() if n != name], conf,
                               lambda command, result: None, lambda: None, store)
    a, b = nodes["a"], nodes["b"]

    def tick():
        for node in nodes.values():
            node.doTick(0.002)
            node.after_tick()
            node.refresh_status()

    def until(condition):
        deadline = time.monotonic() + STEP_TIMEOUT
        while not condition():
            assert time.monotonic() < deadline, "the step did not happen"
            tick()

    def commit(leader, count, seq=[0]):
        outcome: list = []
        for _ in range(count):
            seq[0] += 1
            wire = cmds.encode(cmds.Heartbeat(node_id="n1", seq=seq[0]), cmds.Envelope(ts=1.0, request_id=f"r{seq[0]}"))
            leader.apply_command(seal(wire), callback=lambda result, error: outcome.append(error))
        until(lambda: len(outcome) == count)
        return outcome

    try:
        until(lambda: len(a._SyncObj__connectedNodes) == 2)
        a._SyncObj__raftElectionDeadline = 0
        until(a._isLeader)
        assert set(commit(a, 5)) == {FAIL_REASON.SUCCESS}

        fill(small_disk)
        # what it takes now cannot go into its journal: it steps down, takes nothing more
        pending: list = []
        for n in range(400):  # enough entries to need the journal to grow
            wire = cmds.encode(cmds.Heartbeat(node_id="n1", seq=1000 + n), cmds.Envelope(ts=1.0, request_id=f"x{n}"))
            a.apply_command(seal(wire), callback=lambda result, error: pending.append(error))
        until(lambda: a.status.disk_full and not a._isLeader())
        stood = [0.0]

        def b_leads():  # b stands (every half second) until it wins
            if not b._isLeader() and time.monotonic() - stood[0] > 0.5:
                stood[0] = time.monotonic()
                b._SyncObj__raftElectionDeadline = 0
            return b._isLeader()

        until(b_leads)
        assert set(commit(b, 5)) == {FAIL_REASON.SUCCESS}  # the site goes on without it
        for _ in range(20):
            tick()
        assert not a._isLeader() and a.status.disk_full  # it stood for nothing meanwhile

        (small_disk / "filler").unlink()
        until(lambda: not a.status.disk_full and a.raftLastApplied == b.raftLastApplied)
        assert set(commit(b, 3)) == {FAIL_REASON.SUCCESS}
        until(lambda: a.raftLastApplied == b.raftLastApplied)
        assert a.site_state.applied == b.site_state.applied
        assert set(a.site_state.applied_requests) == set(b.site_state.applied_requests)
    finally:
        for node in nodes.values():
            node._doDestroy()
