"""meshd.waves: which sites take an edit when, and what the rollout across sites has come to."""

from __future__ import annotations

from meshd import waves
from meshd.state import RolloutPlan, Wave
from meshd.waves import Control, SiteWord

SITES = [f"s{i}" for i in range(10)]


def plan(*waves_, abort=0):
    return RolloutPlan(waves=tuple(waves_), abort_failed_percent=abort)


def ok(ts=100.0):
    return SiteWord("succeeded", healthy=2, desired=2, ended_ts=ts)


def test_named_sites_first_then_percent_of_all_sites_counted_from_the_first_wave():
    p = plan(Wave(sites=("s7",)), Wave(percent=30), Wave(percent=100))
    got = waves.waves_of("app", SITES, p)
    assert got[0] == ["s7"]
    assert len(got[1]) == 2  # ceil(30% of 10) = 3 sites in all, one of them s7
    assert len(got[2]) == 7
    assert sorted(s for w in got for s in w) == sorted(SITES)


def test_the_order_is_the_same_everywhere_and_differs_per_app():
    p = plan(Wave(percent=20), Wave(percent=100))
    assert waves.waves_of("app", SITES, p) == waves.waves_of("app", list(reversed(SITES)), p)
    assert waves.waves_of("app", SITES, p)[0] != waves.waves_of("other", SITES, p)[0] \
        or waves.waves_of("app", SITES, p)[1] != waves.waves_of("other", SITES, p)[1]


def test_sites_no_wave_reaches_form_a_last_wave():
    got = waves.waves_of("app", ["a", "b", "c"], plan(Wave(sites=("a",))))
    assert got[0] == ["a"] and sorted(got[1]) == ["b", "c"]


def test_only_the_first_wave_is_open_at_the_start_and_others_are_pending():
    p = plan(Wave(sites=("a",), soak_s=10), Wave(percent=100))
    v = waves.view("app", ["a", "b", "c"], p, {}, [], now=0.0)
    assert v.state == "running" and v.waves_open == 1
    assert v.may_run("a") and not v.may_run("b")
    assert {s: part.state for s, part in v.sites.items()} == {"a": "pending", "b": "pending", "c": "pending"}
    assert v.sites["b"].wave == 2


def test_the_next_wave_opens_once_the_last_one_ended_and_soaked():
    p = plan(Wave(sites=("a",), soak_s=10), Wave(percent=100))
    words = {"a": ok(ts=100.0)}
    before = waves.view("app", ["a", "b"], p, words, [], now=105.0)
    assert not before.may_run("b") and before.next_open_at == 110.0
    after = waves.view("app", ["a", "b"], p, words, [], now=110.0)
    assert after.may_run("b") and after.waves_open == 2 and after.state == "running"


def test_a_site_not_heard_from_holds_back_later_waves_and_is_never_failed():
    p = plan(Wave(sites=("a", "b")), Wave(sites=("c",)))
    words = {"a": ok()}  # b took it (its wave is open) but is cut off
    v = waves.view("app", ["a", "b", "c"], p, words, [], now=1e9)
    assert v.sites["b"].state == "pending" and v.sites["b"].open
    assert not v.may_run("c") and v.state == "running"
    healed = waves.view("app", ["a", "b", "c"], p, words | {"b": ok()}, [], now=1e9)
    assert healed.may_run("c")


def test_running_sites_keep_the_next_wave_shut():
    p = plan(Wave(sites=("a",)), Wave(sites=("b",)))
    v = waves.view("app", ["a", "b"], p, {"a": SiteWord("running", healthy=1, desired=2)}, [], now=1e9)
    assert not v.may_run("b") and v.sites["a"].healthy == 1


def test_all_waves_through_is_succeeded_after_the_last_soak():
    p = plan(Wave(sites=("a",)), Wave(sites=("b",), soak_s=60))
    words = {"a": ok(10.0), "b": ok(20.0)}
    assert waves.view("app", ["a", "b"], p, words, [], now=50.0).state == "running"
    assert waves.view("app", ["a", "b"], p, words, [], now=80.0).state == "succeeded"


