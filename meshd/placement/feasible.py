"""Feasibility: may an app run on a node, and if not, why not.

Invariants:
- Pure: reads only its arguments, never a clock, never does I/O.
- A checker returns None when the node passes it, else one line a CLI can show as is
  (e.g. `arch aarch64 not in [x86_64]`).
- `check_node` runs `CHECKERS` in their fixed order and reports the first failure, so the
  same state and plan always give the same reason.
- Resources reserved on a node = the requests of its live allocations, each priced at its
  app's *current* spec, minus the allocations the plan in progress stops, plus the
  placements the plan in progress has already made there (`Reserved`).
- CPU fits when request <= cpu_total - reserved cpu. Memory fits when request <=
  min(mem_total - reserved memory, measured free memory - memory this plan already put
  there): the measured figure guards against memory used outside meshd, and cannot yet show
  what this plan has placed. A request of 0 always fits.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from meshd.state import AppSpec, NodeRecord, ResourceRequest, SiteState

# Fractional cores add up in binary floating point (0.1 + 0.2 > 0.3): allow this much slack
# so an exact fit is not refused by rounding noise. Far below any meaningful request.
CPU_EPSILON = 1e-9


class Reserved:
    """What a plan in progress changes on top of the state it is built on.

    `released`: allocation ids the plan stops (their resources count as free).
    `add(...)`: a placement the plan has made (its resources count as taken).

    It belongs to one plan on one state that does not change while the plan is made or
    checked: it remembers each node's usage (a plan weighs a node with several checkers and
    a rank) until a placement on that node.
    """

    def __init__(self, released: Iterable[str] = ()) -> None:
        self.released: frozenset[str] = frozenset(released)
        self._released_on: dict[str, Counter[str]] | None = None  # node -> app -> live ones released
        self._cpu: dict[str, float] = defaultdict(float)
        self._mem_mb: dict[str, int] = defaultdict(int)
        self._allocs: dict[str, int] = defaultdict(int)
        self._devices: dict[str, Counter[str]] = defaultdict(Counter)
        self._app_allocs: dict[tuple[str, str], int] = defaultdict(int)
        self.usage: dict[str, dict[str, NodeUsage]] = {}  # node -> app -> usage, see node_usage

    def add(self, node_id: str, app: str, request: ResourceRequest) -> None:
        self.usage.pop(node_id, None)
        self._cpu[node_id] += request.cpu
        self._mem_mb[node_id] += request.memory_mb
        self._allocs[node_id] += 1
        self._app_allocs[(node_id, app)] += 1
        for kind, count in request.devices:
            self._devices[node_id][kind] += count

    def cpu(self, node_id: str) -> float:
        return self._cpu.get(node_id, 0.0)

    def mem_mb(self, node_id: str) -> int:
        return self._mem_mb.get(node_id, 0)

    def allocs(self, node_id: str) -> int:
        return self._allocs.get(node_id, 0)

    def devices(self, node_id: str) -> Counter[str]:
        return self._devices.get(node_id, _NONE_RELEASED)

    def app_allocs(self, node_id: str, app: str) -> int:
        return self._app_allocs.get((node_id, app), 0)

    def released_on(self, node_id: str, state: SiteState) -> Counter[str]:
        """App -> live allocations on the node that the plan releases (grouped once per plan:
        a plan releases few, and this is asked for every node weighed)."""
        if self._released_on is None:
            self._released_on = {}
            for alloc_id in self.released:
                alloc = state.allocs.get(alloc_id)
                if alloc is not None and alloc.live:
                    self._released_on.setdefault(alloc.node_id, Counter())[alloc.app] += 1
        return self._released_on.get(node_id, _NONE_RELEASED)


_NONE_RELEASED: Counter[str] = Counter()


@dataclass(frozen=True)
class NodeUsage:
    """A node's load as placement sees it: the state's live allocations plus the plan's."""

    cpu: float  # cores reserved
    mem_mb: int  # memory reserved
    planned_mem_mb: int  # part of mem_mb placed by the plan in progress (not yet measurable)
    allocs: int  # live allocations, any app
    app_allocs: int  # live allocations of the app being placed
    devices: Mapping[str, int] = field(default_factory=dict)  # devices held, by kind


