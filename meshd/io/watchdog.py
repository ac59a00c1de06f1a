"""Loop watchdog: a daemon whose trio loop is wedged ends itself, so it fails like a dead one.

The leader learns that a voter is alive from its Raft thread's heartbeat answers. A node whose
trio loop hangs (a bug, a blocking call) would keep answering while supervising and
reporting nothing; its workloads would be neither watched nor replaced. So a trio task feeds
the watchdog every FEED_PERIOD, a thread checks it every CHECK_PERIOD, and after
`stall_limit` seconds without food the thread dumps every thread's stack to stderr and exits
with EXIT_WEDGED. Workloads die with the daemon (PDEATHSIG), the site replaces them, and
systemd restarts the daemon.

The same thread watches the Raft thread (`watch_also`: meshd.io.raft.RaftNode.stalled_for):
a Raft whose ticks keep failing (a damaged journal) or stopped, or a voter connected to
other voters that neither sends nor receives a Raft message, would otherwise look alive
(the process answers, the trio loop feeds) while the node takes no part in its site. Time
frozen counts for neither: the Raft check runs on the time since the process last woke.

Invariants:
- `StallClock` is pure (time passed in) and decides; the thread only asks it.
- Time the whole process spent frozen (SIGSTOP, a paused VM, a suspended board) is not a
  stall: when the check itself comes late by more than a check period, the clock restarts.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from typing import Callable

import trio

from meshd.exitcodes import EXIT_SOFTWARE
from meshd.io.wakeup import sleep_slot

log = logging.getLogger("meshd.watchdog")

FEED_PERIOD = 1.0  # seconds between feeds from the trio loop; each one wakes the loop
CHECK_PERIOD = 1.0  # seconds between checks by the watchdog thread
# Long enough that a busy 2-core board or a slow disk never trips it; short enough that a
# wedged node is replaced within seconds rather than never.
DEFAULT_STALL_LIMIT = 15.0
EXIT_WEDGED = EXIT_SOFTWARE  # an internal error; systemd's Restart=on-failure restarts us


class StallClock:
    """Pure: has the loop gone `limit` seconds without feeding, while we were awake to see?"""

    def __init__(self, limit: float, check_period: float, now: float) -> None:
        if not limit > check_period > 0:
            raise ValueError(f"need limit > check_period > 0, got {limit}, {check_period}")
        self.limit = limit
        self.check_period = check_period
        self._fed = now
        self._last_check = now
        self.awake_since = now  # when the process last came back from being frozen (or started)

    def feed(self, now: float) -> None:
        self._fed = max(self._fed, now)

    def check(self, now: float) -> float | None:
        """How long the loop has been stalled, or None while it is not. Call about every
        `check_period`."""
        if now - self._last_check > 2 * self.check_period:
            # We were not running either: the process was frozen, not wedged.
            self._fed = max(self._fed, now)
            self.awake_since = now
        self._last_check = now
        starved = now - self._fed
        return starved if starved > self.limit else None


def _die_wedged(stalled_for: float, what: str = "event loop", why: str | None = None) -> None:
    fields = {"stalled_s": round(stalled_for, 1)}
    if why:
        fields["reason"] = why
    log.critical(f"{what} wedged; exiting so the site replaces this node", extra=fields)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    os._exit(EXIT_WEDGED)


class LoopWatchdog:
    def __init__(self, stall_limit: float = DEFAULT_STALL_LIMIT,
                 on_stall: Callable[..., None] = _die_wedged,
                 watch_also: Callable[[float, float], tuple[float, str] | None] | None = None) -> None:
        self._clock = StallClock(stall_limit, CHECK_PERIOD, time.monotonic())
        self._lock = threading.Lock()
        self._on_stall = on_stall
        self._stopping = threading.Event()
        # (monotonic now, awake since) -> (how long the Raft thread has stalled past its own
        # limit, why), or None (meshd.io.raft.RaftNode.stalled_for)
        self._watch_also = watch_also

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Feed from the trio loop; the watching thread lives as long as this task."""
        thread = threading.Thread(target=self._watch, name="meshd-watchdog", daemon=True)
        thread.start()
        task_status.started()
        try:
            while True:
                with self._lock:
                    self._clock.feed(time.monotonic())
                await sleep_slot(FEED_PERIOD)
        finally:
            self._stopping.set()

    def _watch(self) -> None:
        while not self._stopping.wait(CHECK_PERIOD):
            with self._lock:
                stalled_for = self._clock.check(time.monotonic())
                awake_since = self._clock.awake_since
            if stalled_for is not None:
                self._on_stall(stalled_for)
                return
            raft_stalled = self._watch_also(time.monotonic(), awake_since) if self._watch_also is not None else None
            if raft_stalled is not None:
                self._on_stall(raft_stalled[0], "raft thread", raft_stalled[1])
                return
