"""The leader's duties while this node leads (meshd.node.leading decides; this waits for
state changes, role changes and the next lease deadline) and the Raft voter changes.

Invariants:
- One Raft configuration change at a time (pysyncobj takes one at a time; a second one would
  wait out its timeout): a change already under way makes the next wait for the next pass.
- A duty whose command did not commit is looked at again after LEADER_PERIOD.
"""

from __future__ import annotations

import logging
import secrets
import time

import trio

from meshd.io.context import NodeContext
from meshd.io.raft import CommandFailed
from meshd.node import effects as fx
from meshd.node.leading import LeaderView, Leading

log = logging.getLogger("meshd.daemon")

# After a leader duty failed (a command did not commit), the leader looks again this soon.
LEADER_PERIOD = 0.1
# A follower's leader loop is woken by every role change; this is only a safety net.
FOLLOWER_PERIOD = 2.0


class LeaderService:
    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.core = Leading(lease=ctx.config.lease, new_alloc_id=lambda: secrets.token_hex(6))
        self._voter_change_lock = trio.Lock()
        ctx.carry_out(fx.AddVoter, self._change_voters)
        ctx.carry_out(fx.RemoveVoter, self._change_voters)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        ctx = self.ctx
        assert ctx.state_changed is not None and ctx.identity is not None
        task_status.started()
        wait = 0.0  # look at once: a founder became leader before this loop started
        changes = ctx.state_changed.listener()
        while True:
            await changes.wait(wait)
            wait = FOLLOWER_PERIOD
            if ctx.raft is None or ctx.raft.status.role != "leader":
                self.core.stepped_down()
                continue
            wait = LEADER_PERIOD  # after a failed duty: try again soon
            try:
                view = self._view()
                effects = self.core.step(view, time.monotonic())
                await ctx.execute(effects, term=view.term)  # fenced by the term they were made in
                # Without a commit the state is the one just looked at.
                wait = 0.0 if any(isinstance(e, fx.Commit) for e in effects) else \
                    self.core.next_look(view.state, time.monotonic())
            except CommandFailed as e:
                log.info("leader duty interrupted", extra={"reason": str(e)})

    def _view(self) -> LeaderView:
        ctx = self.ctx
        assert ctx.raft is not None and ctx.identity is not None
        status = ctx.raft.status
        return LeaderView(state=ctx.snapshot(), term=status.term, own_id=ctx.identity.node_id,
                          own_raft_address=f"{ctx.advertise_ip}:{ctx.raft_port}", configured=status.partners,
                          contacts=status.contacts, beats=tuple(ctx.beats.items()), caught_up=ctx.raft.replayed,
                          wall=time.time(), status_at=status.refreshed_at, awake_since=status.awake_since)

    def voter_changes(self) -> list[fx.Effect]:
        """The Raft configuration change the site needs now, if this node leads (a join asks
        at once: a new voter is starting Raft and would otherwise disturb the site with an
        election before the next pass)."""
        if self.ctx.raft is None or self.ctx.raft.status.role != "leader":
            return []
        change = self.core.voter_change(self._view())
        return [change] if change is not None else []

    async def _change_voters(self, change: fx.AddVoter | fx.RemoveVoter) -> None:
        ctx = self.ctx
        assert ctx.raft is not None
        status = ctx.raft.status
        if status.role != "leader" or time.monotonic() - status.refreshed_at > ctx.config.lease:
            # decided on a view this node may no longer lead by (a freeze since): pysyncobj
            # would forward it to whoever leads now; the next leader decides afresh
            log.info("voter change dropped: this node's leadership is not current",
                     extra={"node": change.name})
            return
        if self._voter_change_lock.locked():
            return
        async with self._voter_change_lock:
            try:
                if isinstance(change, fx.AddVoter):
                    await ctx.raft.change_membership(add=change.address)
                    ctx.event("membership", f"{change.name} added to the Raft voters", node=change.name)
                else:
                    # A revoked (or departed) member leaves the Raft configuration: it no longer
                    # counts towards quorum and the leader stops sending it the log.
                    await ctx.raft.change_membership(remove=change.address)
                    ctx.event("membership", f"{change.name} removed from the Raft voters ({change.why})",
                              node=change.name)
            except CommandFailed as e:
                log.info("voter change pending", extra={"node": change.name, "reason": str(e)})
