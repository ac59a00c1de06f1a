"""Revocation and the Raft secret (meshd.node.trust decides what follows a revocation).

- `revoke` commits a revocation; only once it was applied is the node told (it may never
  hear it through Raft again) and the secret rotated;
- a rotation's secret goes over mutual TLS to every current member, then this node switches;
- a member cut off from its site's Raft for a while asks the others for the current secret
  (it may have missed a rotation while it was down).

Invariants:
- The secret never enters the replicated state (every member, revoked or not, reads it); it
  travels only over mutual TLS to certified current members.
- Members only ever move to a higher epoch, one Raft restart at a time.
"""

from __future__ import annotations

import logging
import secrets
import time

import trio

from meshd.commands import Refused, Result
from meshd.io.context import NodeContext
from meshd.io.tls import member_of
from meshd.io.wakeup import sleep_slot
from meshd.node import effects as fx
from meshd.node import trust
from meshd.state import ADMIN_LEFT, ADMIN_REVOKED, NodeRecord

log = logging.getLogger("meshd.daemon")

# Raft secret: a member with no Raft leader for SECRET_FETCH_AFTER (looked at every
# SECRET_CHECK_PERIOD) asks the others whether the secret was rotated while it was away.
SECRET_CHECK_PERIOD = 2.0  # a few looks within SECRET_FETCH_AFTER; each wakes the idle loop
SECRET_FETCH_AFTER = 5.0


