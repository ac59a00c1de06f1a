"""Between the mesh document (crdt/, every site) and one site's Raft state (meshd.sitestate):
what the site's leader must take in from the document, and what it must publish to it.

The document holds the mesh's desired state: every app edit made anywhere, the winner of each
app decided the same way on every replica (crdt.document.resolve). The site's Raft state holds
what this site agreed to run: each app's latest edit it took in (`SiteState.mesh_edits`), and
its own placements. The leader closes the gap in both directions:
- in: every app whose winner is not the edit the site last took in is committed through Raft
  (a deploy or a stop carrying the edit); an app whose winner names other sites only is
  stopped here (data residency);
- out: edits the site took in but the document lacks (a deploy acknowledged by Raft whose
  document write was lost with its node) are written again; so are the site's audit records,
  its summary and each app's progress here.
- rollouts across sites (`[app.rollout]`, meshd.waves): an edit whose wave has not reached
  the site is taken in held (`SubmitApp.hold`) and opened once it has; a rollout cancelled or
  stopped by failures elsewhere makes the site return from it; a paused one pauses the site's
  deployment. Each site's word on its part goes out in its app statuses.
- the policy bundle both ways: the site's bundle goes to the document (`policy/<serial>/<sig>`,
  kept beside the others); the best-ranked verified bundle there (attestation.policy.rank)
  replaces the site's if it outranks it. Two bundles of one serial were made apart: every
  site ends with the same one, and `policy_conflicts` names the other.
- revocations both ways: each entry of the site's root-signed list goes to the document on
  its own (`revocation/<node id>`, signed by the root); every verified entry there that the
  list lacks is added to it through Raft. The document's entries only ever grow, so every
  site ends with the union, whatever was revoked where while they were cut off.

Invariants:
- Pure: no I/O, no clock (`ts` is an argument).
- A revocation is taken in only if it verifies with the mesh root for this mesh; a record that
  does not is reported with its reason, never acted on.
- Taking in never goes backwards: an edit older (crdt.schema.winning_order) than the one the
  site holds is not taken in; the site's own newer edit is published instead, and wins.
- An app the site never ran and whose edits never named it costs the site nothing (no Raft
  command): sites only carry what concerns them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable

from attestation.evidence import SOFTWARE_EVIDENCE, TPM_EVIDENCE
from attestation.policy import POLICY_KIND, open_policy
from attestation.policy import rank as policy_rank
from attestation.revocation import REVOCATION_ENTRY_KIND, Revocation, RevocationList, open_revocation
from attestation.signed import AttestationError
from crdt.schema import (AppEdit, AppSiteStatus, NodeSummary, RolloutControl, SchemaError, SignedRecord, SiteSummary,
                         winning_order)
from crdt.schema import AuditRecord as DocAuditRecord
from meshd import deployments, fleethealth, sitestate, waves
from meshd import spec as specmod
from meshd.commands import MAX_PURGE, Command, PurgeApps, Rollout, StopApp, SubmitApp, TrimAudit
from meshd.fleethealth import Health
from meshd.state import ADMIN_LEFT, ADMIN_REVOKED, APP_RUNNING, NodeRecord, RolloutPlan, SiteState

if TYPE_CHECKING:
    from crdt.document import AppResolution


def taken_edit(state: SiteState, app: str) -> AppEdit | None:
    raw = state.mesh_edits.get(app)
    if raw is None:
        return None
    try:
        return AppEdit.from_plain(raw)
    except SchemaError:  # written by this very module after validation: cannot happen
        return None


def edits_to_take_in(state: SiteState, apps: dict[str, "AppResolution"]) -> list[AppEdit]:
    """Winners the site must commit (deploy or stop carrying the edit), in app order."""
    wanted = []
    for name, resolution in sorted(apps.items()):
        winner = resolution.winner
        raw = state.mesh_edits.get(name)
        if raw is not None:
            if raw.get("edit_id") == winner.edit_id:
                continue  # up to date (the common case: decided without parsing the edit)
            taken = taken_edit(state, name)
            if taken is not None and winning_order(taken) > winning_order(winner):
                continue  # ours is newer and not published yet
        elif state.site not in winner.targets and name not in state.apps:
            continue  # never concerned this site
        elif winner.stopped and name not in state.apps:
            continue  # a stop of what does not run here (never did, or forgotten after its retention)
        wanted.append(winner)
    return wanted


def take_in_command(edit: AppEdit) -> StopApp | SubmitApp | str:
    """The Raft command that takes in one winning edit (a stop, or a deploy of its spec), or
    why it cannot run here (its spec does not parse with this version, or names another app)."""
    actor = f"{edit.actor} (site {edit.site})"
    if edit.stopped:
        return StopApp(app=edit.app, edit=edit, actor=actor)
    try:
        app_spec = specmod.parse_app_toml(edit.spec)
    except specmod.SpecError as e:
        return str(e)
    if app_spec.name != edit.app:
        return str(specmod.SpecError("app.name", f"is {app_spec.name!r}, the edit is for {edit.app!r}"))
    return SubmitApp(spec=app_spec, edit=edit, actor=actor)


def edits_to_publish(state: SiteState, has_edit: Callable[[str], bool]) -> list[AppEdit]:
    """Edits the site took in that the document does not hold."""
    out = []
    for name in sorted(state.mesh_edits):
        if has_edit(state.mesh_edits[name].get("edit_id", "")):
            continue  # published (decided without parsing the edit)
        edit = taken_edit(state, name)
        if edit is not None:
            out.append(edit)
    return out


def audit_key(site: str, seq: int) -> str:
    return f"{site}/{seq}"


def audit_to_publish(state: SiteState, has_audit: Callable[[str], bool]) -> list[DocAuditRecord]:
    """The site's audit records the document lacks, oldest first. Records are published in
    order, so the scan stops at the first one (from the newest back) that is there."""
    missing = []
    for record in reversed(state.audit):
        if record.seq <= 0:
            continue  # written before records were numbered: never published
        key = audit_key(state.site, record.seq)
        if has_audit(key):
            break
        missing.append(DocAuditRecord(audit_id=key, ts=record.ts, actor=record.actor[:4096],
                                      action=record.action[:64], target=record.target[:4096], site=record.site,
                                      reason=record.reason[:4096]))
    missing.reverse()
    return missing


def revocation_key(node_id: str) -> str:
    return f"{REVOCATION_ENTRY_KIND}/{node_id}"


def revocations_to_publish(listed: RevocationList, has_record: Callable[[str], bool]) -> list[Revocation]:
    """Entries of the site's list that the document does not carry yet, by node id."""
    return [entry for node_id, entry in sorted(listed.entries.items()) if not has_record(revocation_key(node_id))]


