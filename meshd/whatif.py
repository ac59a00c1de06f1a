"""What if: the site's live state as if some changes had happened, answered by the real state
machine, reconcile and placement (`meshctl plan FILE --what-if down:NODE --what-if drain:NODE
--what-if cut:SITE`). Nothing is committed: the changes are applied to a copy.

Changes:
- `down:NODE`: the node stops answering; the leader's verdict (SetLiveness down) is applied,
  so its replicas are lost and reconcile places them anew;
- `drain:NODE`: an operator drains it (Drain), so its replicas move;
- `cut:SITE`: the site is cut off from the others. A site runs on alone when cut off: nothing
  in this site's placement changes; an app that also targets SITE is told that SITE takes no
  change until the link returns. Cutting this node's own site changes nothing here either.

Invariants:
- Pure: the state given is never changed (a copy is); `ts` is passed in.
- Every change goes through sitestate.apply, as the real one would: a change the state
  machine refuses (an unknown node) is refused here with its reason, and nothing is answered.
- `moves` is what the leader's reconcile would place after the changes: for every app, each
  replica index without a covering allocation, where it would go, or why it cannot go.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from meshd import commands as cmds
from meshd import sitestate
from meshd.placement.plan import make_plan
from meshd.reconcile import reconcile_app, site_apps
from meshd.state import APP_RUNNING, AppSpec, SiteState

KINDS = ("down", "drain", "cut")
MAX_CHANGES = 64  # what-ifs of one question; more is a scenario for `meshd sim`


class WhatIfError(ValueError):
    """A what-if that cannot be answered; the message says why."""


@dataclass(frozen=True)
class Change:
    kind: str
    target: str


def parse(items: Iterable[object]) -> tuple[Change, ...]:
    changes = []
    for item in items:
        kind, _, target = str(item).partition(":")
        if kind not in KINDS or not target:
            raise WhatIfError(f"--what-if {str(item)[:80]!r}: use down:NODE, drain:NODE or cut:SITE")
        changes.append(Change(kind, target))
    if len(changes) > MAX_CHANGES:
        raise WhatIfError(f"at most {MAX_CHANGES} --what-if changes at once")
    return tuple(changes)


def imagine(state: SiteState, changes: tuple[Change, ...], ts: float) -> tuple[SiteState, list[str]]:
    """A copy of `state` with `changes` applied, and notes on what they mean here."""
    copy = state.snapshot_copy()
    notes = []
    for change in changes:
        if change.kind == "cut":
            notes.append(f"site {change.target} cut off: it runs on alone; "
                         + ("nothing here moves" if change.target == state.site else
                            "changes for it wait until the link returns"))
            continue
        node = copy.node_by_ref(change.target)
        if node is None:
            raise WhatIfError(f"--what-if {change.kind}:{change.target}: no member of site {state.site} named so")
        command = (cmds.SetLiveness(node_id=node.node_id, liveness="down", reason="what-if: down")
                   if change.kind == "down" else cmds.Drain(node=node.node_id, actor="what-if"))
        result = sitestate.apply(copy, cmds.encode(command, cmds.Envelope(ts=ts)))
        if isinstance(result, cmds.Refused):
            raise WhatIfError(f"--what-if {change.kind}:{change.target}: {result.text}")
    return copy, notes


def moves(state: SiteState, new_alloc_id: Callable[[], str]) -> list[dict]:
    """Where reconcile would place each replica that lacks a covering allocation in `state`."""
    out = []
    for app in site_apps(state):
        record = state.apps.get(app)
        if record is None or record.status != APP_RUNNING:
            continue
        missing, _stops = reconcile_app(state, app, state.last_ts)
        if not missing:
            continue
        plan = make_plan(state, record.spec, record.version, missing, new_alloc_id)
        names = dict(plan.node_names)
        for placement in plan.placements:
            out.append({"app": app, "replica": placement.replica,
                        "to": names.get(placement.node_id, placement.node_id), "reason": ""})
        for replica, reason in plan.unplaced:
            out.append({"app": app, "replica": replica, "to": None, "reason": reason})
    return out


def cut_targets(spec: AppSpec, changes: tuple[Change, ...]) -> list[str]:
    """The sites of `spec` a cut leaves out of the change."""
    return sorted({c.target for c in changes if c.kind == "cut"} & set(spec.sites))
