"""When a node reports: table-driven and property tests of meshd.reporting."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.reporting import ReportSchedule, resources_moved

RES = {"cpu_total": 4.0, "cpu_free": 3.0, "mem_total_mb": 1000, "mem_free_mb": 500}


def res(**changes):
    return {**RES, **changes}


def alloc(alloc_id, state="running", pid=10, restarts=0):
    return {"alloc_id": alloc_id, "state": state, "pid": pid, "restarts": restarts, "exit_code": None,
            "reason": "", "app": "extra fields are not reported"}


@pytest.mark.parametrize("last,current,moved", [
    ({}, RES, True),
    (RES, RES, False),
    (RES, res(cpu_free=0.5), False),  # the idle share travels along, it never triggers a report
    (RES, res(mem_free_mb=460), False),  # under a twentieth of 1000 MB
    (RES, res(mem_free_mb=550), True),
    (RES, res(cpu_total=8.0), True),  # hardware changed (a CPU came online)
    (RES, res(mem_total_mb=2000), True),
    # the site's record (dataclasses.asdict of NodeResources) holds tuples; a sample holds a
    # list and a mapping: the same content is no news
    (res(enforces=("cpu", "memory"), devices=(("gpu", 1),)), res(enforces=["memory", "cpu"], devices={"gpu": 1}), False),
    (res(enforces=(), devices=()), res(enforces=[], devices={}), False),
    (res(enforces=("cpu",)), res(enforces=["cpu", "pids"]), True),
    (res(devices=(("gpu", 1),)), res(devices={"gpu": 2}), True),
    (res(devices=(("gpu", 1),)), res(devices={}), True),
])
def test_resources_moved(last, current, moved):
    assert resources_moved(last, current) is moved


def run(schedule: ReportSchedule, steps):
    """steps: (now, resources, allocs, commits?) -> list of (now, full, [alloc ids]) sent."""
    sent = []
    for now, resources, allocs, commits in steps:
        report = schedule.due(now, resources, allocs)
        if report is None:
            continue
        sent.append((now, report.full, [a["alloc_id"] for a in report.allocs]))
        if commits:
            schedule.sent(now, report)
    return sent


SCENARIOS = [
    ("first check reports everything",
     [(0, RES, [alloc("a"), alloc("b")], True)], [(0, True, ["a", "b"])]),
    ("no news, no report",
     [(0, RES, [alloc("a")], True), (1, RES, [alloc("a")], True), (2, res(cpu_free=2.9), [alloc("a")], True)],
     [(0, True, ["a"])]),
    ("a changed allocation is reported alone",
     [(0, RES, [alloc("a"), alloc("b")], True), (1, RES, [alloc("a"), alloc("b", state="failed")], True),
      (2, RES, [alloc("a"), alloc("b", state="failed")], True)],
     [(0, True, ["a", "b"]), (1, False, ["b"])]),
    ("a new allocation is reported",
     [(0, RES, [], True), (1, RES, [alloc("a", state="starting")], True)], [(0, True, []), (1, False, ["a"])]),
    ("resources that moved are reported without allocations",
     [(0, RES, [alloc("a")], True), (1, res(mem_free_mb=300), [alloc("a")], True)],
     [(0, True, ["a"]), (1, False, [])]),
    ("full resend every period",
     [(0, RES, [alloc("a")], True), (5, RES, [alloc("a")], True), (10, RES, [alloc("a")], True)],
     [(0, True, ["a"]), (10, True, ["a"])]),
    ("a report that did not commit is sent again",
     [(0, RES, [alloc("a")], False), (1, RES, [alloc("a")], True), (2, RES, [alloc("a")], True)],
     [(0, True, ["a"]), (1, True, ["a"])]),
]


@pytest.mark.parametrize("steps,expected", [s[1:] for s in SCENARIOS], ids=[s[0] for s in SCENARIOS])
def test_schedule(steps, expected):
    assert run(ReportSchedule(full_period=10.0), steps) == expected


states = st.sampled_from(["starting", "running", "failed"])
checks = st.lists(st.tuples(
    st.floats(min_value=0, max_value=3),  # time since the previous check
    st.dictionaries(st.sampled_from("abc"), st.tuples(states, st.integers(0, 2)), max_size=3),
    st.floats(min_value=0, max_value=4),  # cpu_free
    st.booleans(),  # the report commits
), max_size=40)


@settings(max_examples=200, deadline=None)
@given(checks=checks)
def test_the_site_view_converges_to_the_node(checks):
    """After any history, one committed report later the last committed view of every
    allocation equals the node's current one, and then nothing is due until news."""
    schedule = ReportSchedule(full_period=10.0)
    site_view: dict[str, tuple] = {}
    now = 0.0
    allocs: list[dict] = []
    resources = RES
    for dt, current, cpu_free, commits in checks:
        now += dt
        allocs = [alloc(k, state=s, restarts=r) for k, (s, r) in sorted(current.items())]
        resources = res(cpu_free=cpu_free)
        report = schedule.due(now, resources, allocs)
        if report is not None and commits:
            schedule.sent(now, report)
            for a in report.allocs:
                site_view[a["alloc_id"]] = (a["state"], a["restarts"])
    report = schedule.due(now, resources, allocs)
    if report is not None:
        schedule.sent(now, report)
        for a in report.allocs:
            site_view[a["alloc_id"]] = (a["state"], a["restarts"])
    assert {a["alloc_id"]: (a["state"], a["restarts"]) for a in allocs}.items() <= site_view.items()
    assert schedule.due(now, resources, allocs) is None


