"""Plans: where the replicas of one app version go, made on the leader's view and re-checked
against the latest state when applied (Nomad's plan/apply split).

Invariants:
- Pure: the only outside input is `new_alloc_id`, called once per placement made.
- `make_plan` places replicas in ascending index order, each on the best feasible node
  (meshd.placement.rank), counting the placements it has already made and releasing the
  allocations it stops. A replica with no feasible node is listed in `unplaced` with a
  reason, never dropped silently.
- `Plan.filtered` lists every node of the state that is infeasible for the app *before* any
  placement of this plan (stops already released), sorted by node_id, each with its reason.
- `recheck_plan` accepts a placement only if, in the latest state, the app still runs at
  the plan's version, the node still passes every checker (counting the placements accepted
  before it in the same plan) and no allocation already covers that replica; every refusal
  carries a reason. Applying the same plan twice therefore places nothing the second time.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from meshd.placement.feasible import CHECKERS, Reserved, check_node, failing_check, free_mem_mb, node_usage
from meshd.placement.rank import DEFAULT_ALGORITHM, Candidate, rank_key
from meshd.reconcile import covers
from meshd.state import APP_STOPPED, AppSpec, NodeRecord, SiteState


@dataclass(frozen=True)
class Placement:
    alloc_id: str
    app: str
    version: int
    replica: int
    node_id: str


@dataclass(frozen=True)
class Filtered:
    node_id: str
    name: str  # node name, as the CLI shows it
    reason: str


@dataclass(frozen=True)
class Plan:
    app: str
    version: int
    placements: tuple[Placement, ...]
    stops: tuple[tuple[str, str], ...]  # (alloc_id, reason)
    filtered: tuple[Filtered, ...]
    unplaced: tuple[tuple[int, str], ...]  # (replica, reason) that found no node
    node_names: tuple[tuple[str, str], ...] = ()  # (node_id, name) of placement nodes, for display

    def to_plain(self) -> dict:
        """JSON-ready; `stops` are [alloc_id, reason] pairs as the apply command takes them."""
        names = dict(self.node_names)
        return {
            "app": self.app,
            "version": self.version,
            "placements": [
                {
                    "node": names.get(p.node_id, p.node_id),
                    "node_id": p.node_id,
                    "replica": p.replica,
                    "alloc_id": p.alloc_id,
                    "version": p.version,
                }
                for p in self.placements
            ],
            "filtered": [{"node": f.name, "node_id": f.node_id, "reason": f.reason} for f in self.filtered],
            "stops": [[alloc_id, reason] for alloc_id, reason in self.stops],
            "unplaced": [{"replica": replica, "reason": reason} for replica, reason in self.unplaced],
        }

    @classmethod
    def from_plain(cls, plain: Mapping) -> Plan:
        """The inverse of to_plain (for a plan that travelled as plain data)."""
        app = plain["app"]
        version = plain["version"]
        placements = tuple(
            Placement(alloc_id=p["alloc_id"], app=app, version=p.get("version", version),
                      replica=p["replica"], node_id=p["node_id"])
            for p in plain.get("placements", ())
        )
        return cls(
            app=app,
            version=version,
            placements=placements,
            stops=tuple((alloc_id, reason) for alloc_id, reason in plain.get("stops", ())),
            filtered=tuple(Filtered(f["node_id"], f["node"], f["reason"]) for f in plain.get("filtered", ())),
            unplaced=tuple((u["replica"], u["reason"]) for u in plain.get("unplaced", ())),
            node_names=tuple(sorted({(p["node_id"], p.get("node", p["node_id"]))
                                     for p in plain.get("placements", ())})),
        )


def _no_node_reason(site: str, failures: list[tuple[NodeRecord, str, str]]) -> str:
    """One line for a replica that found no node: failures per checker, then the first one."""
    if not failures:
        return f"no nodes in site {site}"
    per_checker = Counter(checker for _, checker, _ in failures)
    counts = ", ".join(f"{name} {per_checker[name]}" for name, _ in CHECKERS if per_checker[name])
    node, _, reason = failures[0]
    return f"no feasible node among {len(failures)} ({counts}); {node.name}: {reason}"


def make_plan(
    state: SiteState,
    spec: AppSpec,
    version: int,
    replicas: Iterable[int],
    new_alloc_id: Callable[[], str],
    stops: Iterable[tuple[str, str]] = (),
    algorithm: str = DEFAULT_ALGORITHM,
) -> Plan:
    """Place each replica index of `spec` at `version` on the state as given.

    `spec` need not be in state.apps (a dry run of a new app). `stops` are allocations this
    plan also stops; their resources count as free for its placements.
    """
    key = rank_key(algorithm)
    stops = tuple((alloc_id, reason) for alloc_id, reason in stops)
    reserved = Reserved(released=(alloc_id for alloc_id, _ in stops))
    nodes = [state.nodes[node_id] for node_id in sorted(state.nodes)]

    def candidate(node: NodeRecord) -> tuple[tuple, str]:
        usage = node_usage(node.node_id, state, reserved, spec.name)
        return key(Candidate(node.node_id, usage.app_allocs, usage.allocs, free_mem_mb(node, usage))), node.node_id

    # Every node is weighed once; after that only the node that took a replica changes (its
    # usage, its rank, maybe its feasibility), so the best node for the next replica is the
    # top of a heap of the feasible ones, each re-weighed when it takes one. The same choice
    # as weighing every node for every replica, at a cost of nodes + replicas * log(nodes).
    filtered = []
    ranked: list[tuple[tuple, str]] = []
    for node in nodes:
        failure = failing_check(node, spec, state, reserved)
        if failure is not None:
            filtered.append(Filtered(node.node_id, node.name, failure[1]))
        else:
            ranked.append(candidate(node))
    heapq.heapify(ranked)

    placements: list[Placement] = []
    unplaced: list[tuple[int, str]] = []
    for replica in sorted(set(replicas)):
        if not ranked:  # every node fails a check now: say why, node by node
            failures = [(node, *failure) for node in nodes
                        if (failure := failing_check(node, spec, state, reserved)) is not None]
            unplaced.append((replica, _no_node_reason(state.site, failures)))
            continue
        _, node_id = heapq.heappop(ranked)
        placements.append(Placement(new_alloc_id(), spec.name, version, replica, node_id))
        reserved.add(node_id, spec.name, spec.resources)
        node = state.nodes[node_id]
        if failing_check(node, spec, state, reserved) is None:
            heapq.heappush(ranked, candidate(node))

    used = sorted({p.node_id for p in placements})
    return Plan(
        app=spec.name,
        version=version,
        placements=tuple(placements),
        stops=stops,
        filtered=tuple(filtered),
        unplaced=tuple(unplaced),
        node_names=tuple((node_id, state.nodes[node_id].name) for node_id in used),
    )


def _covering(state: SiteState, apps: Iterable[str], released: frozenset[str]) -> dict[tuple[str, int, int], str]:
    """(app, version, replica) -> id of an allocation holding it (meshd.reconcile.covers), for
    the apps a plan places: their own allocations, not the site's (a plan is applied on the
    Raft thread)."""
    held: dict[tuple[str, int, int], str] = {}
    for app in sorted(set(apps)):
        for alloc in sorted(state.allocs.of_app(app), key=lambda a: a.alloc_id, reverse=True):
            # reverse: the smallest id is written last and wins, for a stable message
            if alloc.alloc_id not in released and covers(alloc, state.nodes.get(alloc.node_id)):
                held[(alloc.app, alloc.version, alloc.replica)] = alloc.alloc_id
    return held


def _refusal(state: SiteState, placement: Placement, reserved: Reserved,
             held: dict[tuple[str, int, int], str], placed: set[tuple[str, int, int]]) -> str | None:
    p = placement
    if p.alloc_id in state.allocs:
        return f"alloc {p.alloc_id} already exists"
    record = state.apps.get(p.app)
    if record is None:
        return f"app {p.app} no longer exists"
    if record.status == APP_STOPPED:
        return f"app {p.app} is stopped"
    if p.version != record.version:
        return f"version {p.version} of app {p.app} superseded by version {record.version}"
    if not 0 <= p.replica < record.spec.replicas:
        return f"replica {p.replica} out of range, app {p.app} has {record.spec.replicas} replicas"
    if (p.app, p.version, p.replica) in placed:
        return f"replica {p.replica} placed twice in one plan"
    holder = held.get((p.app, p.version, p.replica))
    if holder is not None:
        return f"replica {p.replica} of {p.app} version {p.version} already covered by alloc {holder}"
    node = state.nodes.get(p.node_id)
    if node is None:
        return f"node {p.node_id} no longer in site"
    reason = check_node(node, record.spec, state, reserved)
    if reason is not None:
        return f"node {node.name}: {reason}"
    return None


def recheck_plan(state: SiteState, plan: Plan) -> tuple[list[Placement], list[tuple[Placement, str]]]:
    """Split the plan's placements, in plan order, into accepted and refused (with reasons)."""
    reserved = Reserved(released=(alloc_id for alloc_id, _ in plan.stops))
    held = _covering(state, (p.app for p in plan.placements), reserved.released)
    placed: set[tuple[str, int, int]] = set()
    accepted: list[Placement] = []
    refused: list[tuple[Placement, str]] = []
    for placement in plan.placements:
        reason = _refusal(state, placement, reserved, held, placed)
        if reason is not None:
            refused.append((placement, reason))
            continue
        accepted.append(placement)
        placed.add((placement.app, placement.version, placement.replica))
        reserved.add(placement.node_id, placement.app, state.apps[placement.app].spec.resources)
    return accepted, refused
