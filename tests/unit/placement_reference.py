"""The placement of meshd.placement.plan done the slow, obvious way, as an oracle: every
replica weighs every node, and a node's usage is summed from every allocation of the site.
The tests check the real planner against it; the placement benchmark uses it as baseline."""

from __future__ import annotations

from typing import Callable, Iterable

from meshd.placement.feasible import CPU_EPSILON, Reserved
from meshd.placement.plan import Placement
from meshd.placement.rank import DEFAULT_ALGORITHM, Candidate, rank_key
from meshd.state import AppSpec, NodeRecord, SiteState


def usage(node: NodeRecord, state: SiteState, reserved: Reserved, app: str) -> tuple[float, int, int, int]:
    """(cpu, mem_mb, allocs, app_allocs) reserved on the node, from a walk of every allocation."""
    cpu, mem, allocs, app_allocs = 0.0, 0, 0, 0
    for alloc in state.allocs.values():
        if alloc.node_id != node.node_id or not alloc.live or alloc.alloc_id in reserved.released:
            continue
        allocs += 1
        app_allocs += alloc.app == app
        record = state.apps.get(alloc.app)
        if record is not None:
            cpu += record.spec.resources.cpu
            mem += record.spec.resources.memory_mb
    return (cpu + reserved.cpu(node.node_id), mem + reserved.mem_mb(node.node_id),
            allocs + reserved.allocs(node.node_id), app_allocs + reserved.app_allocs(node.node_id, app))


def feasible(node: NodeRecord, spec: AppSpec, state: SiteState, reserved: Reserved) -> bool:
    if not node.schedulable or node.site not in (spec.sites or (state.site,)):
        return False
    if spec.constraints.arch and node.arch not in spec.constraints.arch:
        return False
    if any(node.labels.get(k) != v for k, v in spec.constraints.labels.items()):
        return False
    cpu, mem, _, _ = usage(node, state, reserved, spec.name)
    if spec.resources.cpu > 0 and spec.resources.cpu > node.resources.placeable_cpu - cpu + CPU_EPSILON:
        return False
    free_mem = min(node.resources.placeable_mem_mb - mem,
                   node.resources.placeable_free_mb - reserved.mem_mb(node.node_id))
    return spec.resources.memory_mb <= 0 or spec.resources.memory_mb <= free_mem


def make_plan(state: SiteState, spec: AppSpec, version: int, replicas: Iterable[int],
              new_alloc_id: Callable[[], str], stops=(), algorithm: str = DEFAULT_ALGORITHM):
    """(placements, filtered node ids, unplaced replica indexes)."""
    key = rank_key(algorithm)
    reserved = Reserved(released=(alloc_id for alloc_id, _ in stops))
    nodes = [state.nodes[n] for n in sorted(state.nodes)]
    filtered = [n.node_id for n in nodes if not feasible(n, spec, state, reserved)]
    placements, unplaced = [], []
    for replica in sorted(set(replicas)):
        candidates = []
        for node in nodes:
            if feasible(node, spec, state, reserved):
                cpu, mem, allocs, app_allocs = usage(node, state, reserved, spec.name)
                free_mem = min(node.resources.placeable_mem_mb - mem,
                               node.resources.placeable_free_mb - reserved.mem_mb(node.node_id))
                candidates.append(Candidate(node.node_id, app_allocs, allocs, free_mem))
        if not candidates:
            unplaced.append(replica)
            continue
        chosen = min(candidates, key=key)
        placements.append(Placement(new_alloc_id(), spec.name, version, replica, chosen.node_id))
        reserved.add(chosen.node_id, spec.name, spec.resources)
    return placements, filtered, unplaced

