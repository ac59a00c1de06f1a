"""The site's Raft state machine: `apply(state, command) -> Ok | Refused`.

Every member applies the same committed commands in the same order, so this module is the
whole definition of what the site agrees on. Commands arrive in their wire form and are
decoded by meshd.commands (which checks every field); each handler here takes the typed
command and decides against the state.

Invariants:
- Deterministic: the result depends only on `state` and `command`. Time comes from the
  command's `ts` (the proposer's clock), never from a clock here; iteration follows dict
  insertion order, which is the same on every member.
- Never raises: pysyncobj wedges the whole cluster when a replicated method raises, so every
  failure is returned as a `Refused(code, text)` and leaves the state untouched.
- Idempotent by request id: a command whose outcome was unknown to its sender (a failover in
  flight) may be retried with the same `request_id`; the retry gets the first result back
  and changes nothing.
- Validation happens before the first write of a command, so a refused command changes
  nothing (the one exception is `state.applied`, the count of entries applied, which every
  member moves alike).
- A replica that its node's meshd stopped (told to, or shutting down) never counts as
  having run its course: the report makes it a stopped allocation the site replaces.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import replace
from typing import Any, Callable

from attestation.policy import newer as policy_is_newer
from attestation.policy import open_policy
from attestation.policy import rank as policy_rank
from attestation.revocation import open_revocations
from attestation.revocation import supersedes as revocations_supersede
from attestation.signed import AttestationError
from crdt.schema import AppEdit, winning_order
from meshd import commands as cmds
from meshd.commands import CONFLICT, NOT_FOUND, NOT_MEMBER, REVOKED, STALE, TOKEN, UNTRUSTED, Ok, Refused, Result
from meshd import rollout
from meshd.artifacts import catalog
from meshd.deployments import version_missing
from meshd import spec as specmod
from meshd.placement.plan import Plan, recheck_plan
from meshd.state import (
    KEPT_CHAINS,
    ADMIN_ACTIVE,
    ADMIN_DRAINING,
    ADMIN_LEFT,
    ADMIN_REVOKED,
    ALLOC_LOST,
    ALLOC_PENDING,
    ALLOC_RUNNING,
    ALLOC_STOPPED,
    ALLOC_TERMINAL,
    APP_RUNNING,
    APP_STOPPED,
    DEPLOY_AWAITING,
    DEPLOY_CANCELLED,
    DEPLOY_FAILED,
    DEPLOY_PAUSED,
    DEPLOY_REVERTED,
    DEPLOY_RUNNING,
    DEPLOY_SUCCEEDED,
    DESIRED_RUN,
    DESIRED_STOP,
    HEALTH_NONE,
    HEALTH_UNHEALTHY,
    LIVENESS_DOWN,
    LIVENESS_JOINING,
    VERSION_FAILED,
    VERSION_REVERTED,
    VERSION_RUNNING,
    VERSION_STABLE,
    VERSION_SUPERSEDED,
    Alloc,
    AppRecord,
    AppVersion,
    AuditRecord,
    Deployment,
    Event,
    JoinToken,
    NodeRecord,
    SiteState,
    UpdatePolicy,
)

# Raft elections need a majority of voters; more than five voters only slows every commit
# (each must reach a majority) without surviving more realistic failures, so later members
# replicate as non-voters.
MAX_VOTERS = 5
# Retried commands arrive within seconds of the original; ten thousand remembered request
# ids cover minutes of the busiest site while keeping snapshots small.
MAX_REMEMBERED_REQUESTS = 10_000
# A request id is forgotten sooner once the site's clock (last_ts) is this far past the
# command: a retry comes within about 35 s of the first try (meshd.io.context.commit's
# retry_until, the admin's WRITE_RETRY_WINDOW), and ten minutes leave room for an entry that
# commits late (a leader regaining quorum). So a quiet or steady site keeps minutes of them,
# not 10,000 however long that took to fill.
REQUEST_MEMORY_S = 600.0
# ... but the newest this many stay whatever the clocks say: a member whose clock runs ahead
# moves the site's clock forward, and must not make it forget the retries of the last moments.
MIN_REMEMBERED_REQUESTS = 1_000
# Bounded histories keep the replicated snapshot small; the cross-site audit log is the
# durable record, these are for `meshctl events` / `audit` on the site.
MAX_EVENTS = 2_000
MAX_AUDIT = 10_000


class CommandRefused(cmds.Invalid):
    """Raised inside a handler before any write; turned into a Refused result."""


def apply(state: SiteState, command: Any, entry_term: int | None = None, entry: bytes | None = None) -> Result:
    """Apply one committed wire command. Never raises. `entry_term`: the term of the log
    entry that holds it (the term of the leader that appended it); a leader's decision made
    in an earlier term is refused (cmds.Envelope.term): a leader resumed from a pause, or
    whose view was older than its leadership, changes nothing by what it decided then.
    `entry`: the entry's bytes as the log holds them, chained into the history digest
    (SiteState.chain) that Checkpoints compare."""
    state.applied += 1
    if entry is not None:
        state.chain = hashlib.blake2b(state.chain + entry, digest_size=cmds.CHAIN_BYTES).digest()
        state.recent_chains = (*state.recent_chains[-(KEPT_CHAINS - 1):], (state.applied, state.chain))
    try:
        envelope = cmds.decode_envelope(command)
        if isinstance(envelope, Refused):
            return envelope
        if envelope.request_id is not None and envelope.request_id in state.applied_requests:
            return cmds.result_from_wire(state.applied_requests[envelope.request_id])
        if envelope.term is not None and entry_term is not None and envelope.term < entry_term:
            return Refused(cmds.FENCED, f"decided by the leader of term {envelope.term}, committed in term "
                                        f"{entry_term}: that leader had lost its leadership, so it changes nothing")
        typed = cmds.decode_body(command)
        if isinstance(typed, Refused):
            result: Result = typed
        else:
            try:
                result = HANDLERS[type(typed)](state, typed, envelope.ts)
            except cmds.Invalid as e:
                result = e.refused()
        state.last_ts = max(state.last_ts, envelope.ts)
        if envelope.request_id is not None:
            _remember(state, envelope.request_id, result)
        return result
    except Exception as e:  # a bug here must not wedge Raft; report it as a refusal
        return Refused(cmds.INTERNAL, f"internal error applying command: {type(e).__name__}: {e}")


def ok(**fields: Any) -> Ok:
    return Ok(fields)


def _remember(state: SiteState, request_id: str, result: Result) -> None:
    state.applied_requests[request_id] = result.to_wire()
    order, at = state.applied_order, state.applied_at
    if len(at) < len(order):  # remembered by a meshd that did not date them: as of now
        at[:0] = [state.last_ts] * (len(order) - len(at))
    order.append(request_id)
    at.append(state.last_ts)
    held, drop, old = len(order), 0, state.last_ts - REQUEST_MEMORY_S
    while held - drop > MAX_REMEMBERED_REQUESTS or (held - drop > MIN_REMEMBERED_REQUESTS and at[drop] < old):
        drop += 1
    if drop:
        for forgotten in order[:drop]:
            state.applied_requests.pop(forgotten, None)
        del order[:drop], at[:drop]


def _event(state: SiteState, ts: float, kind: str, message: str, /, **data: Any) -> None:
    state.event_seq += 1
    state.events.append(Event(ts=ts, kind=kind, message=message, data=data, seq=state.event_seq))
    if len(state.events) > MAX_EVENTS:
        del state.events[: len(state.events) - MAX_EVENTS]


def _audit(state: SiteState, ts: float, actor: str, action: str, target: str, reason: str = "") -> None:
    state.audit_seq += 1
    state.audit.append(AuditRecord(ts=ts, actor=actor, action=action, target=target, site=state.site,
                                   seq=state.audit_seq, reason=reason))
    if len(state.audit) > MAX_AUDIT:
        del state.audit[: len(state.audit) - MAX_AUDIT]


def _voter_count(state: SiteState) -> int:
    return sum(1 for n in state.nodes.values() if n.voter and n.admin not in (ADMIN_LEFT, ADMIN_REVOKED))


# --- handlers ----------------------------------------------------------------------------


def _bootstrap(state: SiteState, cmd: cmds.Bootstrap, ts: float) -> Ok:
    """The founder's first command: names the site and admits the founder as first voter."""
    site, node = cmd.site, cmd.node
    if state.site:
        if state.site == site and node.node_id in state.nodes:
            return ok(node_id=node.node_id, voter=True)  # replayed bootstrap of the same founder
        raise CommandRefused(f"site {state.site!r} is already founded", CONFLICT)
    if node.site != site:
        raise CommandRefused(f"founder belongs to site {node.site!r}, not {site!r}", CONFLICT)
    trust = _trust_from_plain(cmd.trust, cmd.mesh_id) if cmd.trust is not None else None
    state.site = site
    state.mesh_id = cmd.mesh_id
    if trust is not None:
        state.trust_root, state.root_cert, state.policy, state.revocations = trust
    state.nodes[node.node_id] = replace(node, voter=True, joined_at=ts, state_changed_at=ts, reason="founded the site",
                                        attested_at=ts, attested_boot_id=node.boot_id,
                                        attested_software=node.software)
    _event(state, ts, "membership", f"{node.name} founded site {site}", node=node.name, node_id=node.node_id)
    _audit(state, ts, cmd.actor or node.name, "found-site", site)
    return ok(node_id=node.node_id, voter=True)


