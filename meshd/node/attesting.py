"""Re-attestation on the leader: who is asked for fresh evidence, and what the answer earns.

A member that passes gets `attested` committed and then, only once that committed, a fresh
membership certificate. A member whose evidence fails is revoked by the site (audit actor
`attestation@<leader>`), through the one revocation flow of meshd.node.trust. A member that
could not be asked is asked again after a delay.

Invariants:
- Pure: `now` is the wall clock the state's timestamps use (evidence freshness, due dates);
  `mono` the monotonic clock for retry delays.
- One member per pass: attestation never crowds out the leader's other duties.
- A certificate is renewed only after an `Ok` for `attested`; a refused `attested` or a
  refused revocation changes nothing else and says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from attestation.signed import AttestationError
from attestation.verifier import Challenge as EvidenceChallenge
from attestation.verifier import TpmBinding
from attestation.verifier import verify as verify_evidence
from meshd import admission
from meshd.commands import Attested, Ok, Refused, Result
from meshd.node import trust
from meshd.node.effects import Commit, Effect, Emit, RenewCertificate
from meshd.reattest import due_for_attestation
from meshd.state import NodeRecord, SiteState

# A member that could not be asked (unreachable, timed out) is asked again after this long.
RETRY_DELAY = 10.0


@dataclass
class Attesting:
    """The leader's re-attestation bookkeeping: which members to leave alone for a while."""

    leader_name: str
    own_id: str
    interval: float  # seconds between re-attestations of a member (config reattest_interval)
    retry_after: dict[str, float] = field(default_factory=dict)  # node id -> mono time to ask again

    def next_due(self, state: SiteState, now: float, mono: float) -> NodeRecord | None:
        """The member to challenge now, most urgent first, or None."""
        for node_id in due_for_attestation(state, now, self.interval):
            if self.retry_after.get(node_id, 0.0) <= mono:
                return state.nodes[node_id]
        return None

    def unreachable(self, node: NodeRecord, mono: float) -> None:
        self.retry_after[node.node_id] = mono + RETRY_DELAY

    def appraise(self, state: SiteState, node: NodeRecord, evidence: object, nonce: bytes, issued_at: float,
                 now: float, root_key: Ed25519PrivateKey | None) -> list[Effect]:
        """What the member's answer to our challenge (nonce issued at `issued_at`) earns."""
        self.retry_after.pop(node.node_id, None)
        try:
            policy, revocations = admission.site_trust(state)
        except (ValueError, AttestationError) as e:
            return [Emit("attestation", f"cannot re-attest {node.name}: the trust documents do not verify ({e})",
                         {"node": node.name})]
        binding = TpmBinding(bytes.fromhex(node.tpm_ak)) if node.tpm_ak else None
        verdict = verify_evidence(evidence, EvidenceChallenge(nonce.hex(), node.node_id, issued_at),
                                  bytes.fromhex(node.public_key), policy, state.site, now, revocations, binding)
        if verdict.ok:
            assert verdict.claims is not None
            effects: list[Effect] = []
            if node.attested_boot_id and verdict.claims.boot_id != node.attested_boot_id:
                effects.append(Emit("attestation", f"{node.name} re-attested after a reboot", {"node": node.name}))
            effects.append(Commit(Attested(node_id=node.node_id, boot_id=verdict.claims.boot_id),
                                  then=lambda result, _state: after_attested(node, result)))
            return effects
        actor = f"attestation@{self.leader_name}"
        failed = Emit("attestation", f"{node.name} failed re-attestation: {verdict.reason}",
                      {"node": node.name, "reason": verdict.reason})
        command = trust.revocation(state, node, actor, f"re-attestation failed: {verdict.reason}", root_key, now)
        if isinstance(command, Refused):
            return [failed, Emit("attestation", f"{node.name} not revoked: {command.text}", {"node": node.name})]
        return [failed, trust.revoke(node, command, self.own_id, actor)]


def after_attested(node: NodeRecord, result: Result) -> list[Effect]:
    if isinstance(result, Ok):
        return [RenewCertificate(node)]
    return [Emit("attestation", f"re-attestation of {node.name} not recorded: {result.text}",
                 {"node": node.name, "code": result.code})]
