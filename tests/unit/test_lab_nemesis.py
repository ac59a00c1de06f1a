"""The nemesis's pure parts (tests.lab.nemesis): the seeded schedule and the allowed final
states of an app given what the client was told."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tests.lab.nemesis import MAX_FAULTY, STOPPED, Operation, critical_problems, expected_states, make_schedule

HOSTS = [f"lab-{j}" for j in range(1, 6)]


@given(st.integers(0, 2**31), st.floats(10, 300))
def test_schedule_is_seeded_bounded_and_undone(seed, duration):
    schedule = make_schedule(seed, duration, HOSTS)
    assert schedule == make_schedule(seed, duration, HOSTS)
    down: set[str] = set()
    cut = False
    for fault in schedule:
        assert 0 <= fault.at <= duration
        if fault.action in ("kill", "pause"):
            assert fault.host not in down
            down.add(fault.host)
            assert len(down) <= MAX_FAULTY
        elif fault.action in ("restart", "resume"):
            down.discard(fault.host)
        elif fault.action == "partition":
            assert not cut and len(fault.groups[1]) < len(fault.groups[0])  # a majority side remains
            cut = True
        elif fault.action == "heal":
            cut = False
    assert not down and not cut  # everything undone by the end


def ops(*pairs):
    return [Operation("a", replicas, outcome) for replicas, outcome in pairs]


def test_expected_states():
    assert expected_states([]) == {-2}
    assert expected_states(ops((3, "acked"))) == {3}
    assert expected_states(ops((3, "acked"), (2, "refused"))) == {3}  # refused changed nothing
    assert expected_states(ops((3, "acked"), (2, "unknown"))) == {3, 2}
    assert expected_states(ops((3, "unknown"), (2, "acked"))) == {2}  # an ack settles what came before
    assert expected_states(ops((3, "acked"), (STOPPED, "acked"))) == {STOPPED}
    assert expected_states(ops((1, "unknown"))) == {-2, 1}


def test_the_checker_fails_on_a_critical_line_in_any_hosts_log():
    """pysyncobj's divergence line, as the daemon's own log formatter writes it (the hosts
    logged 269 of them once, and the checker never read them)."""
    import logging

    from meshd.io.runtime import JsonLogFormatter
    record = logging.LogRecord("pysyncobj", logging.CRITICAL, "syncobj.py", 1,
                               "truncating already-applied log entries (%d..%d); state machine may have diverged",
                               (10, 12), None)
    line = JsonLogFormatter().format(record)
    info = JsonLogFormatter().format(logging.LogRecord("meshd.daemon", logging.INFO, "x.py", 1, "ready", (), None))
    assert critical_problems([info, info]) == []
    [problem] = critical_problems([info, info + "\n" + line])
    assert problem.startswith("1 critical log lines, the first: ") and "may have diverged" in problem