def _signed_record(key: str, kind: str, serial: int, signed: dict, site: str, ts: float) -> SignedRecord:
    return SignedRecord(key=key, kind=kind, serial=serial, body=json.dumps(signed, separators=(",", ":"), sort_keys=True),
                        site=site, ts=ts)


def revocation_record(signed: dict, serial: int, site: str, ts: float) -> SignedRecord:
    """The document record of one root-signed entry (`attestation.revocation.sign_revocation`)."""
    return _signed_record(revocation_key(signed["body"]["node_id"]), REVOCATION_ENTRY_KIND, serial, signed, site, ts)


@dataclass(frozen=True)
class RevocationsIn:
    """What the document holds that the site's list lacks."""
    entries: tuple[Revocation, ...]  # verified, to add to the list
    sites: tuple[str, ...]  # where they were issued
    refused: tuple[tuple[str, str], ...]  # (record key, reason): records that do not verify


def _verified(records: list[SignedRecord], kind: str, opener: Callable[[dict], Any],
              refused: list[tuple[str, str]]) -> list[tuple[SignedRecord, Any]]:
    """(record, what `opener` made of its signed body) for the records of `kind` that verify;
    the others are added to `refused` with the reason."""
    out = []
    for record in sorted(records, key=lambda r: r.key):
        if record.kind != kind:
            continue
        try:
            signed = json.loads(record.body)
        except ValueError:
            refused.append((record.key, "the body is not JSON"))
            continue
        try:
            opened = opener(signed)
        except AttestationError as e:
            refused.append((record.key, str(e)))
            continue
        out.append((record, opened))
    return out


def revocations_to_take_in(listed: RevocationList, records: list[SignedRecord], root_public_key: bytes,
                           mesh_id: str) -> RevocationsIn:
    prefix = f"{REVOCATION_ENTRY_KIND}/"
    unlisted = [r for r in records if not listed.is_revoked(r.key.removeprefix(prefix))]  # verify only those
    refused: list[tuple[str, str]] = []
    entries: dict[str, Revocation] = {}
    sites: set[str] = set()
    for record, entry in _verified(unlisted, REVOCATION_ENTRY_KIND,
                                   lambda signed: open_revocation(signed, root_public_key, mesh_id), refused):
        if record.key != revocation_key(entry.node_id):
            refused.append((record.key, f"the signed entry names {entry.node_id}"))
            continue
        entries[entry.node_id] = entry
        sites.add(record.site)
    return RevocationsIn(tuple(entries.values()), tuple(sorted(sites)), tuple(refused))


