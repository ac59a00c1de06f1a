"""The member side of a join: can this member decide, and what does each "no" mean for the
joiner. The verdict itself is meshd.admission's.

A refusal travels to the joiner with a code:
- `retry-elsewhere`: this member cannot decide (it holds no state of its site yet: it is
  joining too, or replaying its journal; or it cannot issue certificates). The joiner asks
  another member, the leader first when this member names one.
- `retry-later`: the site could not commit the admission now (an election, a busy leader).
- `denied`: a verdict (bad token, revoked node, evidence that does not verify). Every member
  decides from the same replicated state, so asking another one will not help.

Invariants:
- Pure. A member without the site's state never says `denied`; a member that does not know
  the token never says `denied` either.
- Only voters receive the mesh root key.
- Every refusal carries a reason the joiner logs and shows.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshd.admission import Verdict
from meshd.commands import NOT_FOUND, AdmitNode, FoundSite, Invalid, Ok, Refused, node_from_wire
from meshd.state import ADMIN_LEFT, ADMIN_REVOKED, SiteState

RETRY_ELSEWHERE = "retry-elsewhere"
RETRY_LATER = "retry-later"
DENIED = "denied"
JOIN_REFUSAL_CODES = frozenset({RETRY_ELSEWHERE, RETRY_LATER, DENIED})


@dataclass(frozen=True)
class JoinRefusal:
    code: str
    reason: str
    leader: str | None = None  # the peer address of this member's leader, when it knows one

    def to_wire(self) -> dict:
        wire = {"type": "refused", "code": self.code, "reason": self.reason}
        if self.leader:
            wire["leader"] = self.leader
        return wire

    @classmethod
    def from_wire(cls, message: dict) -> "JoinRefusal":
        code = message.get("code")
        leader = message.get("leader")
        # A refusal without a known code (an older meshd, another mesh's member) is no
        # verdict this joiner can rely on: ask elsewhere rather than give up for good.
        return cls(code=code if code in JOIN_REFUSAL_CODES else RETRY_ELSEWHERE,
                   reason=str(message.get("reason") or "join refused")[:1000],
                   leader=leader if isinstance(leader, str) and len(leader) <= 64 else None)


def cannot_decide(state: SiteState, member: bool, leader: str | None, site: object = None) -> JoinRefusal | None:
    """Why this member cannot decide a join now (it holds no state of its site, or no token
    for the `site` the joiner's hello names: a member of another site), or None. Answered
    before any challenge, and naming only what the joiner said: an unauthenticated caller
    learns nothing of this site from it."""
    if not member:
        return JoinRefusal(RETRY_ELSEWHERE, "this node is not a member of any site yet", leader)
    if not state.site or not state.trust_root:
        return JoinRefusal(RETRY_ELSEWHERE, "this member holds no state of its site yet (it is joining or "
                                            "starting); ask another member", leader)
    if isinstance(site, str) and site and site != state.site \
            and not any(t.site == site for t in state.tokens.values()):
        return JoinRefusal(RETRY_ELSEWHERE, f"this member holds no join token for site {site[:64]!r}; "
                                            "ask a member of that site")
    return None


def cannot_issue(root_cert: str, has_root_key: bool, leader: str | None) -> JoinRefusal | None:
    if not has_root_key or not root_cert:
        return JoinRefusal(RETRY_ELSEWHERE, "this member cannot issue certificates (no mesh root key); "
                                            "ask a voter", leader)
    return None


def verdict_refusal(state: SiteState, verdict: Verdict, token_id: str) -> JoinRefusal:
    """A verdict is final, except when this member does not know the token: it may not have
    caught up with the token's creation yet, or be a member of another site or another mesh
    (a `--peer` elsewhere, a second mesh on the same LAN); it is no judge of this join."""
    if token_id not in state.tokens:
        return JoinRefusal(RETRY_ELSEWHERE, f"{verdict.reason} (this member does not know this token; "
                                            "ask another)")
    return JoinRefusal(DENIED, verdict.reason)


def commit_refusal(result: Refused) -> JoinRefusal:
    """The state machine refused the admission: a verdict, except when it did not know the
    token yet (a member that has not caught up with the token's creation)."""
    return JoinRefusal(RETRY_ELSEWHERE if result.code == NOT_FOUND else DENIED, result.text)


def not_committed(reason: str, what: str) -> JoinRefusal:
    return JoinRefusal(RETRY_LATER, f"site could not commit the {what}: {reason}")


def admission_command(state: SiteState, verdict: Verdict, token_id: str, node: dict, tpm_ak: str,
                      actor: str) -> AdmitNode | FoundSite | JoinRefusal:
    """The command that admits a verified joiner (or lets it found its site). The attestation
    key on record is the one this verifier bound (`tpm_ak`), never one the joiner names."""
    try:
        record = node_from_wire(dict(node) | {"tpm_ak": tpm_ak})
    except Invalid as e:
        return JoinRefusal(DENIED, str(e))
    if verdict.founds:
        # A founder token's holder founds its own site: the token is consumed here, but it
        # does not become a member of this site.
        return FoundSite(token_id=token_id, node=record, actor=actor)
    return AdmitNode(token_id=token_id, node=record, actor=actor)


def welcome(state: SiteState, result: Ok, founds: str, joiner_id: str, *, mesh_id: str, site: str,
            site_secret: str, root_key: str, member_cert: str) -> dict:
    """What an admitted joiner receives (sealed to it): a member of this site gets the Raft
    secret, its role and the voters to reach; only a voter gets the mesh root key (voters
    issue certificates). A founder of a new site gets what its bootstrap needs: a certificate
    for that site, the root key and the root-signed trust documents."""
    if founds:
        return {"mesh_id": mesh_id, "site": founds, "founder": True, "member_cert": member_cert,
                "root_cert": state.root_cert, "root_key": root_key, "trust_root": state.trust_root,
                "policy": state.policy, "revocations": state.revocations}
    partners = sorted(n.raft_address for n in state.nodes.values() if n.voter and n.admin not in (
        ADMIN_LEFT, ADMIN_REVOKED) and n.node_id != joiner_id)
    message = {"mesh_id": mesh_id, "site": site, "site_secret": site_secret, "voter": bool(result["voter"]),
               "partners": partners, "member_cert": member_cert, "root_cert": state.root_cert}
    if result["voter"]:
        message["root_key"] = root_key
    return message