def _trust_from_plain(raw: dict, mesh_id: str) -> tuple[str, str, dict, dict]:
    """The mesh trust root a founder brings: every document must open with the root key."""
    root, cert = raw.get("root"), raw.get("root_cert")
    if not isinstance(root, str) or len(root) != 64 or not isinstance(cert, str) or len(cert) > 8192:
        raise CommandRefused("trust needs the root public key (64 hex digits) and its certificate")
    try:
        root_key = bytes.fromhex(root)
        policy = open_policy(raw.get("policy"), root_key)
        revocations = open_revocations(raw.get("revocations"), root_key)
    except (ValueError, AttestationError) as e:
        raise CommandRefused(f"trust: {e}", UNTRUSTED) from None
    if policy.mesh_id != mesh_id or revocations.mesh_id != mesh_id:
        raise CommandRefused("trust documents belong to another mesh", UNTRUSTED)
    return root, cert, raw["policy"], raw["revocations"]


def _open_root_signed(state: SiteState, opener: Callable[[Any, bytes], Any], candidate: Any, current: dict):
    """(the offered trust document, the one in force or None), both opened with the root key."""
    if not state.trust_root:
        raise CommandRefused("this site has no trust root", UNTRUSTED)
    root_key = bytes.fromhex(state.trust_root)
    try:
        return opener(candidate, root_key), (opener(current, root_key) if current else None)
    except AttestationError as e:
        raise CommandRefused(str(e), UNTRUSTED) from None


def _set_policy(state: SiteState, cmd: cmds.SetPolicy, ts: float) -> Ok:
    """A new policy bundle signed by the mesh root; only a higher serial replaces the current."""
    candidate, current = _open_root_signed(state, open_policy, cmd.policy, state.policy)
    if not policy_is_newer(candidate, current):
        raise CommandRefused(f"policy serial {candidate.serial} is not newer than {current.serial if current else 0} "
                             "for this mesh", STALE)
    state.policy = cmd.policy
    _event(state, ts, "attestation", f"policy {candidate.serial} in force (minimum meshd {candidate.min_version})",
           serial=candidate.serial)
    _audit(state, ts, cmd.actor, "policy-update", str(candidate.serial))
    return ok(serial=candidate.serial)


def _adopt_policy(state: SiteState, cmd: cmds.AdoptPolicy, ts: float) -> Ok:
    """A policy bundle made in another site (through the mesh document) that outranks the one
    in force (attestation.policy.rank). When both have the same serial, the two sites changed
    the policy while apart: this site's change is dropped, and the event says so."""
    candidate, current = _open_root_signed(state, open_policy, cmd.policy, state.policy)
    site = cmd.site
    if current is not None:
        if candidate.mesh_id != current.mesh_id:
            raise CommandRefused("the policy is for another mesh", UNTRUSTED)
        if policy_rank(cmd.policy, candidate) <= policy_rank(state.policy, current):
            raise CommandRefused(f"policy {candidate.serial} from site {site} does not outrank policy "
                                 f"{current.serial} in force", STALE)
    state.policy = cmd.policy
    if current is not None and current.serial == candidate.serial:
        _event(state, ts, "conflict", f"policy {candidate.serial} from site {site} wins over this site's policy "
               f"{current.serial}, made while apart; this site's change is dropped", serial=candidate.serial,
               site=site)
    else:
        _event(state, ts, "attestation", f"policy {candidate.serial} from site {site} in force "
               f"(minimum meshd {candidate.min_version})", serial=candidate.serial, site=site)
    _audit(state, ts, cmd.actor, "policy-adopted", f"{candidate.serial} from {site}")
    return ok(serial=candidate.serial)


def _mark_revoked(state: SiteState, node: NodeRecord, by: str, reason: str, ts: float) -> None:
    state.nodes[node.node_id] = replace(node, admin=ADMIN_REVOKED, state_changed_at=ts,
                                        reason=f"revoked by {by}" + (f": {reason}" if reason else ""))


def _revoke_node(state: SiteState, cmd: cmds.RevokeNode, ts: float) -> Ok:
    """Expel a member for good: its record says revoked, and the root-signed revocation list
    that names it replaces the current one (so no member will ever admit it again)."""
    node_id, reason = cmd.node_id, cmd.reason
    node = state.nodes.get(node_id)
    if node is None:
        raise CommandRefused(f"no member with id {node_id}", NOT_FOUND)
    candidate, current = _open_root_signed(state, open_revocations, cmd.revocations, state.revocations)
    if not candidate.is_revoked(node_id):
        raise CommandRefused("the revocation list does not name the node", UNTRUSTED)
    if node.admin == ADMIN_REVOKED:
        return ok(node=node.name, node_id=node_id, revoked=True, number=candidate.number)  # a retried command
    if not revocations_supersede(candidate, current):
        raise CommandRefused(f"revocation list {candidate.number} does not supersede the current one "
                             f"({current.number if current else 0})", STALE)
    state.revocations = cmd.revocations
    _mark_revoked(state, node, cmd.actor or "an operator", reason, ts)
    _event(state, ts, "membership", f"{node.name} revoked" + (f": {reason}" if reason else ""), node=node.name,
           node_id=node_id)
    _audit(state, ts, cmd.actor, "revoke", node.name, reason)
    return ok(node=node.name, node_id=node_id, revoked=True, number=candidate.number)


def _adopt_revocations(state: SiteState, cmd: cmds.AdoptRevocations, ts: float) -> Ok:
    """Revocations made elsewhere in the mesh (other sites, through the mesh document): a
    root-signed list that supersedes the one in force (it forgets nobody); any member of this
    site it names is expelled like `revoke_node` does. `sites` names where they were made."""
    candidate, current = _open_root_signed(state, open_revocations, cmd.revocations, state.revocations)
    if not revocations_supersede(candidate, current):
        raise CommandRefused(f"revocation list {candidate.number} does not supersede the current one "
                             f"({current.number if current else 0})", STALE)
    added = sorted(set(candidate.entries) - set(current.entries if current else ()))
    state.revocations = cmd.revocations
    where = ", ".join(sorted(set(cmd.sites))) or "another site"
    for node_id in added:
        entry = candidate.entries[node_id]
        node = state.nodes.get(node_id)
        if node is not None and node.admin != ADMIN_REVOKED:
            _mark_revoked(state, node, f"{entry.by} in {where}", entry.reason, ts)
        _event(state, ts, "membership", f"{node.name if node else node_id} revoked in {where}"
               + (f": {entry.reason}" if entry.reason else ""), node_id=node_id)
        _audit(state, ts, cmd.actor, "revoke-adopted", node.name if node else node_id)
    return ok(number=candidate.number, added=added)


def _rotate_secret(state: SiteState, cmd: cmds.RotateSecret, ts: float) -> Ok:
    """Reserve the next Raft secret epoch: whoever rotates distributes a secret under it, and
    members only ever move to a higher epoch, so concurrent rotations converge."""
    state.secret_epoch += 1
    _event(state, ts, "membership", f"Raft secret rotation {state.secret_epoch} started", epoch=state.secret_epoch)
    _audit(state, ts, cmd.actor, "rotate-secret", str(state.secret_epoch))
    return ok(epoch=state.secret_epoch)