def policy_key(signed: dict) -> str:
    return f"{POLICY_KIND}/{signed['body']['serial']}/{str(signed['sig'])[:16]}"


def policy_record(signed: dict, site: str, ts: float) -> SignedRecord:
    """The document record of the site's root-signed policy bundle."""
    return _signed_record(policy_key(signed), POLICY_KIND, int(signed["body"]["serial"]), signed, site, ts)


@dataclass(frozen=True)
class PolicyBundle:
    signed: dict  # the root-signed document
    rank: tuple[int, float, str]
    site: str  # where it was made


@dataclass(frozen=True)
class PoliciesIn:
    bundles: tuple[PolicyBundle, ...]  # every verified bundle in the document, best first
    refused: tuple[tuple[str, str], ...]  # (record key, reason)


def policies_in_document(records: list[SignedRecord], root_public_key: bytes, mesh_id: str) -> PoliciesIn:
    refused: list[tuple[str, str]] = []
    bundles = []
    for record, (policy, document) in _verified(records, POLICY_KIND,
                                                lambda signed: (open_policy(signed, root_public_key), signed), refused):
        if policy.mesh_id != mesh_id:
            refused.append((record.key, "the policy is for another mesh"))
            continue
        bundles.append(PolicyBundle(document, policy_rank(document, policy), record.site))
    return PoliciesIn(tuple(sorted(bundles, key=lambda b: b.rank, reverse=True)), tuple(refused))


def policy_to_take_in(current_rank: tuple, found: PoliciesIn) -> PolicyBundle | None:
    """The document's best bundle if it outranks the site's (the site's own ranks the same)."""
    best = found.bundles[0] if found.bundles else None
    return best if best is not None and best.rank > current_rank else None


def policy_conflicts(found: PoliciesIn) -> list[tuple[PolicyBundle, PolicyBundle]]:
    """(winner, loser) for every bundle that lost to another of the same serial."""
    by_serial: dict[int, list[PolicyBundle]] = {}
    for bundle in found.bundles:  # best first, so each list's head is its winner
        by_serial.setdefault(bundle.rank[0], []).append(bundle)
    return [(same[0], loser) for same in by_serial.values() for loser in same[1:]]


@dataclass(frozen=True)
class SiteFacts:
    """What the leader knows besides the replicated state: its own name, and the peer
    addresses of the members other sites may dial."""
    leader: str | None
    addresses: tuple[str, ...]


def site_summary(state: SiteState, facts: SiteFacts, ts: float) -> SiteSummary:
    members = [n for n in state.nodes.values() if n.admin not in (ADMIN_LEFT, ADMIN_REVOKED)]
    return SiteSummary(site=state.site, nodes=len(members), ready=sum(1 for n in members if n.state == "ready"),
                       leader=facts.leader, addresses=facts.addresses[:64], ts=ts)


def evidence_kind(node: NodeRecord) -> str:
    """What the node's admission rested on, as `nodes` shows it."""
    if not node.attested_at:
        return "none"
    return TPM_EVIDENCE if node.tpm_ak else SOFTWARE_EVIDENCE


def node_summaries(state: SiteState, facts: SiteFacts, ts: float,
                   health: Callable[[str], Health] | None = None) -> list[NodeSummary]:
    """Every member the site has records of (also left and revoked ones), for other sites'
    `nodes --site`. Resources go as health figures over an interval (`health`, meshd.fleethealth),
    never as raw samples: they move all the time, and placement only ever uses the site's own."""
    out = []
    for node in sorted(state.nodes.values(), key=lambda n: n.node_id):
        role = "leader" if node.name == facts.leader else ("follower" if node.voter else "nonvoter")
        labels = tuple(f"{k}={v}" for k, v in sorted(node.labels.items()))
        figures = health(node.node_id) if health is not None else Health()
        out.append(NodeSummary(node_id=node.node_id, name=node.name, site=state.site, state=node.state,
                               address=node.address[:64], arch=node.arch[:32], role=role,
                               allocs=state.allocs.live_count(node.node_id),
                               labels=labels, evidence=evidence_kind(node), ts=ts,
                               cpu_p50=figures.cpu_p50, cpu_p95=figures.cpu_p95, mem_p50=figures.mem_p50,
                               mem_p95=figures.mem_p95, restarts=figures.restarts, oom_kills=figures.oom_kills))
    return out


HEALTH_FIELDS = ("cpu_p50", "cpu_p95", "mem_p50", "mem_p95", "restarts", "oom_kills")


