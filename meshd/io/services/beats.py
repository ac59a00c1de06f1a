"""A non-voter's beats: while this node is a non-voter that follows a leader, it beats to that
leader over the peer port (meshd.io.peer `beat_hello`), several times a lease, on one
long-lived mutual-TLS connection. The leader counts each beat as a contact for this node's
lease (meshd.liveness), as it counts Raft heartbeat answers for voters: liveness costs no
Raft commit, however many non-voters a site has.

Invariants:
- Beats go only to the node the Raft status names as leader, and to nobody while this node
  votes (the leader hears voters in Raft) or has no leader; a change of either ends the
  connection within one beat period.
- A failed connection is retried after BEAT_RETRY_DELAY; failures are logged once per
  leader, not once per attempt.
"""

from __future__ import annotations

import logging

import trio

from meshd.io import peer
from meshd.io.context import NodeContext
from meshd.state import NodeRecord

log = logging.getLogger("meshd.daemon")

# Beats per lease: the leader marks a node down after a lease without one, so several must
# fit in it for one late beat not to matter (3: two may be late, or one retransmitted TCP
# segment at Linux's 200 ms minimum RTO twice over). Each beat wakes the leader's loop: 7
# non-voters at 4 a lease were half of an idle leader's event-loop time.
BEATS_PER_LEASE = 3
# After a beat connection failed (the leader restarting, a cut), try again this soon: short
# next to the lease, long enough not to spin on a dead address.
BEAT_RETRY_DELAY = 0.2
# While this node has nothing to beat for, it looks again on every state or role change (a
# new leader is a role change), and this often without one: a safety net, not the way news
# comes (every voter and the leader wait here for good).
IDLE_LOOK_PERIOD = 5.0


class BeatService:
    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self._failing_for: str | None = None  # the leader whose connection failure was logged

    def _leader(self) -> NodeRecord | None:
        """The node to beat to now, if any."""
        ctx = self.ctx
        if ctx.raft is None or ctx.identity is None:
            return None
        status = ctx.raft.status
        if status.role != "nonvoter" or status.leader_address is None:
            return None
        return next((n for n in ctx.snapshot().nodes.values()
                     if n.raft_address == status.leader_address and n.node_id != ctx.identity.node_id), None)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        ctx = self.ctx
        assert ctx.state_changed is not None
        changes = ctx.state_changed.listener()
        task_status.started()
        while True:
            leader = self._leader()
            if leader is None:
                await changes.wait_slot(IDLE_LOOK_PERIOD)
                continue
            raft_address = leader.raft_address

            def keep_on() -> bool:
                status = ctx.raft.status if ctx.raft is not None else None
                return status is not None and status.role == "nonvoter" and status.leader_address == raft_address

            try:
                await peer.send_beats(leader.address, ctx.tls.client_context(), period=ctx.config.lease / BEATS_PER_LEASE,
                                      keep_on=keep_on, expect=ctx.cert_names(leader.node_id))
                self._failing_for = None
            except (OSError, peer.PeerError, trio.TooSlowError, trio.BrokenResourceError) as e:
                if self._failing_for != leader.node_id:
                    self._failing_for = leader.node_id
                    log.info("beats to the leader failed; retrying",
                             extra={"leader": leader.name, "reason": str(e) or type(e).__name__})
                await trio.sleep(BEAT_RETRY_DELAY)
