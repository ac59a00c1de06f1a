"""The short nemesis run (tests.lab.nemesis): about two minutes of kills, restarts, pauses,
partitions, delay and loss against a five-host lab site under a deploying client, then heal,
quiet and the checker. MESHD_NEMESIS_SEED repeats a run; MESHD_NEMESIS_DURATION lengthens it
(`python3 -m tests.lab.nemesis --duration N` for long runs outside pytest)."""

from __future__ import annotations

import os
import random

import pytest

from tests.lab.nemesis import run

pytestmark = pytest.mark.system

DEFAULT_DURATION = 100.0  # seconds of faults; with start-up and quiet the test takes about two minutes


def test_nemesis_short_run(make_lab):
    seed = int(os.environ.get("MESHD_NEMESIS_SEED") or random.randrange(2**31))
    duration = float(os.environ.get("MESHD_NEMESIS_DURATION") or DEFAULT_DURATION)
    print(f"nemesis seed {seed} (rerun with MESHD_NEMESIS_SEED={seed})")
    lab = make_lab({"lab": 5}, seed=seed)
    lab.start_site("lab")
    result = run(lab, seed, duration, [f"lab-{j}" for j in range(1, 6)])
    assert result["operations"]["acked"] > 0
