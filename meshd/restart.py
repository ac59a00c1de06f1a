"""Restart policy for supervised workloads: after a process exits, restart it or not, and when.

Invariants:
- Pure: no I/O, no clock. The caller measures how long the process stayed up and passes it.
- Exit codes follow `subprocess`: >= 0 is an exit status, < 0 is "killed by signal -code",
  None means there is no exit status (the command could not be executed at all); the
  caller may describe that case with `cause`.
- A restart delay is always within [base, cap]; a decision that does not restart has
  delay 0 and a final state (`stopped` for a clean exit 0, `failed` otherwise).
- `restarts` counts the restarts of the current crash streak, not the lifetime total: a
  process that stayed up for `stable_after` seconds or more starts a new streak, so its
  next restart waits only `base` again. `RestartDecision.backoff_count` is the value to
  pass as `restarts` after the next exit.
- Every decision carries a reason a CLI can show ("exited 3", "killed by SIGSEGV", ...).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

from meshd.state import ALLOC_FAILED, ALLOC_STOPPED, RESTART_POLICIES

POLICY_ALWAYS = "always"
POLICY_ON_FAILURE = "on-failure"
POLICY_NEVER = "never"

# First restart waits half a second: long enough that a crash loop cannot spin a CPU,
# short enough that a one-off crash is barely noticed by clients.
BACKOFF_BASE = 0.5
# Ceiling of the doubling: a workload that keeps crashing (say, waiting for a device that is
# not plugged in yet) is still retried twice a minute, without flooding its log.
BACKOFF_CAP = 30.0
# A process that ran this long was working, so its next crash is a new incident and the
# backoff starts again from BACKOFF_BASE instead of continuing to grow.
STABLE_UPTIME = 10.0
# Doubling stops mattering long before this exponent (2**64 * base exceeds any cap); it
# keeps the float arithmetic finite for absurd streak counts.
_MAX_DOUBLINGS = 64


@dataclass(frozen=True)
class RestartDecision:
    restart: bool
    delay: float  # seconds to wait before restarting; 0.0 when not restarting
    final_state: str | None  # ALLOC_STOPPED / ALLOC_FAILED when not restarting, else None
    reason: str
    backoff_count: int = 0  # pass as `restarts` to the next decide_restart of this streak


def policy_problem(policy: str) -> str | None:
    """Why `policy` is not a restart policy, or None when it is one."""
    if policy in RESTART_POLICIES:
        return None
    return f"unknown restart policy {policy!r} (expected one of {', '.join(RESTART_POLICIES)})"


def describe_exit(exit_code: int | None, cause: str | None = None) -> str:
    """"exited 3", "killed by SIGSEGV", or `cause` when it is known (no exit status, or
    one that does not say why: "oom-killed ...")."""
    if cause:
        return cause
    if exit_code is None:
        return "exit status unknown"
    if exit_code >= 0:
        return f"exited {exit_code}"
    signum = -exit_code
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    return f"killed by {name}"


def backoff_delay(
    restarts: int,
    uptime: float,
    *,
    base: float = BACKOFF_BASE,
    cap: float = BACKOFF_CAP,
    stable_after: float = STABLE_UPTIME,
) -> float:
    """Seconds to wait before the next restart: base * 2**restarts, at most cap.

    `restarts` is reset to 0 when the process had been up for `stable_after` seconds.
    """
    streak = 0 if uptime >= stable_after else max(0, restarts)
    return min(cap, base * 2.0 ** min(streak, _MAX_DOUBLINGS))


def decide_restart(
    policy: str,
    exit_code: int | None,
    restarts: int,
    uptime: float,
    *,
    cause: str | None = None,
    unhealthy: str | None = None,
    base: float = BACKOFF_BASE,
    cap: float = BACKOFF_CAP,
    stable_after: float = STABLE_UPTIME,
) -> RestartDecision:
    """What to do after a supervised process exited.

    `exit_code` as in `subprocess` (negative: killed by that signal; None: never ran, with
    `cause` saying why), `restarts` the restarts of the current crash streak, `uptime` the
    seconds the process ran; `unhealthy` why meshd ended it for failing its health checks
    (a failure whatever status the process then exited with). Raises ValueError (with the reason) for an unknown policy or
    inconsistent backoff settings.
    """
    problem = policy_problem(policy)
    if problem is not None:
        raise ValueError(problem)
    if not 0 < base <= cap:
        raise ValueError(f"backoff needs 0 < base <= cap, got base={base} cap={cap}")
    what = describe_exit(exit_code, cause)
    clean = exit_code == 0 and unhealthy is None
    if unhealthy is not None:
        what = f"{unhealthy}; {what}"
    if policy == POLICY_NEVER or (policy == POLICY_ON_FAILURE and clean):
        final = ALLOC_STOPPED if clean else ALLOC_FAILED
        return RestartDecision(restart=False, delay=0.0, final_state=final, reason=what)
    streak = 0 if uptime >= stable_after else max(0, restarts)
    delay = backoff_delay(restarts, uptime, base=base, cap=cap, stable_after=stable_after)
    return RestartDecision(
        restart=True,
        delay=delay,
        final_state=None,
        reason=f"{what}; restarting in {delay:g} s",
        backoff_count=streak + 1,
    )
