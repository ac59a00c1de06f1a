"""A replica's health from its checks (`[app.health]`): pure, given each check's outcome and
`now` (seconds on one monotonic clock, from the start of the replica's process).

Invariants:
- A `process` check has no probes: a running replica is healthy.
- Any other kind starts `checking`; a passing check makes it `healthy` and clears the count
  of failures; a failing one counts only once `grace_s` has passed since the start, and
  `failures` consecutive counted failures make it `unhealthy`, which is the one verdict that
  says to restart it (the supervisor ends the process; its restart policy decides the rest).
  Once unhealthy, nothing more is asked of this watch: a restart starts a new one.
- Checks are due every `interval_s` from the start: the first at once (so a healthy replica
  is seen healthy within one check's time), never two at once, never more often.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshd.state import HEALTH_CHECKING, HEALTH_HEALTHY, HEALTH_UNHEALTHY, HealthCheck


@dataclass(frozen=True)
class Verdict:
    health: str
    restart: bool = False  # unhealthy now: end the process
    reason: str = ""  # of the last failure, or of the verdict


@dataclass
class HealthWatch:
    check: HealthCheck
    started_at: float
    next_at: float = field(init=False)
    failures: int = 0  # consecutive failures that counted
    health: str = field(init=False)

    def __post_init__(self) -> None:
        self.next_at = self.started_at
        self.health = HEALTH_HEALTHY if self.check.kind == "process" else HEALTH_CHECKING

    @property
    def probes(self) -> bool:
        """Whether this kind runs checks at all."""
        return self.check.kind != "process" and self.health != HEALTH_UNHEALTHY

    def due(self, now: float) -> float:
        """Seconds until the next check is due (0: now)."""
        return max(0.0, self.next_at - now)

    def checked(self, passed: bool, reason: str, now: float) -> Verdict:
        """The outcome of the check that was due; the verdict it leads to."""
        self.next_at = max(self.next_at + self.check.interval_s, now)
        if not self.probes:
            return Verdict(self.health)
        if passed:
            self.failures = 0
            self.health = HEALTH_HEALTHY
            return Verdict(self.health)
        if now - self.started_at < self.check.grace_s:
            return Verdict(self.health, reason=f"{reason} (within the {self.check.grace_s:g} s grace)")
        self.failures += 1
        if self.failures < self.check.failures:
            return Verdict(self.health, reason=f"{reason} ({self.failures} of {self.check.failures} failures)")
        self.health = HEALTH_UNHEALTHY
        return Verdict(self.health, restart=True,
                       reason=f"unhealthy: {self.failures} consecutive {self.check.kind} checks failed, "
                              f"the last: {reason}")