def test_the_first_failed_site_stops_the_rollout_by_default():
    p = plan(Wave(sites=("a",)), Wave(percent=100))
    v = waves.view("app", ["a", "b", "c"], p, {"a": SiteWord("reverted", ended_ts=5.0)}, [], now=1e9)
    assert v.state == "reverted" and v.stopped and v.failed == 1
    assert not v.may_run("b") and not v.may_run("a")
    assert "1 of 3 sites failed (a)" in v.reason


def test_failures_below_the_threshold_go_on():
    p = plan(Wave(percent=50), Wave(percent=100), abort=50)
    order = [s for w in waves.waves_of("app", SITES[:4], p) for s in w]
    words = {order[0]: SiteWord("failed", ended_ts=1.0), order[1]: ok(1.0)}
    v = waves.view("app", SITES[:4], p, words, [], now=10.0)
    assert v.state == "running" and v.may_run(order[2])  # 1 of 4 failed < 50 %
    words[order[2]] = SiteWord("reverted", ended_ts=2.0)
    v = waves.view("app", SITES[:4], p, words, [], now=10.0)
    assert v.state == "reverted" and not v.may_run(order[3])  # 2 of 4 = 50 %


def test_pause_opens_no_wave_resume_does_and_the_latest_wins():
    p = plan(Wave(sites=("a",)), Wave(sites=("b",)))
    words = {"a": ok(1.0)}
    paused = [Control("pause", 5.0, "a", "ops")]
    v = waves.view("app", ["a", "b"], p, words, paused, now=10.0)
    assert v.state == "paused" and not v.may_run("b") and v.may_run("a")
    resumed = paused + [Control("resume", 6.0, "b", "ops")]
    v = waves.view("app", ["a", "b"], p, words, resumed, now=10.0)
    assert v.state == "running" and v.may_run("b")


def test_cancel_is_final_whatever_comes_after():
    p = plan(Wave(sites=("a",)), Wave(sites=("b",)))
    controls = [Control("cancel", 5.0, "b", "ops", "wrong model"), Control("resume", 9.0, "a", "ops")]
    v = waves.view("app", ["a", "b"], p, {"a": SiteWord("running")}, controls, now=10.0)
    assert v.state == "cancelled" and v.stopped and "wrong model" in v.reason
    assert waves.site_step(v, "a", "running") == "abort"


def test_every_site_holding_the_same_records_decides_the_same():
    p = plan(Wave(sites=("s1",), soak_s=5), Wave(percent=40), Wave(percent=100), abort=30)
    words = {"s1": ok(1.0), "s3": SiteWord("failed", ended_ts=2.0)}
    controls = [Control("pause", 1.0, "s2"), Control("resume", 2.0, "s4")]
    seen = {repr(waves.view("app", targets, p, words, controls, now=20.0))
            for targets in (SITES, list(reversed(SITES)), SITES[5:] + SITES[:5])}
    assert len(seen) == 1


def test_site_step_follows_the_rollout():
    p = plan(Wave(sites=("a",)), Wave(sites=("b",)))
    running = waves.view("app", ["a", "b"], p, {"a": SiteWord("paused")}, [], now=1.0)
    assert waves.site_step(running, "a", "paused") == "resume"
    paused = waves.view("app", ["a", "b"], p, {"a": SiteWord("running")}, [Control("pause", 0.5, "a")], now=1.0)
    assert waves.site_step(paused, "a", "running") == "pause"
    assert waves.site_step(paused, "a", "paused") is None
    stopped = waves.view("app", ["a", "b"], p, {"b": SiteWord("failed")}, [], now=1.0)
    assert waves.site_step(stopped, "a", "succeeded") == "abort"
    assert waves.site_step(stopped, "a", "reverted") is None
    assert waves.site_step(stopped, "a", None) is None