def _checkpoint(state: SiteState, cmd: cmds.Checkpoint, ts: float) -> Ok:
    """Compare this member's history digest with the leader's at the same point; a member
    whose digest differs is marked diverged (SiteState.diverged), on itself only. Too far
    back to compare (more than KEPT_CHAINS entries ago, or before this member's snapshot):
    nothing to say."""
    mine = dict(state.recent_chains).get(cmd.applied)
    if mine is None:
        return ok(compared=False)
    if mine.hex() != cmd.chain:
        state.diverged = (f"after {cmd.applied} log entries its history digest is {mine.hex()}, the leader's "
                          f"{cmd.chain}")
        return ok(compared=True, same=False)
    return ok(compared=True, same=True)


def _attested(state: SiteState, cmd: cmds.Attested, ts: float) -> Ok:
    """A member's fresh evidence verified (re-attestation): record when, from which boot and
    which software; a quarantined member is released (its software is allowed now)."""
    node = state.nodes.get(cmd.node_id)
    if node is None or node.admin in (ADMIN_LEFT, ADMIN_REVOKED):
        raise CommandRefused("attestation of a node that is not a member", NOT_MEMBER)
    released = bool(node.quarantine)
    state.nodes[cmd.node_id] = replace(node, attested_at=ts, attested_boot_id=cmd.boot_id, clock_skew_s=cmd.clock_skew,
                                       boot_id=node.boot_id or cmd.boot_id,
                                       attested_software=cmd.software or node.attested_software,
                                       software=node.software or cmd.software, quarantine="",
                                       **({"state_changed_at": ts, "reason": "released from quarantine: "
                                           "its software is in the policy now"} if released else {}))
    if released:
        _event(state, ts, "attestation", f"{node.name} released from quarantine: its software is in the policy now",
               node=node.name, node_id=node.node_id, digest=cmd.software)
        _audit(state, ts, cmd.actor or "attestation", "release", node.name,
               f"re-attested with meshd digest {cmd.software or '(not given)'}, which the policy allows")
    return ok(node=node.name, released=released)


def _quarantine(state: SiteState, cmd: cmds.Quarantine, ts: float) -> Ok:
    """A member runs software the policy does not know: it keeps its membership, but its
    workloads move (reconcile.covers), it is offered no work and gets no secret."""
    node = state.nodes.get(cmd.node_id)
    if node is None or node.admin in (ADMIN_LEFT, ADMIN_REVOKED):
        raise CommandRefused("quarantine of a node that is not a member", NOT_MEMBER)
    if node.quarantine == cmd.reason:
        return ok(node=node.name, quarantined=True)  # a retried command, or the same software again
    state.nodes[cmd.node_id] = replace(node, quarantine=cmd.reason, state_changed_at=ts,
                                       reason=f"quarantined: {cmd.reason}",
                                       software=cmd.software or node.software)
    _event(state, ts, "attestation", f"{node.name} quarantined: {cmd.reason}", node=node.name, node_id=node.node_id,
           reason=cmd.reason, digest=cmd.software)
    _audit(state, ts, cmd.actor or "attestation", "quarantine", node.name, cmd.reason)
    return ok(node=node.name, quarantined=True)


def _revoke_token(state: SiteState, cmd: cmds.RevokeToken, ts: float) -> Ok:
    """Withdraw a token that was not used yet (a used one admitted its node: remove or revoke
    the node instead)."""
    token = state.tokens.get(cmd.token_id)
    if token is None:
        raise CommandRefused(f"no join token {cmd.token_id}", NOT_FOUND)
    if token.used_by is not None:
        used_by = state.nodes.get(token.used_by)
        raise CommandRefused(f"join token {cmd.token_id} was already used by "
                             f"{used_by.name if used_by else token.used_by}; revoke or remove that node instead",
                             CONFLICT)
    if token.revoked_by:
        return ok(token_id=cmd.token_id, revoked=True)  # a retry, or revoked twice: the same
    state.tokens[cmd.token_id] = replace(token, revoked_by=cmd.actor or "an operator")
    _event(state, ts, "token", f"join token {cmd.token_id} revoked", token_id=cmd.token_id)
    _audit(state, ts, cmd.actor, "token-revoke", cmd.token_id)
    return ok(token_id=cmd.token_id, revoked=True)


def _record_refusal(state: SiteState, cmd: cmds.RecordRefusal, ts: float) -> Ok:
    """A refused join or failed evidence, into the audit: who tried, from where, why."""
    where = f" from {cmd.source}" if cmd.source else ""
    times = f" ({cmd.count} times)" if cmd.count > 1 else ""
    _audit(state, ts, cmd.actor or "a member", cmd.action, cmd.target, f"{cmd.reason}{where}{times}")
    return ok()


def _create_token(state: SiteState, cmd: cmds.CreateToken, ts: float) -> Ok:
    if cmd.token_id in state.tokens:
        raise CommandRefused("token id already exists", CONFLICT)
    if cmd.expires_at <= ts:
        raise CommandRefused("token would already be expired", TOKEN)
    # Forget tokens that expired long ago (a day): they can never be used again.
    for old_id in [t.token_id for t in state.tokens.values() if t.expires_at < ts - 86_400]:
        del state.tokens[old_id]
    state.tokens[cmd.token_id] = JoinToken(token_id=cmd.token_id, site=cmd.site, secret=cmd.secret,
                                           expires_at=cmd.expires_at, created_by=cmd.actor, created_at=ts)
    _event(state, ts, "token", f"join token {cmd.token_id} created for site {cmd.site}", token_id=cmd.token_id,
           expires_at=cmd.expires_at)
    _audit(state, ts, cmd.actor, "token-create", cmd.site)
    return ok(token_id=cmd.token_id, site=cmd.site, expires_at=cmd.expires_at)


# The refusal of a token this site never issued: a joiner that meets it at a member of
# another site (a `--peer` elsewhere) asks the next member instead of giving up.
UNKNOWN_TOKEN = "unknown join token"


def _token_usable(state: SiteState, token_id: str, node_id: str, now: float) -> str | None:
    """Why the token cannot be used by `node_id` now (unknown, used, revoked, expired), or None."""
    token = state.tokens.get(token_id)
    if token is None:
        return UNKNOWN_TOKEN
    if token.used_by is not None and token.used_by != node_id:
        return "join token was already used"
    if token.revoked_by and token.used_by is None:
        return f"join token was revoked by {token.revoked_by}"
    if token.expires_at <= now:
        return "join token expired"
    return None


def check_token(state: SiteState, token_id: str, node_id: str, now: float) -> str | None:
    """Why the token cannot admit `node_id` to this site now, or None when it can."""
    problem = _token_usable(state, token_id, node_id, now)
    if problem:
        return problem
    token = state.tokens[token_id]
    if token.site != state.site:
        return f"join token is for site {token.site!r}, this is site {state.site!r}"
    return None


def is_founder_token(state: SiteState, token_id: str) -> bool:
    """A token this site issued for another site: its holder founds that site (it does not
    join this one)."""
    token = state.tokens.get(token_id)
    return token is not None and bool(state.site) and token.site != state.site


def check_founder_token(state: SiteState, token_id: str, node_id: str, site: str, now: float) -> str | None:
    """Why the token cannot let `node_id` found site `site` now, or None when it can."""
    problem = _token_usable(state, token_id, node_id, now)
    if problem:
        return problem
    token = state.tokens[token_id]
    if token.site == state.site:
        return f"join token is for this site ({state.site!r}): it admits to this site, it founds none"
    if site != token.site:
        return f"join token is for site {token.site!r}, not {site!r}"
    name = specmod.name_problem(site)
    if name:
        return f"site name {name}"
    return None


def revoked_by_list(state: SiteState) -> frozenset[str]:
    """Node ids the revocation list in force names (none when the site has no list). Raises
    AttestationError or ValueError when the list does not verify with the site's root."""
    if not state.trust_root or not state.revocations:
        return frozenset()
    return frozenset(open_revocations(state.revocations, bytes.fromhex(state.trust_root)).entries)


def _listed_as_revoked(state: SiteState, node_id: str) -> bool:
    try:
        return node_id in revoked_by_list(state)
    except (ValueError, AttestationError):
        raise CommandRefused("the site's revocation list does not verify", UNTRUSTED) from None