def same_node(a: NodeSummary | None, b: NodeSummary) -> bool:
    """Equal but for the time stamp."""
    return a is not None and a.to_plain() | {"ts": 0.0} == b.to_plain() | {"ts": 0.0}


def node_summary_due(published: NodeSummary | None, new: NodeSummary, health_age: float) -> bool:
    """Whether `new` goes into the document: at once when what it says of the node changed or
    it has its first health figures, changed figures only once those there are PUBLISH_PERIOD
    old (`health_age`: seconds since this node's summary was last written)."""
    if published is None:
        return True
    old, now = published.to_plain(), new.to_plain()
    identity = lambda plain: {k: v for k, v in plain.items() if k != "ts" and k not in HEALTH_FIELDS}  # noqa: E731
    if identity(old) != identity(now):
        return True
    if old.get("cpu_p50") is None and now.get("cpu_p50") is not None:
        return True  # its first figures: at once
    return health_age >= fleethealth.PUBLISH_PERIOD and any(old.get(k) != now.get(k) for k in HEALTH_FIELDS)


def app_statuses(state: SiteState, ts: float, apps: Iterable[str] | None = None) -> list[AppSiteStatus]:
    """Each app's progress in this site (of `apps` only, when given): the edit it runs,
    replicas wanted and running. Costs the apps' own allocations."""
    out = []
    for name in sorted(state.apps if apps is None else set(apps) & state.apps.keys()):
        record = state.apps[name]
        desired = record.spec.replicas if record.status == APP_RUNNING else 0
        word = (deployments.edit_outcome(state, record, ts) if record.status == APP_RUNNING and record.edit_id
                else {})
        out.append(AppSiteStatus(app=name, site=state.site, edit_id=record.edit_id,
                                 version=record.mesh_version or record.version, desired=desired,
                                 running=state.running_replicas(name), ts=ts, deployment=word.get("state", ""),
                                 healthy=word.get("healthy", 0), canaries=word.get("canaries", 0),
                                 ended_ts=word.get("ended_ts", 0.0)))
    return out


def apps_to_purge(state: SiteState, ts: float, retention: float, has_edit: Callable[[str], bool]) -> PurgeApps | None:
    """The purge of the stopped apps whose retention ran out (sitestate.purge_refusal), or
    None. An app whose stop the document does not hold yet is kept: the site's record of the
    edit is what would publish it again (`edits_to_publish`)."""
    due = [name for name in sorted(state.apps)
           if sitestate.purge_refusal(state, name, ts, retention) is None
           and has_edit(state.apps[name].edit_id or state.mesh_edits.get(name, {}).get("edit_id", ""))]
    return PurgeApps(apps=tuple(due[:MAX_PURGE]), retention=retention) if due else None


# The site's audit is trimmed in steps of at least this many records: one small command a
# hundred records, not one a record (a busy site writes a few a second).
TRIM_AUDIT_BATCH = 100


def audit_to_trim(state: SiteState, ts: float, retention: float, has_audit: Callable[[str], bool],
                  summed_upto: int) -> TrimAudit | None:
    """The trim of the site's oldest audit records (sitestate's trim_audit), or None: those
    older than the document `retention` that the document holds or has summed up (numbered
    `summed_upto` or less, crdt.schema.DroppedAudit), from the oldest on, stopping at the first
    that is neither (published in order: it and what follows may not be in the document yet),
    and never the newest."""
    audit, due = state.audit, []
    for at in range(len(audit) - 1):  # by age first: a pass with nothing due asks the document nothing
        record = audit[at]
        if record.ts > ts - retention:
            break
        if record.seq > 0:  # one written before records were numbered was never published: kept
            due.append(record)
    if len(due) < TRIM_AUDIT_BATCH:
        return None
    upto = count = 0
    for record in due:
        if record.seq > summed_upto and not has_audit(audit_key(state.site, record.seq)):
            break
        upto, count = record.seq, count + 1
    return TrimAudit(upto_seq=upto, retention=retention) if count >= TRIM_AUDIT_BATCH else None


def same_summary(a: SiteSummary | None, b: SiteSummary) -> bool:
    """Equal but for the time stamp: nothing new to publish."""
    return a is not None and (a.nodes, a.ready, a.leader, a.addresses) == (b.nodes, b.ready, b.leader, b.addresses)


def same_status(a: AppSiteStatus | None, b: AppSiteStatus) -> bool:
    """Equal but for the time stamp."""
    return a is not None and a.to_plain() | {"ts": 0.0} == b.to_plain() | {"ts": 0.0}


