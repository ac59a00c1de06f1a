"""Who may become a member: the one admission decision of the join path (pure).

A member of the site (the verifier) hands a joiner a fresh challenge; the joiner answers with
a join request carrying its evidence (attestation.evidence, bound to the challenge's nonce).
`decide()` turns (site state, challenge, request, now) into a verdict with reasons: the token,
the node key, and the evidence appraised by attestation.verifier against the site's policy
and revocation list (both signed by the mesh root). A joiner with a TPM names its endorsement
and attestation keys in its hello; the challenge then carries a credential for them
(attestation.tpm.make_credential) that only that TPM can open, and the evidence must return
its secret and a quote by that attestation key. The site then commits the admission through
Raft, where the token is re-checked and consumed atomically (see meshd.sitestate), so two
members cannot admit on one token.

A token this site issued for another site (`meshctl token create --site NEW`) is a founder
token: its holder asks for site NEW and is checked exactly like a joiner (token proof, node
signature, evidence against this site's policy and revocation list, TPM binding), except
that it need not ask for this site; the verdict names the site it founds. The site then
commits `found_site` (the token is consumed, the founder is not added to this site's
members) and the welcome hands the founder what it needs to start site NEW in this mesh.

Invariants:
- Every refusal carries reasons the joiner and the operator can read.
- No I/O, no clock: `now` is passed in. The challenge's nonce is single-use: the caller
  discards a challenge after one decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from attestation.policy import Policy, open_policy
from attestation.revocation import RevocationList, open_revocations
from attestation.signed import AttestationError
from attestation.tpm import TpmError, check_attestation_key, check_endorsement_key, make_credential, parse_public
from attestation.verifier import Challenge as EvidenceChallenge
from attestation.verifier import TpmBinding
from attestation.verifier import verify as verify_evidence
from meshd import tokens
from meshd.sitestate import check_founder_token, check_token, is_founder_token
from meshd.state import ADMIN_LEFT, ADMIN_REVOKED, SiteState

# A challenge answered later than this is stale: long enough for a slow device over a
# lossy link, short enough that a captured challenge is useless soon after.
CHALLENGE_TTL = 30.0


@dataclass(frozen=True)
class TpmChallenge:
    ak_public: bytes  # the joiner's attestation key (TPM2B_PUBLIC), recorded once admitted
    credential: bytes  # the secret encrypted to its endorsement key for that attestation key
    id_object: bytes  # what the joiner's TPM activates (TPM2B_ID_OBJECT)
    encrypted_secret: bytes  # (TPM2B_ENCRYPTED_SECRET)

    def to_wire(self) -> dict:
        return {"id_object": self.id_object.hex(), "encrypted_secret": self.encrypted_secret.hex()}


def tpm_challenge(keys: object, credential: bytes, seed: bytes) -> TpmChallenge:
    """The credential challenge for a joiner's TPM keys ({"ek": hex, "ak": hex} TPM2B_PUBLIC);
    TpmError with the reason when the keys are unfit. `credential`, `seed`: fresh random."""
    if not isinstance(keys, dict) or not isinstance(keys.get("ek"), str) or not isinstance(keys.get("ak"), str):
        raise TpmError("tpm keys must be {\"ek\": hex, \"ak\": hex}")
    try:
        ek_bytes, ak_bytes = bytes.fromhex(keys["ek"]), bytes.fromhex(keys["ak"])
    except ValueError:
        raise TpmError("tpm keys must be hex") from None
    ek, ak = parse_public(ek_bytes, "endorsement key"), parse_public(ak_bytes, "attestation key")
    unfit = check_endorsement_key(ek) + check_attestation_key(ak)
    if unfit:
        raise TpmError("; ".join(unfit))
    id_object, encrypted_secret = make_credential(ek, ak.name, credential, seed)
    return TpmChallenge(ak_bytes, credential, id_object, encrypted_secret)


@dataclass(frozen=True)
class Challenge:
    nonce: bytes
    member_eph: bytes  # the verifier's X25519 public key for this handshake
    issued_at: float
    tpm: TpmChallenge | None = None  # set when the joiner named TPM keys

    def fresh(self, now: float) -> bool:
        return self.issued_at <= now <= self.issued_at + CHALLENGE_TTL


@dataclass(frozen=True)
class JoinRequest:
    token_id: str
    node: dict  # the NodeRecord fields the joiner claims (see sitestate.node_to_plain)
    joiner_eph: bytes
    proof: str  # HMAC of the transcript with the token secret
    signature: str  # Ed25519 signature of the transcript with the node key
    evidence: object = None  # signed evidence whose nonce is the challenge's nonce


@dataclass(frozen=True)
class Verdict:
    admit: bool
    reasons: tuple[str, ...] = field(default_factory=tuple)
    founds: str = ""  # the new site a founder token's holder founds; "" for a join of this site

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons) if self.reasons else "admitted"


def transcript_for(challenge: Challenge, request: JoinRequest) -> bytes:
    return tokens.join_transcript(challenge.nonce, request.joiner_eph, challenge.member_eph, request.token_id,
                                  request.node)


def site_trust(state: SiteState) -> tuple[Policy, RevocationList]:
    """The policy and revocation list in force, opened with the site's root key; raises
    AttestationError (or ValueError for a damaged root) when they do not verify."""
    root = bytes.fromhex(state.trust_root)
    return open_policy(state.policy, root), open_revocations(state.revocations, root)


def _appraise(state: SiteState, challenge: Challenge, request: JoinRequest, node_id: str, public_key: bytes,
              now: float, site: str) -> list[str]:
    """The attestation part of the decision: reasons, empty when the evidence verifies.
    `site`: the site the node will belong to (its per-site policy rules apply)."""
    if not state.trust_root:
        return ["this site has no trust root to appraise evidence with"]
    if request.evidence is None:
        return ["attestation: the join request carries no evidence"]
    try:
        policy, revocations = site_trust(state)
    except (ValueError, AttestationError) as e:
        return [f"attestation: the site's trust documents do not verify ({e})"]
    binding = TpmBinding(challenge.tpm.ak_public, challenge.tpm.credential) if challenge.tpm else None
    verdict = verify_evidence(request.evidence, EvidenceChallenge(challenge.nonce.hex(), node_id, challenge.issued_at),
                              public_key, policy, site, now, revocations, binding)
    return [f"attestation: {r}" for r in verdict.reasons]


def decide(state: SiteState, challenge: Challenge, request: JoinRequest, now: float) -> Verdict:
    reasons: list[str] = []
    if not challenge.fresh(now):
        reasons.append("challenge expired; start the join again")
    node = request.node
    try:
        public_key = bytes.fromhex(node["public_key"])
        claimed_id = node["node_id"]
    except (KeyError, TypeError, ValueError):
        return Verdict(False, ("join request lacks a valid public key and node id",))
    if len(public_key) != 32 or tokens.node_id_for(public_key) != claimed_id:
        reasons.append("node id does not derive from the node's public key")
    transcript = transcript_for(challenge, request)
    if not tokens.signature_matches(public_key, transcript, request.signature):
        reasons.append("signature over the join transcript does not verify with the node key")
    existing = state.nodes.get(claimed_id)
    if existing is not None and existing.admin == ADMIN_REVOKED:
        reasons.append("node was revoked and may never be admitted again")
    founding = is_founder_token(state, request.token_id)
    asked = node.get("site")
    if founding:
        # The site it founds is checked against the token below; it is not this one.
        token_problem = check_founder_token(state, request.token_id, claimed_id, asked if isinstance(asked, str)
                                            else "", now)
        if existing is not None and existing.admin not in (ADMIN_LEFT, ADMIN_REVOKED):
            reasons.append(f"node is a member of site {state.site!r}; a node belongs to one site")
    else:
        token_problem = check_token(state, request.token_id, claimed_id, now)
        if asked != state.site:
            reasons.append(f"node asks for site {asked!r}, this is site {state.site!r}")
    site = asked if founding and isinstance(asked, str) else state.site
    reasons.extend(_appraise(state, challenge, request, claimed_id, public_key, now, site))
    if token_problem:
        reasons.append(token_problem)
    else:
        secret = bytes.fromhex(state.tokens[request.token_id].secret)
        if not tokens.proof_matches(secret, transcript, request.proof):
            reasons.append("token proof does not match: the joiner does not hold this token")
    return Verdict(not reasons, tuple(reasons), founds=site if founding and not reasons else "")