def _found_site(state: SiteState, cmd: cmds.FoundSite, ts: float) -> Ok:
    """A verified joiner founds a new site of this mesh with a token this site issued for it.
    The token is consumed here (single use, like an admission), but the founder does not
    become a member of this site: it is the first voter of its own."""
    token_id, node = cmd.token_id, cmd.node
    if not state.site:
        raise CommandRefused("this site is not founded yet", NOT_FOUND)
    existing = state.nodes.get(node.node_id)
    if (existing is not None and existing.admin == ADMIN_REVOKED) or _listed_as_revoked(state, node.node_id):
        raise CommandRefused("node was revoked and may never be admitted again", REVOKED)
    if existing is not None and existing.admin != ADMIN_LEFT:
        raise CommandRefused(f"node is a member of site {state.site!r}; a node belongs to one site", CONFLICT)
    reason = check_founder_token(state, token_id, node.node_id, node.site, ts)
    if reason:
        raise CommandRefused(reason, TOKEN)
    token = state.tokens[token_id]
    if token.used_by == node.node_id:
        return ok(site=node.site, node_id=node.node_id)  # the same founder asking again (its welcome was lost)
    state.tokens[token_id] = replace(token, used_by=node.node_id)
    _event(state, ts, "membership", f"{node.name} founds site {node.site} with a token of this site",
           node=node.name, node_id=node.node_id, site=node.site, token_id=token_id)
    _audit(state, ts, cmd.actor or node.name, "found-site", node.site)
    return ok(site=node.site, node_id=node.node_id)


def _admit_node(state: SiteState, cmd: cmds.AdmitNode, ts: float) -> Ok:
    token_id, node = cmd.token_id, cmd.node
    existing = state.nodes.get(node.node_id)
    if existing is not None and existing.admin == ADMIN_REVOKED:
        raise CommandRefused("node was revoked and may never be admitted again", REVOKED)
    token = state.tokens.get(token_id)
    if existing is not None and token is not None and token.used_by == node.node_id:
        return ok(node_id=node.node_id, voter=existing.voter)  # retry of this very admission
    reason = check_token(state, token_id, node.node_id, ts)
    if reason:
        raise CommandRefused(reason, TOKEN)
    if node.site != state.site:
        raise CommandRefused(f"node asks for site {node.site!r}, this is site {state.site!r}", CONFLICT)
    if any(n.name == node.name and n.node_id != node.node_id and n.admin not in (ADMIN_LEFT, ADMIN_REVOKED)
           for n in state.nodes.values()):
        raise CommandRefused(f"another member is already named {node.name!r}", CONFLICT)
    voter = existing.voter if existing is not None else _voter_count(state) < MAX_VOTERS
    state.tokens[token_id] = replace(token, used_by=node.node_id)
    state.nodes[node.node_id] = replace(
        node, voter=voter, liveness=LIVENESS_JOINING, admin=ADMIN_ACTIVE, joined_at=ts, state_changed_at=ts,
        reason="admitted with a join token", attested_at=ts, attested_boot_id=node.boot_id,
        attested_software=node.software,
    )
    role = "voter" if voter else "non-voter"
    _event(state, ts, "membership", f"{node.name} admitted as {role}", node=node.name, node_id=node.node_id, voter=voter)
    _audit(state, ts, cmd.actor or node.name, "admit", node.name)
    return ok(node_id=node.node_id, voter=voter)


def _heartbeat(state: SiteState, cmd: cmds.Heartbeat, ts: float) -> Ok:
    node = state.nodes.get(cmd.node_id)
    if node is None:
        raise CommandRefused("heartbeat from a node that is not a member", NOT_MEMBER)
    if node.admin in (ADMIN_LEFT, ADMIN_REVOKED):
        raise CommandRefused(f"heartbeat from a node that has {node.admin}", NOT_MEMBER)
    state.nodes[cmd.node_id] = replace(node, heartbeat_seq=max(node.heartbeat_seq, cmd.seq),
                                       resources=cmd.resources if cmd.resources is not None else node.resources,
                                       boot_id=cmd.boot_id if cmd.boot_id is not None else node.boot_id,
                                       software=cmd.software if cmd.software is not None else node.software,
                                       artifacts=cmd.artifacts if cmd.artifacts is not None else node.artifacts)
    for report in cmd.reports:
        _apply_report(state, node, report, ts)
    return ok()


# The reason an allocation gets when its node's meshd stopped it while the site still wanted
# it (a stale view on that node): it is replaced, never counted as a replica.
REASON_STOPPED_BY_NODE = "stopped by its node's meshd while the site still wanted it"


def _apply_report(state: SiteState, node: NodeRecord, report: cmds.AllocReport, ts: float) -> None:
    alloc = state.allocs.get(report.alloc_id)
    if alloc is None or alloc.node_id != node.node_id:
        return  # a report about an allocation this node does not hold: stale, ignore
    if alloc.state == ALLOC_LOST:
        return  # the site gave it up while the node was unreachable; its replacement runs elsewhere
    if alloc.state in ALLOC_TERMINAL and alloc.desired == DESIRED_STOP:
        return  # already stopped for good
    new_state, desired, reason = report.state, alloc.desired, report.reason or alloc.reason
    if alloc.desired == DESIRED_STOP and new_state not in ALLOC_TERMINAL:
        new_state = alloc.state  # still shutting down; keep what we know
    if alloc.desired == DESIRED_RUN and new_state in ALLOC_TERMINAL and report.stopped_by_meshd:
        # Not the workload's own end (that one keeps covering: its restart policy decided):
        # the node stopped what the site wants. The site replaces it (reconcile).
        desired, reason = DESIRED_STOP, f"{REASON_STOPPED_BY_NODE} ({report.reason})"[:512]
    health = report.health if new_state == ALLOC_RUNNING else HEALTH_NONE
    # A pending allocation's reason is news of its own (why it waits: "fetching model 37 %").
    changed = (new_state, desired, report.pid, report.restarts, report.exit_code, health) != (
        alloc.state, alloc.desired, alloc.pid, alloc.restarts, alloc.exit_code, alloc.health) or (
        new_state == ALLOC_PENDING and reason != alloc.reason)
    if not changed:
        return
    updated = replace(alloc, state=new_state, desired=desired, pid=report.pid, restarts=report.restarts,
                      exit_code=report.exit_code, updated_at=ts, reason=reason, health=health)
    was, now = alloc.healthy_at > 0 and rollout.is_healthy(alloc), rollout.is_healthy(updated)
    if now and not was:
        updated = replace(updated, healthy_at=ts)
    elif was and not now:
        updated = replace(updated, healthy_at=0.0, unhealthy_since=ts)
    state.allocs[alloc.alloc_id] = updated
    if health == HEALTH_UNHEALTHY and alloc.health != HEALTH_UNHEALTHY:
        _event(state, ts, "alloc", f"{alloc.app} replica {alloc.replica} on {node.name} is unhealthy"
               + (f" ({report.reason})" if report.reason else ""),
               alloc_id=alloc.alloc_id, app=alloc.app, node=node.name, health=health)
    if new_state != alloc.state:
        _event(state, ts, "alloc", f"{alloc.app} replica {alloc.replica} on {node.name}: {alloc.state} -> {new_state}"
               + (f" ({report.reason})" if report.reason else ""),
               alloc_id=alloc.alloc_id, app=alloc.app, node=node.name, state=new_state)


def _set_liveness(state: SiteState, cmd: cmds.SetLiveness, ts: float) -> Ok:
    node_id, liveness, reason = cmd.node_id, cmd.liveness, cmd.reason
    node = state.nodes.get(node_id)
    if node is None:
        raise CommandRefused("unknown node", NOT_FOUND)
    if node.liveness == liveness:
        return ok(changed=False)
    if node.admin in (ADMIN_LEFT, ADMIN_REVOKED):
        raise CommandRefused(f"node has {node.admin}", NOT_MEMBER)
    state.nodes[node_id] = replace(node, liveness=liveness, state_changed_at=ts, reason=reason[:256])
    lost = []
    if liveness == LIVENESS_DOWN:
        for alloc in state.allocs_on(node_id):
            if alloc.live:
                state.allocs[alloc.alloc_id] = replace(
                    alloc, state=ALLOC_LOST, desired=DESIRED_STOP, updated_at=ts, reason=f"node {node.name} down")
                lost.append(alloc.alloc_id)
    _event(state, ts, "node", f"{node.name} is {liveness}" + (f": {reason}" if reason else ""),
           node=node.name, node_id=node_id, state=liveness, lost_allocs=lost)
    return ok(changed=True, lost=lost)


