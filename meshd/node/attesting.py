"""Re-attestation on the leader: who is asked for fresh evidence, and what the answer earns.

A member that passes gets `attested` committed and then, only once that committed, a fresh
membership certificate; a quarantined member is released by it. A member whose evidence is
authentic but shows software the policy does not know (an upgrade not allowed yet:
`Verdict.unknown_software`) is quarantined: its workloads move and it gets no secret, and it
is asked again every QUARANTINE_RECHECK and at once when the policy changes, so it comes back
on its own once the operator allows its digest. Any other failure (forged, replayed, another
node's, a TPM that does not vouch for it) revokes it (audit actor `attestation@<leader>`),
through the one revocation flow of meshd.node.trust. A member that could not be asked is
asked again after a delay.

Invariants:
- Pure: `now` is the wall clock the state's timestamps use (evidence freshness, due dates);
  `mono` the monotonic clock for retry delays.
- One member per pass: attestation never crowds out the leader's other duties.
- A certificate is renewed only after an `Ok` for `attested`; a refused `attested` or a
  refused revocation changes nothing else and says why.
- Unknown software alone never revokes: revocation for it stays the operator's decision.
- A member's clock is never a reason to sentence it: freshness is the leader's nonce
  (attestation.verifier); a clock more than MAX_CLOCK_SKEW off the leader's is told in an
  event naming how far.
- A leader's own failed evidence is reported, never acted on by itself; no re-attestation
  revokes the last voter or the last member of the site (meshd.node.trust.expulsion_problem).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from attestation.evidence import MEASURED_PACKAGE
from attestation.policy import MAX_CLOCK_SKEW
from attestation.signed import AttestationError
from attestation.verifier import Challenge as EvidenceChallenge
from attestation.verifier import TpmBinding
from attestation.verifier import verify as verify_evidence
from meshd import admission
from meshd.commands import MAX_AUDIT_REASON, MAX_CLOCK_SKEW_SHOWN, Attested, Ok, Quarantine, Refused, Result
from meshd.node import trust
from meshd.node.effects import Commit, Effect, Emit, RenewCertificate
from meshd.reattest import due_for_attestation
from meshd.state import NodeRecord, SiteState

# A member that could not be asked (unreachable, timed out) is asked again after this long.
RETRY_DELAY = 10.0
# A quarantined member is asked again this often without a policy change (a change of policy
# asks at once): a net for a policy change this leader did not see happen, cheap enough (one
# challenge a minute per quarantined member).
QUARANTINE_RECHECK = 60.0


@dataclass
class Attesting:
    """The leader's re-attestation bookkeeping: which members to leave alone for a while."""

    leader_name: str
    own_id: str
    interval: float  # seconds between re-attestations of a member (config reattest_interval)
    retry_after: dict[str, float] = field(default_factory=dict)  # node id -> mono time to ask again
    policy_seen: str = ""  # the signature of the policy in force when last looked

    def next_due(self, state: SiteState, now: float, mono: float) -> NodeRecord | None:
        """The member to challenge now, most urgent first, or None."""
        policy = str(state.policy.get("sig", "")) if isinstance(state.policy, dict) else ""
        if policy != self.policy_seen:
            self.policy_seen = policy  # a new policy may allow what quarantined members run
            for node in state.nodes.values():
                if node.quarantine:
                    self.retry_after.pop(node.node_id, None)
        for node_id in due_for_attestation(state, now, self.interval):
            if self.retry_after.get(node_id, 0.0) <= mono:
                return state.nodes[node_id]
        return None

    def unreachable(self, node: NodeRecord, mono: float) -> None:
        self.retry_after[node.node_id] = mono + RETRY_DELAY

    def appraise(self, state: SiteState, node: NodeRecord, evidence: object, nonce: bytes, issued_at: float,
                 now: float, root_key: Ed25519PrivateKey | None, mono: float) -> list[Effect]:
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
        skewed: list[Effect] = []
        if abs(verdict.clock_skew) > MAX_CLOCK_SKEW:
            # Told, never sentenced: freshness was the nonce's (attestation.verifier).
            skewed.append(Emit("attestation", f"the clock of {node.name} is {abs(verdict.clock_skew):.0f}s "
                                              f"{'ahead of' if verdict.clock_skew > 0 else 'behind'} the leader's",
                               {"node": node.name, "clock_skew_s": round(verdict.clock_skew, 1)}))
        if verdict.ok:
            assert verdict.claims is not None
            effects: list[Effect] = skewed
            if node.attested_boot_id and verdict.claims.boot_id != node.attested_boot_id:
                effects.append(Emit("attestation", f"{node.name} re-attested after a reboot", {"node": node.name}))
            effects.append(Commit(Attested(node_id=node.node_id, boot_id=verdict.claims.boot_id,
                                           software=verdict.claims.measurements[MEASURED_PACKAGE],
                                           actor=f"attestation@{self.leader_name}",
                                           clock_skew=max(-MAX_CLOCK_SKEW_SHOWN,
                                                          min(MAX_CLOCK_SKEW_SHOWN, round(verdict.clock_skew, 1)))),
                                  then=lambda result, _state: after_attested(node, result)))
            return effects
        actor = f"attestation@{self.leader_name}"
        failed = Emit("attestation", f"{node.name} failed re-attestation: {verdict.reason}",
                      {"node": node.name, "reason": verdict.reason})
        if node.node_id == self.own_id:
            # A leader does not sentence itself (it would quarantine or revoke the node doing
            # the judging, mid-pass); it says so, and a next leader appraises it.
            self.retry_after[node.node_id] = mono + QUARANTINE_RECHECK
            return [*skewed, failed, Emit("attestation", f"{node.name} leads the site: its own failed evidence is left "
                                                          "to the next leader to judge", {"node": node.name})]
        if verdict.unknown_software:
            assert verdict.claims is not None
            self.retry_after[node.node_id] = mono + QUARANTINE_RECHECK
            return [*skewed, failed, quarantine(node, verdict.claims.version,
                                                verdict.claims.measurements[MEASURED_PACKAGE], verdict.reason, actor)]
        command = trust.revocation(state, node, actor, f"re-attestation failed: {verdict.reason}", root_key, now,
                                   own_id=self.own_id)
        if isinstance(command, Refused):
            return [*skewed, failed, Emit("attestation", f"{node.name} not revoked: {command.text}",
                                          {"node": node.name})]
        return [*skewed, failed, trust.revoke(node, command, self.own_id, actor)]


