"""The site leader's duty towards the mesh document for apps, as one pure core: which app
edits and rollout moves to commit through Raft, and which of the site's records (its edits,
audit, summary and each app's progress) to write to the document.

meshstate decides each piece (what to take in, how a rollout's wave stands, what the
document lacks); this core strings them into one pass and keeps what must survive between
passes: edits this site cannot run (reported once), parsed rollout plans, the apps whose
progress was published as they were, and when the summary was last written. The daemon
(meshd.io.mesh.MeshSync) and the twin (meshd.twin) both drive it; trust, artifact holdings
and member summaries stay with the daemon's mesh service.

Invariants:
- Pure: no I/O, no clock; `wall` (wall seconds, compared with the document's stamps) and
  `mono` (monotonic seconds, for periods) are passed in. The document is only read.
- An edit refused once (its spec cannot run here, or the site's state machine refused it) is
  told once, as an Emit, and never taken in again by this core.
- A rollout move never doubles an edit taken in for the same app in the same pass.
- The summary is written when it changed, and at least every `summary_period` anyway (other
  sites judge reachability by its stamp); app progress only for apps that changed since it
  was last published, all of them again after a new term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from crdt.schema import AppEdit, AppSiteStatus, Record, RolloutControl, SiteSummary, app_status_key, rollout_control_key
from crdt.schema import AuditRecord as DocAuditRecord
from meshd import meshstate
from meshd.commands import Command, Refused, Result, SubmitApp
from meshd.node.effects import Emit
from meshd.state import AppWatch, SiteState


class Document(Protocol):
    """What the core reads of the mesh document (crdt.document.MeshDocument)."""

    def apps(self) -> dict: ...

    def get(self, kind: type, key: str): ...


@dataclass(frozen=True)
class TakeIn:
    """One command to commit: an edit taken in (`edit`), or a rollout move (edit None)."""
    edit: AppEdit | None
    command: Command


@dataclass
class Meshing:
    plans: meshstate.PlanCache = field(default_factory=meshstate.PlanCache)
    bad_edits: set[str] = field(default_factory=set)
    published_apps: AppWatch = field(default_factory=AppWatch)
    published_term: int | None = None
    summary_written: float = -math.inf  # mono time
    rollout_wake: float | None = None  # wall time a rollout's soak ends, if one waits on it

    # --- in ----------------------------------------------------------------------------

    def take_in(self, state: SiteState, document: Document, wall: float) -> tuple[list[TakeIn], list[Emit]]:
        """What to commit so the site runs what the document decided, and what to tell."""
        status_of, controls_of = readers(document)
        out: list[TakeIn] = []
        told: list[Emit] = []
        for edit in meshstate.edits_to_take_in(state, document.apps()):
            if edit.edit_id in self.bad_edits:
                continue
            command = meshstate.take_in_command(edit)
            if isinstance(command, str):
                self.bad_edits.add(edit.edit_id)
                told.append(Emit("sync", f"{edit.app} v{edit.version} from site {edit.site} cannot run here: "
                                         f"{command}", {"app": edit.app, "edit": edit.edit_id}))
                continue
            if isinstance(command, SubmitApp):
                command = meshstate.hold_for_wave(state, command, status_of, controls_of, wall)
            out.append(TakeIn(edit, command))
        moves = meshstate.rollout_moves(state, self.plans, status_of, controls_of, wall)
        self.rollout_wake = moves.wake
        taking = {item.edit.app for item in out if item.edit is not None}
        out += [TakeIn(None, command) for command in moves.commands
                if (command.spec.name if isinstance(command, SubmitApp) else command.app) not in taking]
        return out, told

    def taken(self, item: TakeIn, result: Result) -> list[Emit]:
        """After `item` committed with `result`: what to tell (a refused edit, once)."""
        if not isinstance(result, Refused) or item.edit is None:
            return []  # a refused rollout move raced another change: the next pass looks again
        edit = item.edit
        self.bad_edits.add(edit.edit_id)
        return [Emit("sync", f"{edit.app} v{edit.version} from site {edit.site} not taken in: {result.text}",
                     {"app": edit.app, "edit": edit.edit_id})]

    # --- out ---------------------------------------------------------------------------

    def publish(self, state: SiteState, document: Document, facts: meshstate.SiteFacts, term: int | None,
                wall: float, mono: float, summary_period: float) -> list[Record]:
        """The site's records the document lacks or holds older: edits, audit, the summary,
        and the progress of the apps that changed."""
        records: list[Record] = []
        records += meshstate.edits_to_publish(state, lambda edit_id: document.get(AppEdit, edit_id) is not None)
        records += meshstate.audit_to_publish(state, lambda key: document.get(DocAuditRecord, key) is not None)
        summary = meshstate.site_summary(state, facts, wall)
        if not meshstate.same_summary(document.get(SiteSummary, state.site), summary) \
                or mono - self.summary_written >= summary_period:
            records.append(summary)
            self.summary_written = mono
        if term != self.published_term:
            self.published_apps.clear()
            self.published_term = term
        records += [status for status in meshstate.app_statuses(state, wall, self.published_apps.changed(state))
                    if not meshstate.same_status(document.get(AppSiteStatus, status.key), status)]
        return records


def readers(document: Document):
    def status_of(app: str, site: str) -> AppSiteStatus | None:
        return document.get(AppSiteStatus, app_status_key(app, site))

    def controls_of(edit_id: str, site: str) -> list[RolloutControl]:
        found = (document.get(RolloutControl, rollout_control_key(edit_id, site, action)) for action in ("pause", "cancel"))
        return [control for control in found if control is not None]
    return status_of, controls_of