def test_allocation_reports_leave_unmoved_resources_out():
    schedule = ReportSchedule(full_period=10.0)
    first = schedule.due(0, RES, [])
    assert first is not None and first.resources_moved and first.full
    schedule.sent(0, first)
    assert schedule.due(0.3, res(cpu_free=2.9), []) is None  # a small move is no news
    news = schedule.due(0.4, res(cpu_free=2.9), [alloc("a")])
    assert news is not None and not news.resources_moved and [a["alloc_id"] for a in news.allocs] == ["a"]


def test_a_full_resend_the_site_needs_nothing_from_is_not_sent():
    schedule = ReportSchedule(full_period=10.0)
    shown = lambda report: True  # noqa: E731 - the site shows every allocation as reported
    first = schedule.due(0.0, RES, [alloc("a")], shown, site_has=lambda r: False)  # the site lacks our resources
    assert first.needed and first.resources_moved
    schedule.sent(0.0, first)
    idle = schedule.due(10.0, res(cpu_free=2.9), [alloc("a")], shown, site_has=lambda r: True)
    assert idle is not None and idle.full and not idle.needed and idle.allocs == ()
    schedule.sent(10.0, idle)  # counted as the period's resend: nothing due until the next one
    assert schedule.due(15.0, res(cpu_free=2.9), [alloc("a")], shown, site_has=lambda r: True) is None
    lacking = schedule.due(20.0, RES, [alloc("a")], lambda report: False, site_has=lambda r: True)
    assert lacking.needed and [a["alloc_id"] for a in lacking.allocs] == ["a"]


def test_a_stop_by_meshd_travels_with_the_report():
    schedule = ReportSchedule(full_period=10.0)
    report = schedule.due(0.0, RES, [alloc("a") | {"state": "stopped", "pid": None, "stopped_by_meshd": True}])
    assert report.allocs[0]["stopped_by_meshd"] is True


def test_a_full_resend_repairs_only_what_the_site_does_not_show():
    from meshd.reporting import reflected_in
    from meshd.state import Alloc

    site = {"shown": Alloc("shown", "web", 1, 0, "n1", state="running", pid=10),
            "swallowed": Alloc("swallowed", "web", 1, 1, "n1", state="pending"),
            "done": Alloc("done", "web", 1, 2, "n1", desired="stop", state="stopped")}
    schedule = ReportSchedule(full_period=10.0)
    allocs = [alloc("shown"), alloc("swallowed"), alloc("done", state="stopped", pid=None), alloc("forgotten")]
    first = schedule.due(0.0, RES, allocs, reflected_in(site.get))
    assert [a["alloc_id"] for a in first.allocs] == ["swallowed"] and first.full
    schedule.sent(0.0, first)
    assert schedule.due(5.0, RES, allocs, reflected_in(site.get)) is None  # no news in between
