import signal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.restart import (
    BACKOFF_BASE,
    BACKOFF_CAP,
    STABLE_UPTIME,
    backoff_delay,
    decide_restart,
    describe_exit,
    policy_problem,
)
from meshd.state import ALLOC_FAILED, ALLOC_STOPPED, RESTART_POLICIES

SIGSEGV = -int(signal.SIGSEGV)
SIGKILL = -int(signal.SIGKILL)


@pytest.mark.parametrize(
    "policy, exit_code, restart, final_state, reason",
    [
        ("always", 0, True, None, "exited 0; restarting in 0.5 s"),
        ("always", 1, True, None, "exited 1; restarting in 0.5 s"),
        ("always", SIGSEGV, True, None, "killed by SIGSEGV; restarting in 0.5 s"),
        ("on-failure", 0, False, ALLOC_STOPPED, "exited 0"),
        ("on-failure", 2, True, None, "exited 2; restarting in 0.5 s"),
        ("on-failure", SIGKILL, True, None, "killed by SIGKILL; restarting in 0.5 s"),
        ("never", 0, False, ALLOC_STOPPED, "exited 0"),
        ("never", 3, False, ALLOC_FAILED, "exited 3"),
        ("never", SIGSEGV, False, ALLOC_FAILED, "killed by SIGSEGV"),
        ("never", None, False, ALLOC_FAILED, "exit status unknown"),
        ("on-failure", None, True, None, "exit status unknown; restarting in 0.5 s"),
    ],
)
def test_policy_table(policy, exit_code, restart, final_state, reason):
    decision = decide_restart(policy, exit_code, restarts=0, uptime=0.0)
    assert decision.restart is restart
    assert decision.final_state == final_state
    assert decision.reason == reason
    assert decision.delay == (BACKOFF_BASE if restart else 0.0)


@pytest.mark.parametrize(
    "restarts, uptime, delay, backoff_count",
    [
        (0, 0.0, 0.5, 1),
        (1, 0.0, 1.0, 2),
        (2, 3.0, 2.0, 3),
        (5, 9.99, 16.0, 6),
        (6, 0.0, 30.0, 7),  # 32 s capped
        (1000, 0.0, 30.0, 1001),
        (7, STABLE_UPTIME, 0.5, 1),  # stayed up long enough: the streak starts again
        (7, 3600.0, 0.5, 1),
    ],
)
def test_backoff_table(restarts, uptime, delay, backoff_count):
    decision = decide_restart("always", 1, restarts=restarts, uptime=uptime)
    assert decision.delay == delay
    assert decision.backoff_count == backoff_count


def test_cause_names_the_error_when_there_is_no_exit_status():
    decision = decide_restart("never", None, 0, 0.0, cause="cannot execute 'x': No such file")
    assert decision.reason == "cannot execute 'x': No such file"
    assert decision.final_state == ALLOC_FAILED


def test_injected_backoff_settings():
    decision = decide_restart("always", 1, restarts=3, uptime=0.0, base=0.01, cap=0.05)
    assert decision.delay == 0.05
    assert decide_restart("always", 1, 0, 2.0, base=0.01, stable_after=1.0).delay == 0.01


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"policy": "sometimes"}, "unknown restart policy 'sometimes'"),
        ({"base": 0.0}, "backoff needs 0 < base <= cap"),
        ({"base": 2.0, "cap": 1.0}, "backoff needs 0 < base <= cap"),
    ],
)
def test_rejections_carry_a_reason(kwargs, message):
    args = {"policy": "always", "exit_code": 1, "restarts": 0, "uptime": 0.0} | kwargs
    with pytest.raises(ValueError, match=message):
        decide_restart(**args)


@pytest.mark.parametrize(
    "exit_code, text",
    [(0, "exited 0"), (127, "exited 127"), (-15, "killed by SIGTERM"), (-200, "killed by signal 200")],
)
def test_describe_exit(exit_code, text):
    assert describe_exit(exit_code) == text


def test_policy_problem():
    assert all(policy_problem(p) is None for p in RESTART_POLICIES)
    assert "expected one of always, on-failure, never" in policy_problem("")


exit_codes = st.one_of(st.none(), st.integers(min_value=-64, max_value=255))


@given(
    policy=st.sampled_from(RESTART_POLICIES),
    exit_code=exit_codes,
    restarts=st.integers(min_value=0, max_value=10**6),
    uptime=st.floats(min_value=0.0, max_value=1e9, allow_nan=False),
)
def test_delay_always_within_bounds(policy, exit_code, restarts, uptime):
    decision = decide_restart(policy, exit_code, restarts, uptime)
    if decision.restart:
        assert BACKOFF_BASE <= decision.delay <= BACKOFF_CAP
        assert decision.final_state is None
    else:
        assert decision.delay == 0.0
        assert decision.final_state == (ALLOC_STOPPED if exit_code == 0 else ALLOC_FAILED)
    assert decision.reason


@given(
    policy=st.sampled_from(RESTART_POLICIES),
    exit_code=exit_codes,
    restarts=st.integers(min_value=0, max_value=1000),
)
def test_which_exits_restart(policy, exit_code, restarts):
    decision = decide_restart(policy, exit_code, restarts, 0.0)
    expected = {"always": True, "never": False, "on-failure": exit_code != 0}[policy]
    assert decision.restart is expected


@given(
    restarts=st.integers(min_value=0, max_value=200),
    uptime=st.floats(min_value=0.0, max_value=STABLE_UPTIME, exclude_max=True),
)
def test_backoff_never_shrinks_within_a_streak(restarts, uptime):
    assert backoff_delay(restarts, uptime) <= backoff_delay(restarts + 1, uptime)


@given(
    restarts=st.integers(min_value=0, max_value=10**9),
    uptime=st.floats(min_value=STABLE_UPTIME, max_value=1e12),
)
def test_stable_run_resets_the_streak(restarts, uptime):
    decision = decide_restart("always", 1, restarts, uptime)
    assert decision.delay == BACKOFF_BASE
    assert decision.backoff_count == 1


def test_an_unhealthy_replica_is_a_failure_whatever_it_exited_with():
    from meshd.restart import decide_restart
    for code in (0, -15, 1):
        never = decide_restart("never", code, 0, 5.0, unhealthy="unhealthy: 3 consecutive http checks failed")
        assert never.final_state == "failed" and never.reason.startswith("unhealthy: 3 consecutive http checks failed; ")
        again = decide_restart("on-failure", code, 0, 5.0, unhealthy="unhealthy: x")
        assert again.restart and again.reason.startswith("unhealthy: x; ")
