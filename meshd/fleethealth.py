"""Edge-native data reduction: what a site's leader tells other sites of each member's health,
as a few numbers per node per interval instead of raw samples.

The leader samples each member's resources as the site's state has them (the member reports
them when they move a step) every SAMPLE_PERIOD, keeps the last WINDOW of samples, and
publishes per node: CPU busy and memory used as the 50th and 95th percentiles (% of the node)
over that window, restarts of its live allocations, and its OOM kills, in its NodeSummary
(crdt.schema) at most once per PUBLISH_PERIOD (meshd.meshstate.node_summaries).

Invariants:
- Pure: `now` comes in; no clock, no I/O.
- Bounded: at most WINDOW / SAMPLE_PERIOD samples per node, nodes gone from the state forgotten.
- A node with no sample in the window has no figures (None): never a made-up 0.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from meshd.state import ADMIN_LEFT, ADMIN_REVOKED, SiteState

# A sample every 10 s: the resources a member reports move in steps, seconds apart at most.
SAMPLE_PERIOD = 10.0
# The interval the figures describe: a minute, as `nodes --site` of another site shows them.
WINDOW = 60.0
# How often a member's health figures go into the mesh document: a few hundred bytes per node
# per minute (its other fields go at once when they change).
PUBLISH_PERIOD = 60.0


@dataclass(frozen=True)
class Health:
    cpu_p50: int | None = None  # % of the node's cores busy
    cpu_p95: int | None = None
    mem_p50: int | None = None  # % of the node's memory in use
    mem_p95: int | None = None
    restarts: int = 0  # restarts of its live allocations (their counts as the site has them)
    oom_kills: int = 0  # workload runs killed for their memory limit since the node started


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class HealthWindow:
    _samples: dict[str, deque] = field(default_factory=dict)  # node id -> (at, cpu %, mem %)
    _sampled_at: float = -math.inf

    def observe(self, state: SiteState, now: float) -> None:
        """Take a sample of every member, if SAMPLE_PERIOD has passed since the last."""
        if now - self._sampled_at < SAMPLE_PERIOD:
            return
        self._sampled_at = now
        members = {n.node_id: n for n in state.nodes.values() if n.admin not in (ADMIN_LEFT, ADMIN_REVOKED)}
        for node_id in list(self._samples):
            if node_id not in members:
                del self._samples[node_id]
        for node_id, node in members.items():
            res = node.resources
            if not res.cpu_total or not res.mem_total_mb:
                continue  # not reported yet
            cpu = 100.0 * max(0.0, res.cpu_total - res.cpu_free) / res.cpu_total
            mem = 100.0 * max(0, res.mem_total_mb - res.mem_free_mb) / res.mem_total_mb
            ring = self._samples.setdefault(node_id, deque(maxlen=int(WINDOW / SAMPLE_PERIOD) + 1))
            ring.append((now, cpu, mem))

    def health(self, state: SiteState, node_id: str, now: float) -> Health:
        recent = [(c, m) for at, c, m in self._samples.get(node_id, ()) if now - at <= WINDOW]
        node = state.nodes.get(node_id)
        restarts = sum(a.restarts for a in state.allocs.on_node(node_id) if a.live)
        oom_kills = node.resources.oom_kills if node is not None else 0
        if not recent:
            return Health(restarts=restarts, oom_kills=oom_kills)
        cpus, mems = [c for c, _ in recent], [m for _, m in recent]
        return Health(cpu_p50=round(percentile(cpus, 50)), cpu_p95=round(percentile(cpus, 95)),
                      mem_p50=round(percentile(mems, 50)), mem_p95=round(percentile(mems, 95)),
                      restarts=restarts, oom_kills=oom_kills)
