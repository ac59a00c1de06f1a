"""The verifier: one pure decision on one piece of evidence (RATS RFC 9334: the verifier
appraises the attester's evidence against reference values and policy; the relying party,
the site leader's admission, acts on the verdict).

Checks, in order, each failure a reason the operator sees:
1. the evidence is signed by the key of the node it names (forged or tampered: refused);
2. its nonce is the one this verifier issued to this node (replayed evidence, another
   node's nonce), and that challenge is still fresh on the verifier's own clock: answered
   within NONCE_TTL and the policy's evidence_max_age of being issued (stale nonce);
3. (not a check) the attester's own clock: the time its evidence says it was made is only
   compared with the verifier's, as `clock_skew`, for the relying party to report. Edge
   boards boot without a real-time clock and step by hours when NTP comes back; freshness
   is the nonce's, so a skewed clock is never a reason to refuse (or to revoke) a node;
4. the node is not revoked;
5. the software: a version at least the policy minimum, and a package digest the policy
   lists for that version;
6. TPM: for a node whose attestation key is bound (at its join, by credential activation),
   the evidence must carry a quote by that key over the measurement PCR, bound to this
   nonce, whose event log replays to the quoted value and ends with the claimed package
   digest (attestation.tpm); a bound node that sends software-only evidence is refused (a
   downgrade). A site whose policy requires TPM-backed evidence refuses software-only
   evidence.

Invariants:
- Pure: no I/O; `now` is passed in (seconds since the epoch, the verifier's clock).
- `verify` never raises on bad evidence; it returns a Verdict with `ok=False` and reasons.
- A verdict is `ok` only when every check passed; it lists every failed check it reached.
- `unknown_software` is set only when the software check (5) is the one that failed: the
  evidence is authentic, fresh and from this node, it just runs a build the policy does not
  know (an upgrade not allowed yet). Its relying party may quarantine rather than revoke;
  forged, replayed or downgraded evidence never sets it.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from attestation.evidence import EVIDENCE_KIND, MEASURED_PACKAGE, Claims, parse_claims
from attestation.policy import Policy, allows_version
from attestation.revocation import RevocationList
from attestation.signed import AttestationError, open_document
from attestation.tpm import appraise_quote, parse_public

# A challenge is answered within seconds (a round trip and a measurement); a minute covers a
# slow board hashing its package files, and is short enough that a nonce is worthless later.
NONCE_TTL = 60.0


@dataclass(frozen=True)
class Challenge:
    nonce: str  # hex, single use
    node_id: str  # the node it was issued to
    issued_at: float  # verifier's clock


@dataclass(frozen=True)
class TpmBinding:
    """What the verifier knows of a node's TPM: its attestation key (TPM2B_PUBLIC bytes),
    and on a join the credential secret only that TPM can have recovered."""
    ak_public: bytes
    credential: bytes | None = None


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reasons: tuple[str, ...]
    claims: Claims | None = None
    tpm_backed: bool = False
    unknown_software: bool = False  # only the software check failed (see the invariants)
    clock_skew: float = 0.0  # the attester's clock less the verifier's, seconds (check 3)

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons) if self.reasons else "evidence verified"


def verify(evidence: object, challenge: Challenge, node_public_key: bytes, policy: Policy, site: str, now: float,
           revocations: RevocationList | None = None, tpm: TpmBinding | None = None) -> Verdict:
    try:
        body = open_document(evidence, EVIDENCE_KIND, node_public_key)
        claims = parse_claims(body)
    except AttestationError as e:
        return Verdict(False, (str(e),))
    reasons: list[str] = []
    if claims.node_id != challenge.node_id:
        reasons.append(f"evidence is about node {claims.node_id}, the challenge was for {challenge.node_id}")
    if claims.nonce != challenge.nonce:
        reasons.append("evidence answers another challenge (replayed, or another node's nonce)")
    ttl = min(NONCE_TTL, policy.evidence_max_age)
    if now - challenge.issued_at > ttl:
        reasons.append(f"challenge expired {now - challenge.issued_at - ttl:.0f}s ago (stale nonce)")
    if revocations is not None and revocations.is_revoked(claims.node_id):
        entry = revocations.entries[claims.node_id]
        reasons.append(f"node {claims.node_id} is revoked ({entry.reason or 'no reason given'}, by {entry.by})")
    other_failures = len(reasons)
    if not allows_version(policy, claims.version):
        reasons.append(f"meshd {claims.version} is older than the policy minimum {policy.min_version}")
    allowed = policy.allowed_digests.get(claims.version, frozenset())
    if claims.measurements[MEASURED_PACKAGE] not in allowed:
        # The full digest: the operator allows it with `meshctl policy allow` as it stands here.
        reasons.append(f"meshd {claims.version} package digest {claims.measurements[MEASURED_PACKAGE]} "
                       "is not a reference value of the policy (modified or unknown software)")
    software_failures = len(reasons) - other_failures
    tpm_backed = False
    if tpm is not None:
        tpm_reasons = _appraise_tpm(claims, tpm)
        reasons.extend(tpm_reasons)
        tpm_backed = not tpm_reasons
    if site in policy.tpm_required_sites and tpm is None:
        reasons.append(f"site {site} requires TPM-backed evidence; this evidence is software-only (self-reported)")
    unknown = software_failures > 0 and software_failures == len(reasons) and other_failures == 0
    return Verdict(not reasons, tuple(reasons), claims, tpm_backed=tpm_backed, unknown_software=unknown,
                   clock_skew=claims.issued_at - now)


def _appraise_tpm(claims: Claims, binding: TpmBinding) -> list[str]:
    if claims.tpm is None:
        return ["the node's evidence is TPM-backed, this evidence carries no quote (software-only)"]
    if binding.credential is not None and not hmac.compare_digest(bytes.fromhex(claims.tpm.credential),
                                                                  binding.credential):
        return ["TPM credential activation failed: the attestation key is not in the TPM of the endorsement key"]
    try:
        ak = parse_public(binding.ak_public, "attestation key")
        quote, signature = bytes.fromhex(claims.tpm.quote), bytes.fromhex(claims.tpm.signature)
    except (AttestationError, ValueError) as e:
        return [f"TPM: {e}"]
    return appraise_quote(ak, quote, signature, list(claims.tpm.events), claims.nonce, claims.node_id,
                          claims.measurements[MEASURED_PACKAGE])