def _mesh_edit(state: SiteState, edit: AppEdit | None, app: str, stopped: bool) -> AppEdit | None:
    """The mesh-document edit a deploy or stop carries (None for one without), checked
    against the command and against the edit this site last took in for the app."""
    if edit is None:
        return None
    if edit.app != app or edit.stopped != stopped:
        raise CommandRefused(f"edit {edit.edit_id} is not a {'stop' if stopped else 'deploy'} of {app}")
    current = state.mesh_edits.get(app)
    if current is not None and current.get("edit_id") != edit.edit_id:
        taken = AppEdit.from_plain(current)
        if winning_order(edit) < winning_order(taken):
            raise CommandRefused(f"{app} has a newer change (v{taken.version} by {taken.actor} in site "
                                 f"{taken.site}); look at `meshctl apps` and deploy again to override it", CONFLICT)
    return edit


def _submit_app(state: SiteState, cmd: cmds.SubmitApp, ts: float) -> Ok:
    app_spec, actor = cmd.spec, cmd.actor
    edit = _mesh_edit(state, cmd.edit, app_spec.name, stopped=False)
    current = state.apps.get(app_spec.name)
    if edit is not None:
        state.mesh_edits[app_spec.name] = edit.to_plain()
        if state.site not in edit.targets:
            # Placed by the sites it names (data residency); one that ran here stops.
            stopped = _stop_allocs(state, ts, actor, app_spec.name, f"moved to {', '.join(edit.targets)}")
            if edit.site == state.site:  # an operator's act here, for sites elsewhere
                _audit(state, ts, actor, "deploy", f"{app_spec.name} v{edit.version} to {', '.join(edit.targets)}")
            return ok(app=app_spec.name, version=edit.version, accepted=True, changed=False, here=False,
                      allocs=stopped)
        if cmd.hold:
            # Its wave of the rollout has not opened here (meshd.waves): taken in, not run yet.
            if edit.site == state.site:
                _audit(state, ts, actor, "deploy", f"{app_spec.name} v{edit.version} (held for its rollout wave)")
            return ok(app=app_spec.name, version=edit.version, accepted=True, changed=False, here=True, held=True)
    edit_id, mesh_version = (edit.edit_id, edit.version) if edit is not None else ("", 0)
    if current is not None and current.spec == app_spec and current.status == APP_RUNNING:
        if edit is not None:
            state.apps[app_spec.name] = replace(current, edit_id=edit_id, mesh_version=mesh_version)
        return ok(app=app_spec.name, version=mesh_version or current.version, site_version=current.version,
                  accepted=True, changed=False, here=True)
    # Never backwards: allocations of a lower version are the ones to replace (a revert moves
    # `version` back to a stable one, never `latest_version`).
    version = max(max(current.version, current.latest_version) + 1 if current is not None else 1, mesh_version)
    fresh = AppRecord(spec=app_spec, version=version, status=APP_RUNNING, submitted_at=ts, submitted_by=actor,
                      edit_id=edit_id, mesh_version=mesh_version)
    state.apps[app_spec.name] = _new_version(state, current, fresh, ts, actor, edit.site if edit is not None
                                             else state.site)
    _event(state, ts, "app", f"{app_spec.name} v{version} submitted ({app_spec.replicas} replicas)",
           app=app_spec.name, version=version)
    _audit(state, ts, actor, "deploy", f"{app_spec.name} v{version}")
    return ok(app=app_spec.name, version=mesh_version or version, site_version=version, accepted=True,
              changed=True, here=True)


# Deployments kept per app for `meshctl deployments`: the current one and a few before it.
DEPLOYMENTS_KEPT = 5


def _new_version(state: SiteState, current: AppRecord | None, fresh: AppRecord, ts: float, actor: str,
                 site: str) -> AppRecord:
    """`fresh` (a new version of the app) with its history and its deployment: the version
    it replaces (if it ran) is what the deployment starts from; a deployment under way is
    cancelled by it."""
    spec, version = fresh.spec, fresh.version
    digest = specmod.spec_digest(spec)
    history: tuple[AppVersion, ...] = current.history if current is not None else ()
    deployments: tuple[Deployment, ...] = current.deployments if current is not None else ()
    replaced = current.deployment if current is not None else None
    if replaced is not None and replaced.active:
        deployments = deployments[:-1] + (replace(replaced, state=DEPLOY_CANCELLED, ended_at=ts, by=actor,
                                                  reason=f"replaced by version {version}"),)
    history = tuple(replace(e, state=VERSION_SUPERSEDED) if e.state == VERSION_RUNNING else e for e in history)
    history += (AppVersion(version=version, spec=spec, digest=digest, submitted_at=ts, by=actor, site=site),)
    running = current is not None and current.status == APP_RUNNING
    canary = spec.update.canary if running else 0
    deployment = Deployment(version=version, from_version=current.version if running else 0, started_at=ts,
                            moved_at=ts, canary=canary, promoted=canary == 0, by=actor, edit_id=fresh.edit_id)
    record = replace(fresh, deployments=(deployments + (deployment,))[-DEPLOYMENTS_KEPT:], latest_version=version)
    return _with_history(state, record, history)


def _with_history(state: SiteState, record: AppRecord, history: tuple[AppVersion, ...]) -> AppRecord:
    """`record` holding `history` cut to its last keep_versions, beside which the current and
    stable versions, pinned ones and those a live replica runs are kept; and `same_spec`."""
    keep = record.spec.update.keep_versions
    stable = next((e.version for e in reversed(history) if e.state == VERSION_STABLE), 0)
    live = {a.version for a in state.allocs.of_app(record.spec.name) if a.live}
    kept = [e for at, e in enumerate(history) if at >= len(history) - keep or e.pinned
            or e.version in (record.version, stable) or e.version in live]
    # Replicas of a version that differs only in how many there are or how they are rolled
    # out run the same thing: a scale up or down, or a new pace, restarts nothing.
    runs = _runs_as(record.spec)
    same = tuple(e.version for e in kept if e.version != record.version and _runs_as(e.spec) == runs)
    return replace(record, history=tuple(kept), same_spec=same)


def _runs_as(spec):
    return replace(spec, replicas=0, update=UpdatePolicy(), rollout=None)


def _mark(history: tuple[AppVersion, ...], version: int, state: str, reason: str = "") -> tuple[AppVersion, ...]:
    return tuple(replace(e, state=state, reason=reason[:256]) if e.version == version else e for e in history)


