"""meshd.health: the verdict of a replica's health checks."""

from __future__ import annotations

from meshd.health import HealthWatch
from meshd.state import HealthCheck


def watch(**changes) -> HealthWatch:
    return HealthWatch(HealthCheck(**{"kind": "tcp", "port": 80, "interval_s": 10.0, "failures": 3, **changes}),
                       started_at=100.0)


def test_a_process_check_is_healthy_while_running_and_never_probes():
    w = HealthWatch(HealthCheck(), started_at=0.0)
    assert w.health == "healthy" and not w.probes


def test_checks_start_at_once_then_every_interval_never_more_often():
    w = watch()
    assert w.health == "checking" and w.due(100.0) == 0.0
    w.checked(True, "", now=100.2)
    assert w.health == "healthy" and w.next_at == 110.0 and abs(w.due(100.2) - 9.8) < 1e-9
    w.checked(True, "", now=125.0)  # a late check: the next is due at once, not twice
    assert w.next_at == 125.0 and w.due(125.0) == 0.0


def test_consecutive_failures_make_it_unhealthy_and_a_pass_clears_them():
    w = watch()
    assert not w.checked(False, "connection refused", now=100.0).restart
    assert w.checked(False, "connection refused", now=110.0).reason == "connection refused (2 of 3 failures)"
    assert w.checked(True, "", now=120.0).health == "healthy" and w.failures == 0
    for t in (130.0, 140.0):
        assert not w.checked(False, "timed out", now=t).restart
    verdict = w.checked(False, "timed out", now=150.0)
    assert verdict.restart and verdict.health == "unhealthy"
    assert verdict.reason == "unhealthy: 3 consecutive tcp checks failed, the last: timed out"
    assert not w.probes and not w.checked(False, "x", now=160.0).restart  # asked once only


def test_failures_within_the_grace_do_not_count():
    w = watch(grace_s=30.0, failures=1)
    for t in (100.0, 110.0, 120.0):
        verdict = w.checked(False, "refused", now=t)
        assert not verdict.restart and verdict.health == "checking" and "grace" in verdict.reason
    assert w.checked(False, "refused", now=130.0).restart
