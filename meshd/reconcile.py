"""Reconcile: what the site wants vs what it has -> replicas to place, allocations to stop.

Invariants:
- Pure: reads only the state and the `wall` time it is given (default: the state's last
  command time), never a clock, so a leader change alone (same state, new leader) yields
  exactly the same answer; nothing is rescheduled by it.
- A change of spec is paced by its deployment (meshd.rollout.paced_indexes): an index an
  old-version replica still holds is placed only when the rollout lets it; stops of old
  replicas are released only once their index is done (checked by the plan's maker and at
  apply: sitestate.waits_for_replacement).
- Only allocations with desired == "run" that are not terminal (Alloc.live) are ever
  stopped, and each at most once, with one reason.
- A replica index i of a running app at version V is *covered* by an allocation of
  (app, V, i) (or of a version with the same spec: AppRecord.runs) that is wanted (desired "run"), not lost, on a node that exists and is neither
  left, revoked nor draining, nor quarantined (`covers`). A failed or stopped allocation that exited on its
  own keeps covering: its restart policy already decided its fate.
- After the result is applied (stops stopped, placements placed on eligible nodes) reconcile
  returns nothing more to do: it is a fixpoint, and each index 0..replicas-1 of a running app
  is covered, by at most one live allocation.
- Output is deterministic: apps and allocation ids are walked in sorted order.
- Apps are independent: what `reconcile(state, apps)` says of some apps is exactly what the
  whole `reconcile(state)` says of them (the leader reconciles only the apps that changed).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

from meshd import rollout
from meshd.state import (
    ADMIN_DRAINING,
    ADMIN_LEFT,
    ADMIN_REVOKED,
    ALLOC_LOST,
    ALLOC_RUNNING,
    APP_STOPPED,
    DESIRED_RUN,
    Alloc,
    NodeRecord,
    SiteState,
)

# Nodes whose allocations no longer hold their replica: gone for good, or being emptied.
NON_COVERING_ADMIN = frozenset({ADMIN_LEFT, ADMIN_REVOKED, ADMIN_DRAINING})

REASON_APP_REMOVED = "app removed"
REASON_APP_STOPPED = "app stopped"
REASON_SCALED_DOWN = "scaled down"
REASON_NODE_DRAINING = "node draining"
REASON_NODE_QUARANTINED = "node quarantined"
REASON_DUPLICATE = "duplicate replica"


def replaced_reason(version: int) -> str:
    return f"replaced by version {version}"


@dataclass(frozen=True)
class Reconciliation:
    place: dict[str, tuple[int, ...]] = field(default_factory=dict)  # app -> replica indexes to place
    stop: tuple[tuple[str, str], ...] = ()  # (alloc_id, reason)

    @property
    def empty(self) -> bool:
        return not self.place and not self.stop

    def stops_for(self, app: str, state: SiteState) -> tuple[tuple[str, str], ...]:
        """The stops that concern one app (to put into that app's plan)."""
        return tuple((alloc_id, reason) for alloc_id, reason in self.stop
                     if alloc_id in state.allocs and state.allocs[alloc_id].app == app)


def covers(alloc: Alloc, node: NodeRecord | None) -> bool:
    """Whether `alloc` holds its replica index (the caller checks version and index range)."""
    return (
        alloc.desired == DESIRED_RUN
        and alloc.state != ALLOC_LOST
        and node is not None
        and node.admin not in NON_COVERING_ADMIN
        and not node.quarantine
    )


def _keep_order(alloc: Alloc) -> tuple:
    """Among allocations covering one index, the first is kept: live, running, oldest."""
    return (not alloc.live, alloc.state != ALLOC_RUNNING, alloc.created_at, alloc.alloc_id)


def _not_covering_reason(alloc: Alloc, node: NodeRecord | None, version: int, replicas: int) -> str:
    """Why a live allocation of a running app is not (or no longer) one of its replicas."""
    if node is None:
        return f"node {alloc.node_id} gone"
    if node.admin in (ADMIN_LEFT, ADMIN_REVOKED):
        return f"node {node.admin}"
    if not 0 <= alloc.replica < replicas:
        return REASON_SCALED_DOWN
    if alloc.version != version:
        return replaced_reason(version)
    # At the current version, in range, wanted, live, on an existing member: the only ways
    # left not to cover are a quarantined or draining node (see `covers`).
    return REASON_NODE_QUARANTINED if node.quarantine else REASON_NODE_DRAINING


def reconcile_app(state: SiteState, app: str, wall: float | None = None) -> tuple[tuple[int, ...], list[tuple[str, str]]]:
    """One app's share of `reconcile`: (replica indexes to place, stops). Costs that app's
    allocations (the table's per-app index), whatever else the site holds."""
    allocs = sorted(state.allocs.of_app(app), key=lambda a: a.alloc_id)
    record = state.apps.get(app)
    stop: list[tuple[str, str]] = []
    if record is None or record.status == APP_STOPPED:
        reason = REASON_APP_REMOVED if record is None else REASON_APP_STOPPED
        return (), [(a.alloc_id, reason) for a in allocs if a.live]

    version, replicas = record.version, record.spec.replicas
    holders: dict[int, list[Alloc]] = defaultdict(list)
    for alloc in allocs:
        node = state.nodes.get(alloc.node_id)
        if record.runs(alloc.version) and 0 <= alloc.replica < replicas and covers(alloc, node):
            holders[alloc.replica].append(alloc)
        elif alloc.live:
            stop.append((alloc.alloc_id, _not_covering_reason(alloc, node, version, replicas)))

    missing = []
    for index in range(replicas):
        group = holders.get(index)
        if not group:
            missing.append(index)
            continue
        keep = min(group, key=_keep_order)
        stop.extend((a.alloc_id, REASON_DUPLICATE) for a in group if a is not keep and a.live)
    if missing:
        seen = rollout.look(state, record, state.last_ts if wall is None else wall)
        allowed = rollout.paced_indexes(record, seen, missing, staged=not rollout.unstaged(state, record, seen))
        missing = [i for i in missing if i in allowed]
    return tuple(missing), stop


def site_apps(state: SiteState) -> list[str]:
    """Every app reconcile looks at: those the site runs or ran, and those with allocations
    left (an app removed while its allocations lived on), sorted."""
    return sorted(set(state.apps) | set(state.allocs.apps()))


def reconcile(state: SiteState, apps: Iterable[str] | None = None, wall: float | None = None) -> Reconciliation:
    """What to place and stop for `apps` (default: every app of the site, `site_apps`)."""
    place: dict[str, tuple[int, ...]] = {}
    stop: list[tuple[str, str]] = []
    for app in (site_apps(state) if apps is None else sorted(set(apps))):
        missing, stops = reconcile_app(state, app, wall)
        stop.extend(stops)
        if missing:
            place[app] = missing
    return Reconciliation(place=place, stop=tuple(sorted(stop)))