def _rollout(state: SiteState, cmd: cmds.Rollout, ts: float) -> Ok:
    """A deployment move: the operator's or the leader's (meshd.rollout decides the latter)."""
    record = state.apps.get(cmd.app)
    if record is None or record.status != APP_RUNNING:
        raise CommandRefused(f"no running app named {cmd.app!r}", NOT_FOUND)
    d = record.deployment
    if cmd.action == "abort":
        return _abort(state, record, cmd, ts)
    if d is None or d.version != cmd.version or record.version != cmd.version:
        current = f"v{d.version} ({d.state})" if d is not None else "none"
        raise CommandRefused(f"{cmd.app} v{cmd.version} is not its current deployment (that is {current})", CONFLICT)
    action, name = cmd.action, cmd.app
    if not d.active:
        raise CommandRefused(f"{name} v{d.version}'s deployment has ended ({d.state}); nothing to {action}", CONFLICT)
    waiting = d.canary > 0 and not d.promoted
    if action == "promote":
        if not waiting:
            raise CommandRefused(f"{name} v{d.version} has no canaries waiting for promotion", CONFLICT)
        moved = replace(d, promoted=True, state=DEPLOY_RUNNING if d.state != DEPLOY_PAUSED else d.state, moved_at=ts)
        text = f"{name} v{d.version}: canaries promoted ({cmd.reason or 'by ' + cmd.actor})"
    elif action == "pause":
        if d.state == DEPLOY_PAUSED:
            raise CommandRefused(f"{name} v{d.version}'s deployment is already paused", CONFLICT)
        moved, text = replace(d, state=DEPLOY_PAUSED), f"{name} v{d.version}: deployment paused"
    elif action == "resume":
        if d.state != DEPLOY_PAUSED:
            raise CommandRefused(f"{name} v{d.version}'s deployment is not paused (it is {d.state})", CONFLICT)
        moved, text = replace(d, state=DEPLOY_RUNNING, moved_at=ts), f"{name} v{d.version}: deployment resumed"
    elif action == "await":
        if not waiting or d.state != DEPLOY_RUNNING:
            raise CommandRefused(f"{name} v{d.version} has no canaries to wait on", CONFLICT)
        moved, text = replace(d, state=DEPLOY_AWAITING), f"{name} v{d.version}: {cmd.reason}; awaiting promotion"
    elif action == "succeed":
        history = tuple(replace(e, state=VERSION_SUPERSEDED) if e.state in (VERSION_STABLE, VERSION_RUNNING)
                        and e.version != d.version else e for e in record.history)
        history = _mark(history, d.version, VERSION_STABLE)
        ended = replace(d, state=DEPLOY_SUCCEEDED, ended_at=ts, reason=cmd.reason)
        state.apps[name] = _with_history(state, replace(record, deployments=record.deployments[:-1] + (ended,)),
                                         history)
        _event(state, ts, "deployment", f"{name} v{d.version} succeeded: {cmd.reason}; it is stable", app=name,
               version=d.version, state=DEPLOY_SUCCEEDED)
        return ok(app=name, version=d.version, state=DEPLOY_SUCCEEDED)
    elif action in ("fail", "cancel"):
        return _end_badly(state, record, d, cmd, ts)
    else:  # decoded commands carry a known action
        raise CommandRefused(f"unknown deployment action {action!r}")
    state.apps[name] = replace(record, deployments=record.deployments[:-1] + (moved,))
    _event(state, ts, "deployment", text, app=name, version=d.version, state=moved.state)
    if action in cmds.OPERATOR_ACTIONS:
        _audit(state, ts, cmd.actor, action, f"{name} v{d.version}", cmd.reason)
    return ok(app=name, version=d.version, state=moved.state, promoted=moved.promoted)


def _abort(state: SiteState, record: AppRecord, cmd: cmds.Rollout, ts: float) -> Ok:
    """The app's rollout across sites was cancelled or stopped by failures elsewhere (meshd.
    waves): return from version `cmd.version`, whether its deployment still runs (cancelled,
    back to the stable version) or already succeeded here (a revert to the version it
    replaced). What `waves.abort_command` proposes is exactly what this accepts."""
    name = record.spec.name
    d = record.deployment
    why = cmd.reason or "the rollout was stopped"
    problem = abort_refusal(record, cmd.version)
    if problem:
        raise CommandRefused(problem, CONFLICT)
    assert d is not None
    if d.active:
        stable = record.stable_version
        if stable is not None and stable.version != d.version:
            return _end_badly(state, record, d, replace(cmd, action="cancel", reason=why), ts)
        ended = replace(d, state=DEPLOY_FAILED, ended_at=ts, reason=f"{why}; no stable version to return to")
        state.apps[name] = replace(record, deployments=record.deployments[:-1] + (ended,),
                                   history=_mark(record.history, d.version, VERSION_FAILED, why))
        _event(state, ts, "deployment", f"{name} v{d.version} stopped: {why}; no stable version to return to",
               app=name, version=d.version, state=DEPLOY_FAILED, reason=why)
        return ok(app=name, version=d.version, state=DEPLOY_FAILED)
    back = record.version_entry(d.from_version)
    assert back is not None
    revert = Deployment(version=back.version, from_version=d.version, started_at=ts, moved_at=ts, promoted=True,
                        revert=True, by=cmd.actor, reason=f"back from v{d.version}: {why}")
    history = tuple(replace(e, state=VERSION_SUPERSEDED) if e.state == VERSION_STABLE else e for e in record.history)
    history = _mark(history, d.version, VERSION_REVERTED, why)
    moved = replace(record, spec=back.spec, version=back.version,
                    deployments=(record.deployments + (revert,))[-DEPLOYMENTS_KEPT:])
    state.apps[name] = _with_history(state, moved, history)
    _event(state, ts, "deployment", f"{name} v{d.version} returns to v{back.version}: {why}", app=name,
           version=d.version, state=DEPLOY_REVERTED, reason=why, to_version=back.version)
    _audit(state, ts, cmd.actor, "revert", f"{name} v{d.version} -> v{back.version}", why)
    return ok(app=name, version=d.version, state=DEPLOY_REVERTED, to_version=back.version)


def abort_refusal(record: AppRecord, version: int) -> str:
    """Why the site cannot return from `version` of the app for a stopped rollout ("": it can):
    the latest deployment must be that version's, still under way, or succeeded with the
    version it replaced still in the history."""
    d = record.deployment
    name = record.spec.name
    if d is None or d.version != version or record.version != version or d.revert:
        return f"{name} v{version} is not the deployment the site runs"
    if not d.edit_id or d.edit_id != record.edit_id:
        return f"{name} v{version} was not started by the mesh edit the site runs"
    if d.active:
        return ""
    if d.state != DEPLOY_SUCCEEDED:
        return f"{name} v{version}'s deployment ended {d.state}: nothing to return from"
    if not d.from_version or record.version_entry(d.from_version) is None:
        return f"{name} v{version} replaced no version the history keeps: nothing to return to"
    return ""


def _end_badly(state: SiteState, record: AppRecord, d: Deployment, cmd: cmds.Rollout, ts: float) -> Ok:
    """A failed or cancelled deployment; back to the last stable version when there is one (a
    failure only with auto_revert, and never for a revert, which would go round in circles)."""
    name, failing = record.spec.name, cmd.action == "fail"
    if failing and d.state != DEPLOY_RUNNING:
        raise CommandRefused(f"{name} v{d.version}'s deployment is {d.state}, not running", CONFLICT)
    stable = record.stable_version
    back = stable if stable is not None and stable.version != d.version else None
    if not failing and back is None:
        raise CommandRefused(f"{name} v{d.version} has no stable version to return to; deploy a spec, or stop "
                             "the app", CONFLICT)
    reverting = back is not None and (not failing or (record.spec.update.auto_revert and not d.revert))
    why = cmd.reason or (f"cancelled by {cmd.actor}" if not failing else "failed")
    if not reverting:
        ended = replace(d, state=DEPLOY_FAILED, ended_at=ts, reason=why)
        history = _mark(record.history, d.version, VERSION_FAILED, why)
        state.apps[name] = replace(record, deployments=record.deployments[:-1] + (ended,), history=history)
        _event(state, ts, "deployment", f"{name} v{d.version} failed: {why}", app=name, version=d.version,
               state=DEPLOY_FAILED, reason=why)
        return ok(app=name, version=d.version, state=DEPLOY_FAILED)
    assert back is not None
    end_state = DEPLOY_REVERTED if failing else DEPLOY_CANCELLED
    ended = replace(d, state=end_state, ended_at=ts, reason=why, by=cmd.actor)
    revert = Deployment(version=back.version, from_version=d.version, started_at=ts, moved_at=ts, promoted=True,
                        revert=True, by=cmd.actor, reason=f"back from v{d.version}: {why}")
    history = _mark(record.history, d.version, VERSION_REVERTED if failing else VERSION_SUPERSEDED, why)
    moved = replace(record, spec=back.spec, version=back.version,
                    deployments=(record.deployments[:-1] + (ended, revert))[-DEPLOYMENTS_KEPT:])
    state.apps[name] = _with_history(state, moved, history)
    what = "failed" if failing else "cancelled"
    _event(state, ts, "deployment", f"{name} v{d.version} {what}: {why}; returning to stable v{back.version}",
           app=name, version=d.version, state=end_state, reason=why, to_version=back.version)
    _audit(state, ts, cmd.actor, "revert" if failing else "cancel", f"{name} v{d.version} -> v{back.version}", why)
    return ok(app=name, version=d.version, state=end_state, to_version=back.version)


def _pin_version(state: SiteState, cmd: cmds.PinVersion, ts: float) -> Ok:
    record = state.apps.get(cmd.app)
    if record is None:
        raise CommandRefused(f"no app named {cmd.app!r}", NOT_FOUND)
    if record.version_entry(cmd.version) is None:
        raise CommandRefused(version_missing(record, cmd.version), NOT_FOUND)
    history = tuple(replace(e, pinned=cmd.pinned) if e.version == cmd.version else e for e in record.history)
    state.apps[cmd.app] = _with_history(state, record, history)
    _audit(state, ts, cmd.actor, "pin" if cmd.pinned else "unpin", f"{cmd.app} v{cmd.version}")
    return ok(app=cmd.app, version=cmd.version, pinned=cmd.pinned)


