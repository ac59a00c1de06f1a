"""The loop watchdog: the pure stall clock (table), and the real thread around a real trio loop."""

from __future__ import annotations

import time

import pytest
import trio

from meshd.io.watchdog import CHECK_PERIOD, LoopWatchdog, StallClock

CASES = [
    # (id, steps, expected stall results of the checks in order); steps: ("feed"|"check", t)
    ("fed loop never stalls", [("feed", 0.5), ("check", 1), ("feed", 1.5), ("check", 2), ("check", 3)], [None] * 3),
    ("no food for more than the limit", [("check", 1), ("check", 2), ("check", 3), ("check", 4), ("check", 5),
                                          ("check", 6)], [None, None, None, None, None, 6.0]),
    ("exactly the limit is not a stall", [("check", 1), ("check", 2), ("check", 3), ("check", 4), ("check", 5)],
     [None] * 5),
    ("a frozen process is not a wedged loop", [("check", 1), ("check", 60), ("check", 61)], [None, None, None]),
    ("after a freeze, starving again is noticed", [("check", 1), ("check", 60)]
     + [("check", t) for t in range(61, 67)], [None] * 7 + [6.0]),
    ("a late feed still counts", [("check", 1), ("check", 2), ("check", 3), ("check", 4), ("feed", 4.5),
                                  ("check", 5), ("check", 6)], [None] * 6),
]


@pytest.mark.parametrize("steps,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_stall_clock(steps, expected):
    clock = StallClock(limit=5.0, check_period=1.0, now=0.0)
    results = []
    for kind, t in steps:
        if kind == "feed":
            clock.feed(t)
        else:
            results.append(clock.check(t))
    assert results == expected


def test_bad_limits():
    with pytest.raises(ValueError, match="limit > check_period"):
        StallClock(limit=1.0, check_period=1.0, now=0)


def run_loop_with_watchdog(limit: float, block_for: float, run_for: float) -> list[float]:
    stalls: list[float] = []

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(LoopWatchdog(stall_limit=limit, on_stall=stalls.append).run)
            await trio.sleep(0.2)
            time.sleep(block_for)  # wedge the loop: nothing else runs on it meanwhile
            await trio.sleep(run_for)
            nursery.cancel_scope.cancel()

    trio.run(main)
    return stalls


def test_a_wedged_loop_is_noticed():
    stalls = run_loop_with_watchdog(limit=CHECK_PERIOD * 1.5, block_for=CHECK_PERIOD * 4, run_for=0.1)
    assert len(stalls) == 1 and stalls[0] > CHECK_PERIOD * 1.5


def test_a_live_loop_is_left_alone():
    assert run_loop_with_watchdog(limit=CHECK_PERIOD * 1.5, block_for=0, run_for=CHECK_PERIOD * 3.5) == []


def test_a_stalled_raft_thread_ends_the_daemon_like_a_wedged_loop():
    """The loop feeds on time, but what the Raft thread reports (RaftNode.stalled_for) says
    it stalled: the watchdog acts on it, naming the Raft thread."""
    stalls: list[tuple] = []
    raft_says = {"stalled": None}

    async def main():
        async with trio.open_nursery() as nursery:
            watchdog = LoopWatchdog(stall_limit=CHECK_PERIOD * 5, on_stall=lambda *a: stalls.append(a),
                                    watch_also=lambda now, awake_since: raft_says["stalled"])
            await nursery.start(watchdog.run)
            await trio.sleep(CHECK_PERIOD * 1.5)
            assert stalls == []  # both alive
            raft_says["stalled"] = (16.0, "its ticks keep failing or stopped")
            await trio.sleep(CHECK_PERIOD * 1.5)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert stalls == [(16.0, "raft thread", "its ticks keep failing or stopped")]


def test_a_frozen_process_restarts_the_time_the_raft_check_counts_from():
    """SIGSTOP for longer than the limit: the check that comes late moves `awake_since`, so
    the Raft thread (which did not tick while frozen either) is judged from then."""
    clock = StallClock(limit=5.0, check_period=1.0, now=0.0)
    clock.feed(1.0)
    assert clock.check(1.0) is None and clock.awake_since == 0.0
    assert clock.check(40.0) is None  # frozen 39 s
    assert clock.awake_since == 40.0
