"""What follows a revocation, decided once for every path that revokes (an operator's
`meshctl revoke`, a failed re-attestation).

The flow: a `RevokeNode` command carrying the next root-signed revocation list; once it is
applied, the node is told (Raft may never reach it again) and the Raft secret is rotated (an
epoch reserved through Raft, then a fresh secret to every current member). A refused
revocation changes nothing and is followed by nothing: the node is not told it was revoked,
and the secret stays.

Invariants:
- Pure: signing with the root key is computation; the wall clock comes in as `now`.
- A follow-up runs only on an `Ok`; every `Refused` becomes an event with its reason.
- A revocation never expels the node that makes it, the last voters of its site, so many
  voters that those left (and not down) could not commit their removal from the Raft
  configuration (quorum lost for good), or the last member
  (`expulsion_problem`): refused with the reason. An operator may `--force` all but the
  self-expulsion; an automatic revocation (re-attestation) is never forced.
- The secret goes to current members only (not left, not revoked, not quarantined, not
  this node); a quarantined member asks for it again once it is released.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from attestation.revocation import open_revocations, sign_revocations
from attestation.signed import AttestationError
from meshd.commands import CONFLICT, INTERNAL, UNTRUSTED, Ok, Refused, Result, RevokeNode, RotateSecret
from meshd.node.effects import Commit, DistributeSecret, Effect, Emit, TellRevoked
from meshd.state import ADMIN_LEFT, ADMIN_REVOKED, LIVENESS_DOWN, NodeRecord, SiteState

# Reasons are shown in tables and stored in the revocation list: a line, not an essay.
MAX_REASON = 200


def expulsion_problem(state: SiteState, expelled: set[str], own_id: str) -> tuple[str, bool] | None:
    """Why expelling the members `expelled` (node ids) would wreck the site, and whether an
    operator may force it anyway; None when it is safe. Expelling the node that does it is
    never allowed (it would cut itself off mid-operation); the last voters or a majority of
    them (the site loses its quorum for good) and the last member (nothing is left to run or
    to rejoin) may be forced."""
    if own_id and own_id in expelled:
        return "it would expel this node itself, the one doing it; run it on another member", False
    current = [n for n in state.nodes.values() if n.admin not in (ADMIN_LEFT, ADMIN_REVOKED)]
    staying = [n for n in current if n.node_id not in expelled]
    if current and not staying:
        return f"it would expel every member of site {state.site}", True
    voters = [n for n in current if n.voter]
    if voters and not any(n.voter for n in staying):
        return f"it would expel the last voters of site {state.site}, which then can never agree on anything again", \
            True
    # The expelled voters stop at once and leave the Raft configuration one at a time; each
    # removal takes effect as it is appended and commits on a majority of the configuration
    # without it. The first is the hardest: a majority of the voters less one, from those
    # staying and not down (voters already down cannot help).
    able = [n for n in staying if n.voter and n.liveness != LIVENESS_DOWN]
    needed = (len(voters) - 1) // 2 + 1
    if any(n.voter and n.node_id in expelled for n in current) and len(able) < needed:
        return (f"it would leave {len(able)} of the {len(voters)} voters of site {state.site} able to agree "
                f"({needed} needed): the site would lose its quorum for good"), True
    return None


def revocation(state: SiteState, node: NodeRecord, actor: str, reason: str, root_key: Ed25519PrivateKey | None,
               now: float, *, own_id: str = "", force: bool = False) -> RevokeNode | Refused:
    """The command that revokes `node`: the next revocation list, naming it, signed with the
    mesh root key (which only voters hold); or why it cannot be made here (`own_id`: the node
    making it; `force`: an operator's override of what `expulsion_problem` lets one force)."""
    problem = expulsion_problem(state, {node.node_id}, own_id)
    if problem is not None and not (force and problem[1]):
        return Refused(CONFLICT, f"not revoking {node.name}: {problem[0]}" + (" (--force does it anyway)"
                                                                             if problem[1] else ""))
    if root_key is None or not state.trust_root:
        return Refused(UNTRUSTED, "only a voter holds the mesh root key; run this on a voter")
    try:
        current = open_revocations(state.revocations, bytes.fromhex(state.trust_root))
    except (ValueError, AttestationError) as e:
        return Refused(UNTRUSTED, f"the site's revocation list does not verify: {e}")
    reason = reason[:MAX_REASON]
    updated = current.with_revoked(node.node_id, now, actor, reason)
    return RevokeNode(node_id=node.node_id, revocations=sign_revocations(root_key, updated), reason=reason,
                      number=updated.number, actor=actor)


def revoke(node: NodeRecord, command: RevokeNode, own_id: str, rotating_actor: str) -> Commit:
    """Commit the revocation; what follows depends on its outcome (`after_revocation`)."""
    return Commit(command, then=lambda result, _state: after_revocation(node, command, result, own_id,
                                                                          rotating_actor))


def after_revocation(node: NodeRecord, command: RevokeNode, result: Result, own_id: str,
                     rotating_actor: str) -> list[Effect]:
    if not isinstance(result, Ok):
        return [Emit("membership", f"revocation of {node.name} refused: {result.text}", {"node": node.name,
                                                                                          "code": result.code})]
    return [TellRevoked(node, command.revocations), rotate_secret(own_id, rotating_actor)]


def rotate_secret(own_id: str, actor: str) -> Commit:
    """Reserve the next secret epoch through Raft; the secret follows (`after_rotation`)."""
    return Commit(RotateSecret(actor=actor), then=lambda result, state: after_rotation(state, own_id, result))


def after_rotation(state: SiteState, own_id: str, result: Result) -> list[Effect]:
    """Once the epoch is reserved: the new secret goes to every current member."""
    if not isinstance(result, Ok):
        return [Emit("membership", f"Raft secret not rotated: {result.text}", {"code": result.code})]
    epoch = result.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        return [Emit("membership", "Raft secret not rotated: the epoch was not reserved", {"code": INTERNAL})]
    members = tuple(sorted((n for n in state.nodes.values() if n.node_id != own_id
                            and n.admin not in (ADMIN_LEFT, ADMIN_REVOKED) and not n.quarantine),
                           key=lambda n: n.name))
    return [DistributeSecret(epoch, members)]


def after_adoption(before: SiteState, result: Result, revocations: dict, own_id: str, actor: str) -> list[Effect]:
    """Revocations made elsewhere joined the site's list: the members of this site they name
    are told, and the secret rotated once for all of them."""
    if not isinstance(result, Ok):
        return [Emit("membership", f"revocations from other sites not taken in: {result.text}",
                     {"code": result.code})]
    expelled = [before.nodes[n] for n in result.get("added", []) if n in before.nodes
                and before.nodes[n].admin not in (ADMIN_LEFT, ADMIN_REVOKED)]
    if not expelled:
        return []
    return [*(TellRevoked(node, revocations) for node in expelled), rotate_secret(own_id, actor)]
