"""meshd.usage: CPU % between readings, never guessed, and bounded."""

from __future__ import annotations

from meshd.usage import MAX_AGE, CpuSampler


def test_cpu_percent_between_two_readings_and_the_average_at_first():
    sampler = CpuSampler()
    assert sampler.percent("a", 1_000_000, now=10.0, since=0.0) == 10.0  # 1 s of CPU in 10 s
    assert sampler.percent("a", 1_500_000, now=11.0, since=0.0) == 50.0  # 0.5 s in the last 1 s
    assert sampler.percent("a", 1_600_000, now=11.2, since=0.0) == 50.0  # too soon: the last figure
    assert sampler.percent("a", 3_500_000, now=12.0, since=0.0) == 200.0  # two cores' worth


def test_a_counter_that_went_back_or_a_long_gap_starts_over():
    sampler = CpuSampler()
    sampler.percent("a", 5_000_000, now=10.0, since=0.0)
    assert sampler.percent("a", 100_000, now=11.0, since=10.5) == 20.0  # a new group since 10.5
    assert sampler.percent("a", 200_000, now=11.0 + MAX_AGE + 1, since=10.5) == round(
        200_000 / (MAX_AGE + 1.5) / 1e4, 1)


def test_no_reading_is_no_figure_and_old_readings_are_forgotten():
    sampler = CpuSampler()
    assert sampler.percent("a", None, now=1.0, since=0.0) is None
    sampler.percent("b", 10, now=1.0, since=0.0)
    sampler.forget_older_than(2.0 + MAX_AGE)
    assert not sampler._last