def valid_secret(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


class TrustService:
    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self._secret_switch = trio.Lock()  # one Raft restart at a time, or two nodes would share a port
        ctx.carry_out(fx.TellRevoked, self._tell_revoked)
        ctx.carry_out(fx.DistributeSecret, self._distribute_secret)
        ctx.carry_out(fx.PromoteVoter, self._promote_voter)
        ctx.carry_out(fx.RebuildState, self._rebuild_state)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await self._secret_watch_loop()

    async def revoke(self, node: NodeRecord, actor: str, reason: str, force: bool = False) -> Result:
        """Revoke a member: commit the revocation, then, only if it was applied, tell the node
        and rotate the Raft secret. Raises CommandFailed when the revocation did not commit."""
        ctx = self.ctx
        assert ctx.identity is not None
        command = trust.revocation(ctx.snapshot(), node, actor, reason, ctx.root_signing_key(), time.time(),
                                   own_id=ctx.identity.node_id, force=force)
        if isinstance(command, Refused):
            return command
        result = await ctx.commit(command)
        await ctx.execute(trust.after_revocation(node, command, result, ctx.identity.node_id, ctx.config.name))
        return result

    async def _tell_revoked(self, effect: fx.TellRevoked) -> None:
        """Best effort, right after a revocation commits: hand the node the signed list that
        names it. Raft may never tell it (the leader drops it from the configuration, and the
        secret rotation cuts it off), and it must stop its workloads."""
        assert self.ctx.membership is not None
        mesh_id, node = self.ctx.membership.mesh_id, effect.node
        await self.ctx.try_call_member(node, {"call": "revoked", "revocations": effect.revocations},
                                       "revoked node not reached",
                                       # it is no longer a member: check only that it is that node
                                       expect=lambda cert: (member_of(cert, mesh_id) or ("", ""))[1] == node.node_id)

    async def _distribute_secret(self, effect: fx.DistributeSecret) -> None:
        """A new Raft secret under the epoch Raft reserved, to every current member, then here.
        Members that miss it (down) fetch it when they come back."""
        secret = secrets.token_hex(32)
        for node in effect.members:
            await self.ctx.try_call_member(node, {"call": "rotate", "secret": secret, "epoch": effect.epoch},
                                           "rotation not delivered; the member fetches it later")
        await self.switch_secret(secret, effect.epoch)

    async def _promote_voter(self, effect: fx.PromoteVoter) -> None:
        """The site made `effect.node` a voter: hand it the mesh root key (voters issue
        certificates and sign trust documents); it restarts its Raft as a voter."""
        assert self.ctx.membership is not None
        await self.ctx.try_call_member(effect.node, {"call": "promote", "root_key": self.ctx.membership.root_key},
                                       "promotion not delivered")

    async def _rebuild_state(self, effect: fx.RebuildState) -> None:
        """A checkpoint found this member's history is not the site's: Raft restarts on no
        data and takes the site's state from the leader (meshd.io.raft, recovering)."""
        ctx = self.ctx
        async with self._secret_switch:  # one Raft restart at a time
            if ctx.raft is None or not ctx.snapshot().diverged:
                return
            log.error("this member's Raft history is not the site's; it is set aside and rebuilt from the leader",
                      extra={"reason": effect.reason})
            await trio.to_thread.run_sync(ctx.raft.close)
            ctx.start_raft(rebuild=effect.reason)

    async def become_voter(self, root_key: str) -> None:
        """This node was made a voter: keep the root key, restart Raft as a voter with the
        site's other voters as partners."""
        ctx = self.ctx
        assert ctx.membership is not None and ctx.identity is not None
        async with self._secret_switch:  # one Raft restart at a time
            if ctx.membership.voter:
                return
            state = ctx.snapshot()
            ctx.membership.voter, ctx.membership.root_key = True, root_key
            ctx.membership.partners = sorted(n.raft_address for n in state.nodes.values() if n.voter and n.admin
                                             not in (ADMIN_LEFT, ADMIN_REVOKED) and n.node_id != ctx.identity.node_id)
            ctx.membership.save(ctx.data_dir)
            ctx.event("membership", "promoted to voter: Raft restarts as a voter")
            if ctx.raft is not None:
                await trio.to_thread.run_sync(ctx.raft.close)
            ctx.start_raft()

    async def switch_secret(self, secret: str, epoch: int) -> bool:
        """Adopt a newer site secret: save it, restart Raft with it. Older epochs are ignored."""
        ctx = self.ctx
        assert ctx.membership is not None
        async with self._secret_switch:
            if epoch <= ctx.membership.secret_epoch:
                return False
            ctx.membership.site_secret, ctx.membership.secret_epoch = secret, epoch
            ctx.membership.save(ctx.data_dir)
            if ctx.raft is not None:
                # The old node keeps answering reads (its last state) until the new one replaces
                # it; commands in between fail and are retried like any during an election.
                await trio.to_thread.run_sync(ctx.raft.close)
            ctx.start_raft()
        ctx.event("membership", f"Raft secret rotated (epoch {epoch})", epoch=epoch)
        return True

    async def _secret_watch_loop(self) -> None:
        """A member cut off from its site's Raft for a while (no leader, or no quorum: with a
        stale secret every Raft connection fails) may have missed a rotation while it was
        down: it asks other members (certificate only) for the current secret."""
        ctx = self.ctx
        assert ctx.identity is not None and ctx.membership is not None
        leaderless_since: float | None = None
        while True:
            await sleep_slot(SECRET_CHECK_PERIOD)
            if ctx.raft is None or not ctx.partitioned:
                leaderless_since = None
                continue
            now = time.monotonic()
            leaderless_since = leaderless_since or now
            if now - leaderless_since < SECRET_FETCH_AFTER:
                continue
            leaderless_since = now  # ask again only after another quiet spell
            for node in ctx.snapshot().nodes.values():
                if node.node_id == ctx.identity.node_id or node.admin in (ADMIN_LEFT, ADMIN_REVOKED):
                    continue
                answer = await ctx.try_call_member(node, {"call": "site_secret"}, "current secret not fetched")
                if isinstance(answer, dict) and valid_secret(answer.get("secret")) \
                        and isinstance(answer.get("epoch"), int):
                    if await self.switch_secret(answer["secret"], answer["epoch"]):
                        break
