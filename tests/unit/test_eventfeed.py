"""meshd.eventfeed: an events --follow stream past any history length, with --since, and a
marker for what a slow follower missed."""

from __future__ import annotations

import pytest

from meshd import eventfeed
from meshd.eventfeed import Cursor
from meshd.state import Event


def numbered(first: int, last: int) -> list[Event]:
    return [Event(ts=1000.0 + i, kind="app", message=f"e{i}", seq=i) for i in range(first, last + 1)]


def test_a_follower_gets_each_new_event_once_after_the_history_is_full():
    kept = numbered(1, 2000)
    cursor = Cursor(replicated=2000, local=0)
    for last in range(2001, 2011):  # the capped list stops growing; the numbers do not
        kept = kept[1:] + numbered(last, last)
        items, cursor = eventfeed.step(cursor, kept, last, [], 0, now=5000.0)
        assert [i["message"] for i in items] == [f"e{last}"]
    assert eventfeed.step(cursor, kept, 2010, [], 0, now=5000.0)[0] == []


def test_local_events_are_followed_by_their_count_and_merged_in_time_order():
    local = [{"ts": 1002.5, "kind": "attestation", "message": "l1"}]
    items, cursor = eventfeed.step(Cursor(1, 0), numbered(1, 3), 3, local, 1, now=5000.0)
    assert [i["message"] for i in items] == ["e2", "l1", "e3"]
    assert cursor == Cursor(3, 1)


def test_events_dropped_before_a_slow_follower_saw_them_are_announced():
    kept = numbered(2501, 4500)  # 2,500 new ones arrived while the follower was at 2,000
    local = [{"ts": 1000.0 + i, "kind": "x", "message": f"l{i}"} for i in range(10)]
    items, cursor = eventfeed.step(Cursor(2000, 5), kept, 4500, local, 25, now=9999.0)
    marker = items[0]
    assert marker == {"ts": 9999.0, "kind": "skipped", "missed": 500 + 10,
                      "message": "510 events were dropped from the kept history before this stream could send them"}
    assert len(items) == 1 + 2000 + 10 and cursor == Cursor(4500, 25)


def test_since_keeps_only_newer_events_in_the_backlog_and_after():
    history = [e.to_plain() for e in numbered(1, 100)]
    assert len(eventfeed.backlog(history, None)) == eventfeed.BACKLOG
    assert [e["message"] for e in eventfeed.backlog(history, 1097.0)] == ["e98", "e99", "e100"]
    items, _ = eventfeed.step(Cursor(100, 0, since=1101.5), numbered(1, 103), 103, [], 0, now=0.0)
    assert [e["message"] for e in items] == ["e102", "e103"]


@pytest.mark.parametrize("bad", [True, "1", float("nan"), float("inf"), -1, [1]])
def test_since_that_is_not_a_time_is_refused(bad):
    with pytest.raises(eventfeed.SinceError, match="--since must be a time"):
        eventfeed.check_since(bad)
    assert eventfeed.check_since(None) is None and eventfeed.check_since(12) == 12.0


def test_every_replicated_event_carries_its_number_and_a_stream_resumes_after_it_exactly():
    kept = numbered(1001, 3000)  # the capped history holds 1,001 to 3,000
    first, cursor = eventfeed.step(Cursor(2990, 0), kept, 3000, [], 0, now=0.0)
    assert [e["seq"] for e in first] == list(range(2991, 3001))
    # the client printed up to 2995 and reconnected: it gets 2996 on, nothing twice
    resumed, _ = eventfeed.step(Cursor(eventfeed.check_after_seq(2995, 3000), 0), kept, 3000, [], 0, now=0.0)
    assert [e["seq"] for e in resumed] == [2996, 2997, 2998, 2999, 3000]
    # resumed after numbers the history no longer holds: one marker, then all it holds
    old, _ = eventfeed.step(Cursor(eventfeed.check_after_seq(500, 3000), 0), kept, 3000, [], 0, now=7.0)
    assert old[0]["kind"] == "skipped" and old[0]["missed"] == 500
    assert [e["seq"] for e in old[1:]] == list(range(1001, 3001))


@pytest.mark.parametrize("bad, why", [(True, "must be an event number"), ("3", "must be an event number"),
                                      (-1, "must be an event number"), (1.5, "must be an event number"),
                                      (3001, "no event numbered 3001 on this site yet")])
def test_a_resume_number_that_is_not_one_or_not_reached_is_refused(bad, why):
    with pytest.raises(eventfeed.SinceError, match=why):
        eventfeed.check_after_seq(bad, 3000)
    assert eventfeed.check_after_seq(None, 3000) is None and eventfeed.check_after_seq(3000, 3000) == 3000


def test_a_filter_keeps_the_kinds_app_and_node_asked_for_and_every_skipped_marker():
    events = [{"kind": "alloc", "app": "web", "node": "n1", "message": "a"},
              {"kind": "alloc", "app": "db", "node": "n2", "message": "b"},
              {"kind": "node", "node": "n1", "message": "c"},
              {"kind": "membership", "message": "d"},
              {"kind": "skipped", "count": 3, "message": "3 events dropped"}]

    def kept(**wanted):
        chosen = eventfeed.check_filter(wanted.get("kinds"), wanted.get("app"), wanted.get("node"))
        return [e["message"] for e in events if chosen.matches(e)]
    assert kept() == ["a", "b", "c", "d", "3 events dropped"]
    assert kept(kinds=["alloc"]) == ["a", "b", "3 events dropped"]
    assert kept(kinds=["alloc", "node"], node="n1") == ["a", "c", "3 events dropped"]
    assert kept(app="web") == ["a", "3 events dropped"]
    assert kept(app="nothing") == ["3 events dropped"]


@pytest.mark.parametrize("kinds,app,node,said", [
    ("alloc", None, None, "--kind"),
    ([1], None, None, "--kind"),
    (["x"] * 17, None, None, "--kind"),
    (None, 3, None, "--app"),
    (None, None, "n" * 65, "--node"),
    (None, "", None, "--app"),
])
def test_a_malformed_filter_is_refused_with_the_option_named(kinds, app, node, said):
    with pytest.raises(eventfeed.SinceError, match=said):
        eventfeed.check_filter(kinds, app, node)