def node_usage(node_id: str, state: SiteState, reserved: Reserved, app: str = "") -> NodeUsage:
    """Costs what the node runs (its live allocations per app, kept by the state's
    allocation table), not what the site runs; once per node and app until the plan places
    on that node."""
    known = reserved.usage.get(node_id)
    if known is not None and app in known:
        return known[app]
    usage = _count_usage(node_id, state, reserved, app)
    reserved.usage.setdefault(node_id, {})[app] = usage
    return usage


def _count_usage(node_id: str, state: SiteState, reserved: Reserved, app: str) -> NodeUsage:
    live = state.allocs.live_on(node_id)
    released = reserved.released_on(node_id, state)
    cpu = 0.0
    mem_mb = 0
    devices: Counter[str] = Counter(reserved.devices(node_id))
    allocs = state.allocs.live_count(node_id) - sum(released.values())
    for name, count in live.items():
        if released:
            count -= released.get(name, 0)
        record = state.apps.get(name)
        if record is not None and count:  # an alloc of a removed app has no spec left to price it by
            cpu += count * record.spec.resources.cpu
            mem_mb += count * record.spec.resources.memory_mb
            for kind, wanted in record.spec.resources.devices:
                devices[kind] += count * wanted
    app_allocs = live.get(app, 0) - released.get(app, 0)
    return NodeUsage(
        cpu=cpu + reserved.cpu(node_id),
        mem_mb=mem_mb + reserved.mem_mb(node_id),
        planned_mem_mb=reserved.mem_mb(node_id),
        allocs=allocs + reserved.allocs(node_id),
        app_allocs=app_allocs + reserved.app_allocs(node_id, app),
        devices=devices,
    )


def free_cpu(node: NodeRecord, usage: NodeUsage) -> float:
    """Cores not reserved by allocations, nor kept for meshd itself (NodeResources.reserved_cpu)."""
    return node.resources.placeable_cpu - usage.cpu


def free_mem_mb(node: NodeRecord, usage: NodeUsage) -> int:
    by_reservation = node.resources.placeable_mem_mb - usage.mem_mb
    by_measure = node.resources.placeable_free_mb - usage.planned_mem_mb
    return min(by_reservation, by_measure)


def _kept(amount: float, unit: str) -> str:
    return f", {amount:g}{unit} kept for meshd" if amount else ""


# --- checkers ------------------------------------------------------------------------
Checker = Callable[[NodeRecord, AppSpec, SiteState, Reserved], str | None]


def check_schedulable(node: NodeRecord, spec: AppSpec, state: SiteState, reserved: Reserved) -> str | None:
    if node.schedulable:
        return None
    return f"node is {node.state}"


def allowed_sites(spec: AppSpec, state: SiteState) -> tuple[str, ...]:
    """The sites an app may run in: its own list, or else the site it was deployed in."""
    return spec.sites if spec.sites else (state.site,)


def check_site(node: NodeRecord, spec: AppSpec, state: SiteState, reserved: Reserved) -> str | None:
    sites = allowed_sites(spec, state)
    if node.site in sites:
        return None
    return f"site {node.site} not in app sites [{', '.join(sites)}]"


def check_arch(node: NodeRecord, spec: AppSpec, state: SiteState, reserved: Reserved) -> str | None:
    wanted = spec.constraints.arch
    if not wanted or node.arch in wanted:
        return None
    return f"arch {node.arch or 'unknown'} not in [{', '.join(wanted)}]"