# --- rollouts across sites (meshd.waves decides) ---------------------------------------
StatusOf = Callable[[str, str], "AppSiteStatus | None"]  # (app, site) -> the document's status
ControlsOf = Callable[[str, str], "list[RolloutControl]"]  # (edit id, site) -> its controls there
# Rollout plans parsed from edits' specs, remembered by edit id: the leader looks at every
# taken-in app on each pass, and a spec is parsed once, not once a pass. Bounded, oldest out
# first: well above the thousand-odd apps a site holds, so a pass never parses them again.
PLAN_CACHE_SIZE = 16384


class PlanCache:
    """The `[app.rollout]` of an edit (None: the app has none), by edit id."""

    def __init__(self, size: int = PLAN_CACHE_SIZE) -> None:
        self._size = size
        self._plans: dict[str, RolloutPlan | None] = {}

    def plan(self, edit_id: str, spec: str, stopped: bool) -> RolloutPlan | None:
        """Of the edit `edit_id` whose spec is `spec` (an edit as the document or the site's
        `mesh_edits` hold it)."""
        if edit_id in self._plans:
            return self._plans[edit_id]
        plan = None
        if not stopped:
            try:
                plan = specmod.parse_app_toml(spec).rollout
            except specmod.SpecError:
                plan = None  # take-in reports it
        if len(self._plans) >= self._size:
            self._plans.pop(next(iter(self._plans)))
        self._plans[edit_id] = plan
        return plan


def rollout_view(edit: AppEdit, plan: RolloutPlan, status_of: StatusOf, controls_of: ControlsOf,
                 now: float) -> waves.RolloutView:
    """The edit's rollout as the document shows it: each target site's word on that very edit,
    and the controls made of it in any target site."""
    words, controls = {}, []
    for site in edit.targets:
        status = status_of(edit.app, site)
        if status is not None and status.edit_id == edit.edit_id and status.deployment:
            words[site] = waves.SiteWord(status.deployment, status.healthy, status.desired, status.canaries,
                                         status.ended_ts)
        controls += [waves.Control(c.action, c.ts, c.site, c.actor, c.reason) for c in controls_of(edit.edit_id, site)
                     if c.app == edit.app and c.action in waves.CONTROL_ACTIONS]
    return waves.view(edit.app, edit.targets, plan, words, controls, now)


def hold_for_wave(state: SiteState, command: SubmitApp, status_of: StatusOf, controls_of: ControlsOf,
                  now: float) -> SubmitApp:
    """`command` held when it takes in an edit whose rollout has not reached this site yet."""
    edit, plan = command.edit, command.spec.rollout
    if edit is None or plan is None or state.site not in edit.targets:
        return command
    view = rollout_view(edit, plan, status_of, controls_of, now)
    return replace(command, hold=not view.may_run(state.site))


@dataclass(frozen=True)
class RolloutMoves:
    commands: list[Command]
    wake: float | None  # when a wave's soak ends (a pass is due then), or None


def rollout_moves(state: SiteState, plans: PlanCache, status_of: StatusOf, controls_of: ControlsOf,
                  now: float) -> RolloutMoves:
    """What the site must do so its part of each rollout follows the document: open an edit it
    holds once its wave opened; return from an edit whose rollout was cancelled or stopped;
    pause or resume its deployment as the rollout is. Only apps whose taken-in edit has a
    rollout cost more than a look-up."""
    out: list[Command] = []
    wake: float | None = None
    for name, raw in sorted(state.mesh_edits.items()):
        plan = plans.plan(raw.get("edit_id", ""), raw.get("spec", ""), bool(raw.get("stopped")))
        if plan is None or state.site not in raw.get("targets", ()):
            continue
        edit = taken_edit(state, name)
        if edit is None:
            continue
        view = rollout_view(edit, plan, status_of, controls_of, now)
        if view.next_open_at is not None and not view.stopped:
            wake = view.next_open_at if wake is None else min(wake, view.next_open_at)
        record = state.apps.get(name)
        if record is None or record.edit_id != edit.edit_id:
            if view.may_run(state.site):
                command = take_in_command(edit)
                if isinstance(command, SubmitApp):
                    out.append(command)
            continue
        if record.status != APP_RUNNING:
            continue
        d = record.deployment
        step = waves.site_step(view, state.site, deployments.edit_state(record)[0])
        actor = "meshd (site leader)"
        if step == "abort" and not sitestate.abort_refusal(record, record.version):
            out.append(Rollout(app=name, version=record.version, action="abort", reason=view.reason, actor=actor))
        elif step in ("pause", "resume") and d is not None and d.active and d.edit_id == edit.edit_id \
                and d.version == record.version:
            out.append(Rollout(app=name, version=d.version, action=step, reason=view.reason, actor=actor))
    return RolloutMoves(out, wake)
