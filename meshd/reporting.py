"""When a node reports to its site: the pure schedule behind the `heartbeat` command.

A report is a Raft command carrying this node's resources and the state of its allocations.
Every report costs a replicated, encrypted log entry on every member, so a node sends one
only when there is news:
- the first report after start (it makes a joining node ready and gives placement its
  resources);
- an allocation whose state, pid, restart count, exit code or reason changed;
- resources that moved by a step placement could notice: the node's size, or a twentieth
  of its memory (placement prices cores by reservation, never by the measured idle share,
  which on a busy device moves at every sample: it travels along, it never triggers);
- a full resend every `full_period`, which repairs a report that a leader change swallowed
  (of the allocations the site does not show as reported yet); when the site already shows
  everything it would carry (`site_has`), it is not sent at all.
A report is not a keep-alive: liveness comes from Raft's own heartbeats (voters) and from
beats on the peer port (non-voters, meshd.io.services.beats), neither of them a commit.

Invariants:
- Pure: no clock, no I/O; `now` is passed in.
- Nothing counts as reported until `sent` confirms the commit: a failed report is retried
  in full at the next check.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from meshd.state import HEALTH_NONE

# Free memory moves all the time; placement (which checks it) cares about steps of this size.
MEM_STEP_FRACTION = 0.05  # of the node's memory
# The fields of an allocation report that the site replicates (`stopped_by_meshd`: this
# node's meshd ended it, so the site replaces it instead of counting it as having run).
REPORT_FIELDS = ("alloc_id", "state", "pid", "restarts", "exit_code", "reason", "stopped_by_meshd", "health")


def resources_moved(last: Mapping[str, float], current: Mapping[str, float]) -> bool:
    """True when `current` differs from the last reported resources by a step placement sees."""
    if not last:
        return bool(current)
    if any(last.get(key) != current.get(key) for key in ("cpu_total", "mem_total_mb", "cgroup", "reserved_cpu",
                                                   "reserved_mem_mb", "oom_kills")):
        return True
    # The site's record holds these as tuples, a sample as a list and a mapping: compared by
    # content, or every full period would look like news and commit a heartbeat for nothing.
    if _as_set(last.get("enforces")) != _as_set(current.get("enforces")) \
            or _as_counts(last.get("devices")) != _as_counts(current.get("devices")):
        return True
    mem_step = MEM_STEP_FRACTION * float(current.get("mem_total_mb") or 1)
    return abs(float(current.get("mem_free_mb", 0)) - float(last.get("mem_free_mb", 0))) >= mem_step


def _as_set(value: object) -> frozenset:
    return frozenset(value) if isinstance(value, (list, tuple, set, frozenset)) else frozenset()


def _as_counts(value: object) -> tuple:
    try:
        pairs = dict(value) if isinstance(value, (list, tuple, dict)) else {}
    except (TypeError, ValueError):
        pairs = {}
    return tuple(sorted((str(k), v) for k, v in pairs.items() if v))


def reflected_in(alloc) -> Callable[[Mapping], bool]:
    """`reflected` for ReportSchedule.due from a lookup of the site's allocations by id
    (alloc_id -> meshd.state.Alloc or None): a report the site needs no more of. Either the
    site holds it as reported, or it no longer listens: the allocation is gone, lost, or
    stopped for good."""
    def reflected(report: Mapping) -> bool:
        record = alloc(report.get("alloc_id"))
        if record is None or record.state == "lost" or (record.desired == "stop" and record.state in (
                "failed", "stopped")):
            return True
        return (record.state, record.pid, record.restarts, record.exit_code, record.health) == (
            report.get("state"), report.get("pid"), report.get("restarts"), report.get("exit_code"),
            report.get("health") or HEALTH_NONE)
    return reflected


def _key(report: Mapping) -> tuple:
    return tuple(report.get(k) for k in REPORT_FIELDS)


def _plain(report: Mapping) -> dict:
    return {k: report.get(k) for k in REPORT_FIELDS}


@dataclass(frozen=True)
class Report:
    resources: dict
    resources_moved: bool  # False: the site already has these resources (the report omits them)
    allocs: tuple[dict, ...]  # only the allocations whose report changed (on a full report: all the site lacks)
    full: bool
    reflected: tuple[dict, ...] = ()  # a full report's allocations the site already shows (not sent)
    # False: a full resend that would carry nothing the site lacks; count it as sent, commit nothing.
    needed: bool = True


@dataclass
class ReportSchedule:
    full_period: float  # seconds between full resends
    _resources: dict = field(default_factory=dict)
    _allocs: dict[str, tuple] = field(default_factory=dict)
    _last_full: float | None = None

    def due(self, now: float, resources: Mapping[str, float], allocs: Sequence[Mapping],
            reflected: Callable[[Mapping], bool] | None = None,
            site_has: Callable[[Mapping[str, float]], bool] | None = None) -> Report | None:
        """The report to send now, or None when there is no news. A full resend leaves out
        the allocations the site already shows as reported (`reflected`, from the node's
        view of the replicated state): it repairs what a leader change swallowed, it does
        not repeat a thousand finished allocations every period. When it would then carry
        no allocation and `site_has(resources)` (the site's record of this node shows these
        resources and this boot), it is not `needed`."""
        full = self.full_due(now)
        shown: list[dict] = []
        changed: list[dict] = []
        if full:
            for a in allocs:
                plain = _plain(a)
                (shown if reflected is not None and reflected(plain) else changed).append(plain)
        else:  # the common check: only what changed is copied (a node may run thousands)
            known = self._allocs
            changed = [_plain(a) for a in allocs if known.get(a.get("alloc_id")) != _key(a)]
        moved = full or resources_moved(self._resources, resources)
        if not (full or changed or moved):
            return None
        needed = not (full and not changed and site_has is not None and site_has(resources))
        return Report(resources=dict(resources), resources_moved=moved, allocs=tuple(changed), full=full,
                      reflected=tuple(shown), needed=needed)

    def full_due(self, now: float) -> bool:
        """The next report is a full resend (only then is `reflected` asked)."""
        return self._last_full is None or now - self._last_full >= self.full_period

    def sent(self, now: float, report: Report) -> None:
        """The report committed: its contents are now the site's view of this node."""
        if report.resources_moved:
            self._resources = dict(report.resources)
        if report.full:
            self._last_full = now
            self._allocs = {}
        for a in (*report.allocs, *report.reflected):
            self._allocs[a["alloc_id"]] = _key(a)