def quarantine_reason(version: str, digest: str) -> str:
    """What a quarantined member's record, event and audit say: the build, whole, and how to
    let it back."""
    return (f"meshd {version} with package digest {digest} is not in the attestation policy; allow it with "
            f"`meshctl policy allow --version {version} --digest {digest}`")[:MAX_AUDIT_REASON]


def quarantine(node: NodeRecord, version: str, digest: str, verifier_reason: str, actor: str) -> Commit | Emit:
    """The command that quarantines `node` for running `version`/`digest` (nothing when it
    is already quarantined for that very build)."""
    reason = quarantine_reason(version, digest)
    if node.quarantine == reason:
        return Emit("attestation", f"{node.name} stays quarantined: {verifier_reason}", {"node": node.name})
    return Commit(Quarantine(node_id=node.node_id, reason=reason, software=digest, actor=actor),
                  then=lambda result, _state: after_quarantine(node, result))


def after_quarantine(node: NodeRecord, result: Result) -> list[Effect]:
    if isinstance(result, Ok):
        return []  # the state machine's event says it, on every member
    return [Emit("attestation", f"quarantine of {node.name} not recorded: {result.text}",
                 {"node": node.name, "code": result.code})]


def after_attested(node: NodeRecord, result: Result) -> list[Effect]:
    if isinstance(result, Ok):
        return [RenewCertificate(node)]
    return [Emit("attestation", f"re-attestation of {node.name} not recorded: {result.text}",
                 {"node": node.name, "code": result.code})]