def _stop_app(state: SiteState, cmd: cmds.StopApp, ts: float) -> Ok:
    name, actor = cmd.app, cmd.actor
    edit = _mesh_edit(state, cmd.edit, name, stopped=True)
    record = state.apps.get(name)
    if edit is not None:
        state.mesh_edits[name] = edit.to_plain()
        if record is None:
            _audit(state, ts, actor, "stop", name)  # runs elsewhere only: the stop is still this site's act
            return ok(app=name, stopped=True, allocs=[])
        state.apps[name] = replace(record, edit_id=edit.edit_id, mesh_version=edit.version)
    elif record is None:
        raise CommandRefused(f"no app named {name!r}", NOT_FOUND)
    return ok(app=name, stopped=True, allocs=_stop_allocs(state, ts, actor, name, "app stopped"))


def _stop_allocs(state: SiteState, ts: float, actor: str, name: str, reason: str) -> list[str]:
    """Stop every allocation of app `name` here and mark it stopped; the ids stopped."""
    record = state.apps.get(name)
    if record is None:
        return []
    stopped = []
    for alloc in state.allocs.of_app(name):
        if alloc.desired == DESIRED_RUN:
            state.allocs[alloc.alloc_id] = replace(alloc, desired=DESIRED_STOP, updated_at=ts, reason=reason)
            stopped.append(alloc.alloc_id)
    if record.status != APP_STOPPED:
        d = record.deployment
        deployments = record.deployments
        if d is not None and d.active:
            deployments = deployments[:-1] + (replace(d, state=DEPLOY_CANCELLED, ended_at=ts, reason=reason, by=actor),)
        state.apps[name] = replace(record, status=APP_STOPPED, stopped_at=ts, deployments=deployments)
        _event(state, ts, "app", f"{name} stopped" + ("" if reason == "app stopped" else f": {reason}"),
               app=name, allocs=stopped)
        _audit(state, ts, actor, "stop", name)
    return stopped


def _apply_plan(state: SiteState, cmd: cmds.ApplyPlan, ts: float) -> Ok:
    version = cmd.version
    if any(p.alloc_id in state.allocs for p in cmd.placements):
        raise CommandRefused("allocation id already in use", CONFLICT)
    plan = Plan(app=cmd.app, version=version, placements=cmd.placements, stops=cmd.stops, filtered=(), unplaced=())
    accepted, refusals = recheck_plan(state, plan)
    record = state.apps.get(cmd.app)
    d = record.deployment if record is not None else None
    canaries = d.canary if d is not None and d.active and not d.promoted and d.version == version else 0
    for p in accepted:
        state.allocs[p.alloc_id] = Alloc(alloc_id=p.alloc_id, app=p.app, version=p.version, replica=p.replica,
                                         node_id=p.node_id, desired=DESIRED_RUN, state=ALLOC_PENDING,
                                         created_at=ts, updated_at=ts, unhealthy_since=ts,
                                         canary=p.replica < canaries)
        node = state.nodes[p.node_id]
        _event(state, ts, "placement", f"{p.app} v{p.version} replica {p.replica} placed on {node.name}",
               app=p.app, alloc_id=p.alloc_id, node=node.name, replica=p.replica)
    for p, reason in refusals:
        _event(state, ts, "placement", f"{p.app} replica {p.replica} not placed: {reason}",
               app=p.app, replica=p.replica, reason=reason)
    stopped = []
    accepted_replicas = {p.replica for p in accepted}
    for alloc_id, reason in cmd.stops:
        alloc = state.allocs.get(alloc_id)
        if alloc is None or alloc.desired == DESIRED_STOP:
            continue
        if not stop_released(state, alloc, version, accepted_replicas, ts):
            continue  # keep the old replica serving until its replacement is placed (or done)
        new_state = ALLOC_STOPPED if alloc.state == ALLOC_PENDING else alloc.state
        state.allocs[alloc_id] = replace(alloc, desired=DESIRED_STOP, state=new_state, updated_at=ts, reason=reason[:256])
        stopped.append(alloc_id)
        _event(state, ts, "placement", f"{alloc.app} replica {alloc.replica} ({alloc_id}) stopping: {reason}",
               app=alloc.app, alloc_id=alloc_id, reason=reason)
    _forget_finished_allocs(state, cmd.app)
    return ok(placed=[p.alloc_id for p in accepted], refused=[[p.alloc_id, r] for p, r in refusals], stopped=stopped)


def waits_for_replacement(state: SiteState, alloc: Alloc, version: int, wall: float) -> bool:
    """An old-version replica keeps running until its index is done (meshd.rollout: its new
    replica counted healthy, and canaries were promoted); one on a draining or quarantined
    node until a plan places its replacement. A rollout never lowers the number of healthy
    replicas, a drain never the number of running ones."""
    record = state.apps.get(alloc.app)
    node = state.nodes.get(alloc.node_id)
    if record is None or record.status != APP_RUNNING or not alloc.live or node is None:
        return False
    if alloc.replica >= record.spec.replicas:
        return False
    if not record.runs(alloc.version):
        return not rollout.old_may_stop(state, alloc, wall)
    return node.emptying


def stop_released(state: SiteState, alloc: Alloc, version: int, placed: set[int], wall: float) -> bool:
    """Whether a plan's stop of `alloc` goes ahead: it does not wait for a replacement, or it
    waits only for a placement and the plan places its index."""
    if not waits_for_replacement(state, alloc, version, wall):
        return True
    record = state.apps.get(alloc.app)
    return record is not None and record.runs(alloc.version) and alloc.replica in placed


# Finished allocations are kept for `meshctl allocs` history, but only this many per app, so
# a crash-looping or often-redeployed app cannot grow the snapshot without bound.
MAX_FINISHED_ALLOCS_PER_APP = 50


def _forget_finished_allocs(state: SiteState, app: str) -> None:
    """Keep the newest MAX_FINISHED_ALLOCS_PER_APP finished allocations of `app` (the one a
    plan just changed): a cost of that app's allocations, not of the site's."""
    finished = [a for a in state.allocs.of_app(app) if a.desired == DESIRED_STOP and a.state in ALLOC_TERMINAL]
    if len(finished) > MAX_FINISHED_ALLOCS_PER_APP:
        finished.sort(key=lambda a: (a.updated_at, a.alloc_id))
        for old in finished[: len(finished) - MAX_FINISHED_ALLOCS_PER_APP]:
            del state.allocs[old.alloc_id]


def purge_refusal(state: SiteState, app: str, ts: float, retention: float) -> str | None:
    """Why `app` may not be forgotten at `ts` (None: it may): only a stopped app whose stop is
    `retention` old and which has no allocation left that runs or may still run."""
    record = state.apps.get(app)
    if record is None:
        return "no such app"
    if record.status != APP_STOPPED:
        return "not stopped"
    if ts - record.stopped_at < retention:
        return f"stopped {max(ts - record.stopped_at, 0):.0f}s ago, kept for {retention:.0f}s"
    if any(a.state not in ALLOC_TERMINAL for a in state.allocs.of_app(app)):
        return "an allocation has not ended yet"
    return None


def _trim_audit(state: SiteState, cmd: cmds.TrimAudit, ts: float) -> Ok:
    """Drop the audit records the command names that are old enough by the command's own
    clock (a proposer's clock ahead cannot take younger ones); never the newest."""
    if not state.audit:
        return ok(trimmed=0)
    newest = state.audit[-1]
    cutoff = ts - cmd.retention
    kept = [r for r in state.audit[:-1] if not (0 < r.seq <= cmd.upto_seq and r.ts <= cutoff)]
    trimmed = len(state.audit) - 1 - len(kept)
    if trimmed:
        state.audit = kept + [newest]
    return ok(trimmed=trimmed)


def _purge_apps(state: SiteState, cmd: cmds.PurgeApps, ts: float) -> Ok:
    purged, kept = [], []
    for app in dict.fromkeys(cmd.apps):
        reason = purge_refusal(state, app, ts, cmd.retention)
        if reason is not None:
            kept.append([app, reason])
            continue
        for alloc in state.allocs.of_app(app):
            del state.allocs[alloc.alloc_id]
        del state.apps[app]
        state.mesh_edits.pop(app, None)
        purged.append(app)
    if purged:
        _event(state, ts, "app", f"forgot {len(purged)} app(s) stopped over {cmd.retention:.0f}s ago: "
               f"{', '.join(purged[:10])}{' ...' if len(purged) > 10 else ''}", apps=purged[:100])
    return ok(purged=purged, kept=kept)


