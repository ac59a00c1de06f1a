"""Re-attestation while this node leads (meshd.node.attesting decides who is due and what the
answer earns): a challenge to one member at a time over the peer port, and the renewed
membership certificate once `attested` was applied.

Invariants:
- The evidence authenticates the answer (signed by the node key, bound to our nonce), so a
  member whose certificate expired offline can still be asked and renewed.
- An unreachable member, or an outcome that did not commit, is asked again later.
"""

from __future__ import annotations

import logging
import os
import time

import trio

from meshd.io.context import NodeContext
from meshd.io.raft import CommandFailed
from meshd.node import effects as fx
from meshd.node.attesting import Attesting

log = logging.getLogger("meshd.daemon")

# Look for due members this often (and on every state change); one exchange may take this long.
ATTEST_CHECK_PERIOD = 1.0
ATTEST_TIMEOUT = 10.0


class AttestationService:
    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.core: Attesting | None = None  # once the identity is known
        ctx.carry_out(fx.RenewCertificate, self._renew_certificate)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        ctx = self.ctx
        assert ctx.state_changed is not None and ctx.identity is not None
        core = self.core = Attesting(leader_name=ctx.config.name, own_id=ctx.identity.node_id,
                                     interval=ctx.config.reattest_interval)
        changes = ctx.state_changed.listener()
        task_status.started()
        while True:
            await changes.wait_slot(ATTEST_CHECK_PERIOD)
            if ctx.raft is None or ctx.raft.status.role != "leader":
                continue
            term = ctx.raft.status.term  # its outcome is this leader's decision, fenced by this term
            node = core.next_due(ctx.snapshot(), time.time(), time.monotonic())
            if node is None:
                continue
            nonce, issued_at = os.urandom(32), time.time()
            answer = await ctx.try_call_member(node, {"call": "attest", "nonce": nonce.hex()},
                                               "re-attestation postponed", timeout=ATTEST_TIMEOUT,
                                               verify_server=False)
            if answer is None:
                core.unreachable(node, time.monotonic())
                continue
            evidence = answer.get("evidence") if isinstance(answer, dict) else None
            try:
                await ctx.execute(core.appraise(ctx.snapshot(), node, evidence, nonce, issued_at, time.time(),
                                                ctx.root_signing_key(), time.monotonic()), term=term)
            except CommandFailed as e:
                log.info("re-attestation outcome not committed", extra={"node": node.name, "reason": str(e)})
                core.unreachable(node, time.monotonic())

    async def _renew_certificate(self, effect: fx.RenewCertificate) -> None:
        """Fresh evidence earns a fresh membership certificate (SPIRE-style renewal)."""
        ctx, node = self.ctx, effect.node
        state = ctx.snapshot()
        if ctx.root_signing_key() is None or not state.root_cert:
            return
        cert = ctx.issue_certificate(state, node.public_key, node.site, node.node_id)
        await ctx.try_call_member(node, {"call": "certificate", "member_cert": cert},
                                  "certificate renewal postponed", timeout=ATTEST_TIMEOUT, verify_server=False)
