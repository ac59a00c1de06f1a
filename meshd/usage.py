"""What a node's workloads use, as `meshctl top` shows it: CPU as a share of one core between
two readings of a workload's CPU time, memory as the kernel charges it, beside its limits.

Invariants:
- Pure: readings and `now` (one monotonic clock) come in, figures go out.
- CPU % is measured, never guessed: between this reading and the last one kept for the same
  allocation when that one is at least MIN_INTERVAL old and at most MAX_AGE; a first
  reading (or one after a long gap) gives the average since the allocation's group began.
  A counter that went backwards (a new group after a restart with other limits) starts over.
- Bounded: readings are kept only for allocations read in the last MAX_AGE.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Readings closer than this say more about the sampling than about the workload: the last
# figure stands instead (a `top --watch` refreshes every 2 s; two clients may read at once).
MIN_INTERVAL = 0.5
# A reading older than this describes another phase of the workload: start over.
MAX_AGE = 60.0


@dataclass
class CpuSampler:
    _last: dict[str, tuple[int, float, float | None]] = field(default_factory=dict)  # usec, at, last figure

    def percent(self, alloc_id: str, usec: int | None, now: float, since: float) -> float | None:
        """CPU % of one core; `since`: when its CPU time began counting (its group's start)."""
        if usec is None:
            return None
        last = self._last.get(alloc_id)
        if last is not None and last[0] <= usec and MIN_INTERVAL <= now - last[1] <= MAX_AGE:
            figure = (usec - last[0]) / (now - last[1]) / 1e4
        elif last is not None and last[0] <= usec and now - last[1] < MIN_INTERVAL and last[2] is not None:
            return last[2]  # too soon to measure anew
        else:
            figure = usec / max(now - since, MIN_INTERVAL) / 1e4
        self._last[alloc_id] = (usec, now, figure)
        return round(figure, 1)

    def forget_older_than(self, now: float) -> None:
        for alloc_id in [a for a, (_, at, _) in self._last.items() if now - at > MAX_AGE]:
            del self._last[alloc_id]
