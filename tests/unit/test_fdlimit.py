"""meshd.io.fdlimit: the daemon raises its soft descriptor limit, within the hard one."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from meshd.io.fdlimit import WANTED

CODE = "from meshd.io.fdlimit import raise_fd_limit; print(*raise_fd_limit())"


def run_with_limits(soft: int, hard: int) -> tuple[int, int, int]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    out = subprocess.run([sys.executable, "-c", CODE], preexec_fn=limit, capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return tuple(int(x) for x in out.split())


def hard_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def test_the_soft_limit_is_raised_to_what_the_daemon_wants():
    if hard_limit() != resource.RLIM_INFINITY and hard_limit() < WANTED:
        pytest.skip(f"this machine's hard limit ({hard_limit()}) is below {WANTED}")
    hard = WANTED + 1 if hard_limit() == resource.RLIM_INFINITY else hard_limit()
    assert run_with_limits(256, hard) == (256, WANTED, hard)


def test_never_above_the_hard_limit_and_never_lowered():
    assert run_with_limits(256, 2000) == (256, 2000, 2000)
    if hard_limit() == resource.RLIM_INFINITY or hard_limit() > WANTED:
        high = WANTED + 1
        assert run_with_limits(high, high) == (high, high, high)