def _set_drain(state: SiteState, cmd: cmds.Drain | cmds.Undrain, ts: float) -> Ok:
    draining = isinstance(cmd, cmds.Drain)
    node = state.node_by_ref(cmd.node)
    if node is None:
        raise CommandRefused(f"no member named {cmd.node!r}", NOT_FOUND)
    if node.admin in (ADMIN_LEFT, ADMIN_REVOKED):
        raise CommandRefused(f"node {node.name} has {node.admin}", NOT_MEMBER)
    wanted = ADMIN_DRAINING if draining else ADMIN_ACTIVE
    if node.admin != wanted:
        state.nodes[node.node_id] = replace(node, admin=wanted, state_changed_at=ts,
                                            reason="drained by operator" if draining else "undrained by operator")
        _event(state, ts, "node", f"{node.name} {'draining' if draining else 'accepting work again'}",
               node=node.name, node_id=node.node_id)
        _audit(state, ts, cmd.actor, "drain" if draining else "undrain", node.name)
    return ok(node=node.name, node_id=node.node_id, state=state.nodes[node.node_id].state)


def promotion_candidate(state: SiteState, leaving: str) -> NodeRecord | None:
    """The non-voter that takes the voter place of `leaving`: a ready, trusted member (not
    quarantined, not draining), the longest in the site first (then by id: deterministic)."""
    candidates = [n for n in state.nodes.values() if not n.voter and n.node_id != leaving
                  and n.state == "ready"]
    return min(candidates, key=lambda n: (n.joined_at, n.node_id)) if candidates else None


def _remove_node(state: SiteState, cmd: cmds.RemoveNode, ts: float) -> Ok:
    """An operator forgets a member that is gone for good: not a revocation (it may join again
    with a fresh token), but it is out of the site: its allocations are replaced (reconcile:
    a left node covers nothing), the leader takes it out of the Raft configuration, and a
    non-voter is promoted to its voter place. A member that is still up is refused: drain and
    stop it first (or revoke it)."""
    node = state.node_by_ref(cmd.node)
    if node is None:
        raise CommandRefused(f"no member named {cmd.node!r}", NOT_FOUND)
    if node.admin == ADMIN_REVOKED:
        raise CommandRefused(f"node {node.name} was revoked; it is already out of the site", NOT_MEMBER)
    if node.admin == ADMIN_LEFT:
        return ok(node=node.name, node_id=node.node_id, removed=True, promoted=None)  # a retry
    if node.liveness != LIVENESS_DOWN:
        raise CommandRefused(f"node {node.name} is up ({node.state}): stop its meshd first (drain it to move its "
                             "work), or revoke it", CONFLICT)
    if node.voter and _voter_count(state) <= 1:
        raise CommandRefused(f"node {node.name} is the site's last voter; removing it would leave nobody to agree",
                             CONFLICT)
    promoted = promotion_candidate(state, node.node_id) if node.voter else None
    state.nodes[node.node_id] = replace(node, admin=ADMIN_LEFT, voter=False, state_changed_at=ts,
                                        reason=f"removed by {cmd.actor or 'an operator'}")
    _event(state, ts, "membership", f"{node.name} removed from site {state.site}", node=node.name,
           node_id=node.node_id)
    _audit(state, ts, cmd.actor, "node-remove", node.name)
    if promoted is not None:
        state.nodes[promoted.node_id] = replace(promoted, voter=True, state_changed_at=ts,
                                                reason=f"promoted to voter in place of {node.name}")
        _event(state, ts, "membership", f"{promoted.name} promoted to voter in place of {node.name}",
               node=promoted.name, node_id=promoted.node_id)
    return ok(node=node.name, node_id=node.node_id, removed=True,
              promoted=promoted.node_id if promoted is not None else None)


def _add_artifact(state: SiteState, cmd: cmds.AddArtifact, ts: float) -> Ok:
    """A manifest joins the catalog when the catalog admits it (signed by a trusted key for
    this mesh, not a replay of a removed one); the same digest again keeps the newer one."""
    manifest = catalog.admit(state, cmd.manifest)
    if isinstance(manifest, catalog.Refusal):
        raise CommandRefused(manifest.reason, UNTRUSTED)
    current = catalog.manifest_of(state, manifest.digest)
    if current is None and len(state.artifacts) >= catalog.MAX_CATALOG:
        raise CommandRefused(f"the site knows {catalog.MAX_CATALOG} artifacts already: remove some no app pins "
                             "(meshctl artifact rm)", CONFLICT)
    if current is None or manifest.pushed_at > current.pushed_at:
        state.artifacts[manifest.digest] = dict(manifest.document)
        _audit(state, ts, cmd.actor, "artifact-push", manifest.digest, f"{manifest.name} ({manifest.size} bytes)")
    return ok(digest=manifest.digest, size=manifest.size, name=manifest.name)


def _remove_artifact(state: SiteState, cmd: cmds.RemoveArtifact, ts: float) -> Ok:
    """An artifact leaves the catalog unless a kept app version pins it; a manifest pushed
    no later than the removed one is a replay from then on (catalog.admit)."""
    refusal = catalog.removal_refusal(state, cmd.digest)
    if refusal:
        raise CommandRefused(refusal, CONFLICT)
    document = state.artifacts.pop(cmd.digest, None)
    if document is None:
        return ok(digest=cmd.digest, removed=False)
    pushed_at = document.get("body", {}).get("pushed_at", ts)
    state.artifacts_removed[cmd.digest] = max(float(pushed_at), state.artifacts_removed.get(cmd.digest, 0.0))
    while len(state.artifacts_removed) > catalog.MAX_REMOVED:  # the oldest removal goes first
        del state.artifacts_removed[min(state.artifacts_removed, key=lambda d: (state.artifacts_removed[d], d))]
    _audit(state, ts, cmd.actor, "artifact-remove", cmd.digest)
    return ok(digest=cmd.digest, removed=True)


HANDLERS: dict[type, Callable[[SiteState, Any, float], Ok]] = {
    cmds.Bootstrap: _bootstrap,
    cmds.SetPolicy: _set_policy,
    cmds.AdoptPolicy: _adopt_policy,
    cmds.RevokeNode: _revoke_node,
    cmds.AdoptRevocations: _adopt_revocations,
    cmds.Attested: _attested,
    cmds.RotateSecret: _rotate_secret,
    cmds.CreateToken: _create_token,
    cmds.AdmitNode: _admit_node,
    cmds.FoundSite: _found_site,
    cmds.Heartbeat: _heartbeat,
    cmds.SetLiveness: _set_liveness,
    cmds.Rollout: _rollout,
    cmds.PinVersion: _pin_version,
    cmds.SubmitApp: _submit_app,
    cmds.StopApp: _stop_app,
    cmds.PurgeApps: _purge_apps,
    cmds.TrimAudit: _trim_audit,
    cmds.ApplyPlan: _apply_plan,
    cmds.Drain: _set_drain,
    cmds.Undrain: _set_drain,
    cmds.Quarantine: _quarantine,
    cmds.RecordRefusal: _record_refusal,
    cmds.RevokeToken: _revoke_token,
    cmds.RemoveNode: _remove_node,
    cmds.Checkpoint: _checkpoint,
    cmds.AddArtifact: _add_artifact,
    cmds.RemoveArtifact: _remove_artifact,
}
assert set(HANDLERS) == set(cmds.COMMANDS.values()), "every command has exactly one handler"


def is_plain_heartbeat(command: Any) -> bool:
    """A keep-alive: a heartbeat that reports neither allocations nor resources, so it only
    moves the node's lease and nobody needs to look at the state again."""
    return (isinstance(command, dict) and command.get("op") == "heartbeat" and not command.get("reports")
            and "resources" not in command and "artifacts" not in command)


def node_to_plain(node: NodeRecord) -> dict:
    """The wire/CLI form of a node record (also what admit/bootstrap commands carry)."""
    plain = dataclasses.asdict(node)
    plain["labels"] = dict(node.labels)
    plain["state"] = node.state
    return plain