def check_labels(node: NodeRecord, spec: AppSpec, state: SiteState, reserved: Reserved) -> str | None:
    for key in sorted(spec.constraints.labels):
        want = spec.constraints.labels[key]
        have = node.labels.get(key)
        if have == want:
            continue
        if have is None:
            return f"label {key} missing, want {key}={want}"
        return f"label {key}={have}, want {key}={want}"
    return None


def check_limits(node: NodeRecord, spec: AppSpec, state: SiteState, reserved: Reserved) -> str | None:
    """Limits are enforced where the app runs (meshd.io.cgroups): never on a node that cannot."""
    missing = spec.resources.controllers - set(node.resources.enforces)
    if not missing:
        return None
    how = f"cgroup v{node.resources.cgroup} without them" if node.resources.cgroup else "no cgroups"
    return f"cannot enforce {', '.join(sorted(missing))} limits ({how})"


def check_devices(node: NodeRecord, spec: AppSpec, state: SiteState, reserved: Reserved) -> str | None:
    """Enough devices of each kind it needs free on the node (none shared between workloads)."""
    if not spec.resources.devices:
        return None
    have = dict(node.resources.devices)
    usage = node_usage(node.node_id, state, reserved, spec.name)
    for kind, wanted in spec.resources.devices:
        if kind not in have:
            return f"no {kind} device on this node"
        free = have[kind] - usage.devices.get(kind, 0)
        if wanted > free:
            return f"needs {wanted} {kind}, {max(free, 0)} free of {have[kind]}"
    return None


def check_cpu(node: NodeRecord, spec: AppSpec, state: SiteState, reserved: Reserved) -> str | None:
    request = spec.resources.cpu
    if request <= 0:
        return None
    usage = node_usage(node.node_id, state, reserved, spec.name)
    free = free_cpu(node, usage)
    if request <= free + CPU_EPSILON:
        return None
    return (f"needs {request:g} cpu, {max(free, 0.0):g} free of {node.resources.cpu_total:g}"
            f" reserved {usage.cpu:g}{_kept(node.resources.reserved_cpu, '')}")


def check_memory(node: NodeRecord, spec: AppSpec, state: SiteState, reserved: Reserved) -> str | None:
    request = spec.resources.memory_mb
    if request <= 0:
        return None
    usage = node_usage(node.node_id, state, reserved, spec.name)
    by_reservation = node.resources.placeable_mem_mb - usage.mem_mb
    by_measure = node.resources.placeable_free_mb - usage.planned_mem_mb
    if request <= min(by_reservation, by_measure):
        return None
    kept = _kept(node.resources.reserved_mem_mb, " MB")
    if by_reservation <= by_measure:
        return (f"needs {request} MB memory, {max(by_reservation, 0)} free of {node.resources.mem_total_mb}"
                f" reserved {usage.mem_mb}{kept}")
    planned = f", {usage.planned_mem_mb} MB of it taken by this plan" if usage.planned_mem_mb else ""
    return f"needs {request} MB memory, node measures {node.resources.mem_free_mb} MB free{planned}{kept}"


# Fixed order: cheap, stable facts first, so the reason shown is the most basic one.
CHECKERS: tuple[tuple[str, Checker], ...] = (
    ("schedulable", check_schedulable),
    ("site", check_site),
    ("arch", check_arch),
    ("labels", check_labels),
    ("limits", check_limits),
    ("devices", check_devices),
    ("cpu", check_cpu),
    ("memory", check_memory),
)


def failing_check(node: NodeRecord, spec: AppSpec, state: SiteState, reserved: Reserved) -> tuple[str, str] | None:
    """(checker name, reason) of the first checker the node fails, or None if feasible."""
    for name, checker in CHECKERS:
        reason = checker(node, spec, state, reserved)
        if reason is not None:
            return name, reason
    return None


def check_node(node: NodeRecord, spec: AppSpec, state: SiteState, reserved: Reserved) -> str | None:
    """None when `spec` may run on `node` now, else the reason it may not."""
    failure = failing_check(node, spec, state, reserved)
    return None if failure is None else failure[1]
