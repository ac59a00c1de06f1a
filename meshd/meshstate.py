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

Invariants:
- Pure: no I/O, no clock (`ts` is an argument).
- Taking in never goes backwards: an edit older (crdt.schema.winning_order) than the one the
  site holds is not taken in; the site's own newer edit is published instead, and wins.
- An app the site never ran and whose edits never named it costs the site nothing (no Raft
  command): sites only carry what concerns them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from crdt.schema import AppEdit, AppSiteStatus, SchemaError, SiteSummary, winning_order
from crdt.schema import AuditRecord as DocAuditRecord
from meshd.state import ADMIN_LEFT, ADMIN_REVOKED, APP_RUNNING, SiteState

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
        taken = taken_edit(state, name)
        if taken is not None:
            if taken.edit_id == winner.edit_id or winning_order(taken) > winning_order(winner):
                continue  # up to date; or ours is newer and not published yet
        elif state.site not in winner.targets and name not in state.apps:
            continue  # never concerned this site
        wanted.append(winner)
    return wanted


def edits_to_publish(state: SiteState, has_edit: Callable[[str], bool]) -> list[AppEdit]:
    """Edits the site took in that the document does not hold."""
    out = []
    for name in sorted(state.mesh_edits):
        edit = taken_edit(state, name)
        if edit is not None and not has_edit(edit.edit_id):
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
                                      action=record.action[:64], target=record.target[:4096], site=record.site))
    missing.reverse()
    return missing


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


def app_statuses(state: SiteState, ts: float) -> list[AppSiteStatus]:
    """Each app's progress in this site: the edit it runs, replicas wanted and running."""
    out = []
    for name in sorted(state.apps):
        record = state.apps[name]
        desired = record.spec.replicas if record.status == APP_RUNNING else 0
        out.append(AppSiteStatus(app=name, site=state.site, edit_id=record.edit_id,
                                 version=record.mesh_version or record.version, desired=desired,
                                 running=state.running_replicas(name), ts=ts))
    return out


def same_summary(a: SiteSummary | None, b: SiteSummary) -> bool:
    """Equal but for the time stamp: nothing new to publish."""
    return a is not None and (a.nodes, a.ready, a.leader, a.addresses) == (b.nodes, b.ready, b.leader, b.addresses)


def same_status(a: AppSiteStatus | None, b: AppSiteStatus) -> bool:
    return a is not None and (a.edit_id, a.version, a.desired, a.running) == (b.edit_id, b.version, b.desired,
                                                                             b.running)
