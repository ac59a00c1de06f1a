"""meshd.artifacts.ratelimit: grants stay within rate * T + burst."""

from hypothesis import given, strategies as st

from meshd.artifacts.ratelimit import UploadLimit


def test_no_limit_and_a_limit():
    assert UploadLimit(0).delay(0.0, 10**9) == 0.0
    limit = UploadLimit(8.0)  # 1 MB/s, burst 250 kB
    assert limit.delay(0.0, 250_000) == 0.0
    assert abs(limit.delay(0.0, 500_000) - 0.5) < 1e-9


@given(st.lists(st.tuples(st.floats(0, 0.5), st.integers(1, 200_000)), min_size=1, max_size=60))
def test_over_any_run_grants_are_bounded(sends):
    limit, now, sent_at = UploadLimit(4.0), 0.0, []
    for gap, size in sends:
        now += gap
        wait = limit.delay(now, size)
        now += wait  # the sender waits, then sends
        sent_at.append((now, size))
    span = sent_at[-1][0] - 0.0
    assert sum(size for _, size in sent_at) <= limit.rate * span + limit.burst + 1e-6
