from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.liveness import JOIN_GRACE, LivenessTracker, Transition
from meshd.state import (
    ADMIN_ACTIVE,
    ADMIN_LEFT,
    ADMIN_REVOKED,
    LIVENESS_DOWN,
    LIVENESS_JOINING,
    LIVENESS_READY,
    NodeRecord,
    SiteState,
)

DOWN, READY, JOINING = LIVENESS_DOWN, LIVENESS_READY, LIVENESS_JOINING


def node(node_id, liveness=READY, admin=ADMIN_ACTIVE, seq=0) -> NodeRecord:
    return NodeRecord(node_id=node_id, name=node_id, site="s", address="198.18.0.1:7700",
                      raft_address="198.18.0.1:7701", public_key="00", liveness=liveness, admin=admin,
                      heartbeat_seq=seq)


def site(*nodes) -> SiteState:
    return SiteState(site="s", nodes={n.node_id: n for n in nodes})


def heartbeat(state: SiteState, node_id: str) -> None:
    n = state.nodes[node_id]
    state.nodes[node_id] = dataclasses.replace(n, heartbeat_seq=n.heartbeat_seq + 1)


def commit(state: SiteState, transitions: list[Transition]) -> None:
    for t in transitions:
        state.nodes[t.node_id] = dataclasses.replace(state.nodes[t.node_id], liveness=t.to)


def run(tracker: LivenessTracker, state: SiteState, steps) -> list[tuple[float, str, str]]:
    """Steps: ("reset", now) | ("hb", node_id) | ("contact", node_id, t) | ("observe", now).

    "hb" is a report command applied; "contact" is the leader hearing the node's Raft answer
    at time t. Transitions are committed."""
    seen = []
    contacts: dict[str, float] = {}
    for step in steps:
        if step[0] == "reset":
            tracker.reset(state, step[1])
        elif step[0] == "hb":
            heartbeat(state, step[1])
        elif step[0] == "contact":
            contacts[step[1]] = step[2]
        else:
            now = step[1]
            transitions = tracker.observe(state, now, contacts)
            commit(state, transitions)
            seen.extend((now, t.node_id, t.to) for t in transitions)
    return seen


def contacts(node_id, *times):
    """The leader hears the node's Raft answer at each time, and observes right after."""
    return [s for t in times for s in (("contact", node_id, t), ("observe", t))]


def beats(node_id, *times):
    """A heartbeat just before each observation at the given times."""
    return [s for t in times for s in (("hb", node_id), ("observe", t))]


SCENARIOS = [
    # (id, initial liveness, steps, expected transitions)
    ("steady heartbeats stay ready", READY,
     [("reset", 0)] + beats("n1", 0.5, 1.2, 2.0, 2.9), []),
    ("exactly the lease is not missed", READY, [("reset", 0), ("observe", 1.0)], []),
    ("missed lease", READY, [("reset", 0), ("observe", 0.5), ("observe", 1.01)], [(1.01, "n1", DOWN)]),
    ("missed lease after last heartbeat", READY,
     [("reset", 0)] + beats("n1", 0.9) + [("observe", 1.8), ("observe", 1.95)], [(1.95, "n1", DOWN)]),
    ("contacts keep a ready node's lease", READY,
     [("reset", 0)] + contacts("n1", 0.5, 1.4) + [("observe", 2.0)], []),
    ("contacts stop: down a lease after the last one", READY,
     [("reset", 0)] + contacts("n1", 0.5, 1.4) + [("observe", 2.3), ("observe", 2.5)], [(2.5, "n1", DOWN)]),
    ("a contact counts from when it happened, not when it was observed", READY,
     [("reset", 0), ("contact", "n1", 0.2), ("observe", 1.1), ("observe", 1.3)], [(1.3, "n1", DOWN)]),
    ("a contact from the future counts as now", READY,
     [("reset", 0), ("contact", "n1", 9.0), ("observe", 0.5), ("observe", 1.4), ("observe", 1.6)],
     [(1.6, "n1", DOWN)]),
    ("contacts heard before a reset do not count", READY,
     [("contact", "n1", 0.9), ("reset", 1.0), ("observe", 1.5), ("observe", 2.05)], [(2.05, "n1", DOWN)]),
    ("joining: a contact alone keeps the lease but does not make it ready", JOINING,
     [("reset", 0)] + contacts("n1", 0.3, 0.9, 1.5) + beats("n1", 1.6), [(1.6, "n1", READY)]),
    ("down: steady contacts make it ready after the hold-down", DOWN,
     [("reset", 0)] + contacts("n1", 3, 3.5, 3.9, 4.0), [(4.0, "n1", READY)]),
    ("down: reports and contacts together make one steady run", DOWN,
     [("reset", 0)] + contacts("n1", 3, 3.5) + beats("n1", 3.9) + contacts("n1", 4.0), [(4.0, "n1", READY)]),
    ("joining: first heartbeat makes it ready", JOINING,
     [("reset", 0)] + beats("n1", 0.3), [(0.3, "n1", READY)]),
    ("joining: never heartbeats, down after the join grace", JOINING,
     [("reset", 0), ("observe", 1.5), ("observe", JOIN_GRACE - 0.1), ("observe", JOIN_GRACE + 0.1)],
     [(JOIN_GRACE + 0.1, "n1", DOWN)]),
    ("joining: a contact keeps its grace", JOINING,
     [("reset", 0)] + contacts("n1", 9.0) + [("observe", JOIN_GRACE + 1), ("observe", JOIN_GRACE + 9.2)],
     [(JOIN_GRACE + 9.2, "n1", DOWN)]),
    ("down stays down without heartbeats", DOWN, [("reset", 0), ("observe", 5), ("observe", 50)], []),
    ("down: ready after the base hold-down", DOWN,
     [("reset", 0)] + beats("n1", 3, 3.5, 3.9, 4.0), [(4.0, "n1", READY)]),
    ("down: a gap longer than the lease restarts the hold-down", DOWN,
     [("reset", 0)] + beats("n1", 3, 3.5) + [("observe", 4.6)] + beats("n1", 4.7, 5.2, 5.7),
     [(5.7, "n1", READY)]),
    ("down: observing less often than the lease still lets a steady node recover", DOWN,
     [("reset", 0)] + beats("n1", 2, 4), [(4, "n1", READY)]),
    ("down: heartbeats seen before the reset do not count", DOWN,
     [("reset", 0)] + beats("n1", 0.5, 0.9) + [("reset", 1.0)] + beats("n1", 1.5, 1.9, 2.5),
     [(2.5, "n1", READY)]),
    ("flap damping doubles the hold-down", READY,
     [("reset", 0), ("observe", 1.5)]  # down #1 at 1.5
     + beats("n1", 2, 2.5, 3)  # hold 1s: ready at 3
     + [("observe", 4.5)]  # down #2 at 4.5
     + beats("n1", 5, 5.5, 6, 6.5, 7)  # hold 2s: ready at 7
     + [("observe", 8.5)]  # down #3 at 8.5
     + beats("n1", 9, 10, 11, 12, 13),  # hold 4s: ready at 13
     [(1.5, "n1", DOWN), (3, "n1", READY), (4.5, "n1", DOWN), (7, "n1", READY), (8.5, "n1", DOWN),
      (13, "n1", READY)]),
]


@pytest.mark.parametrize("initial,steps,expected", [s[1:] for s in SCENARIOS], ids=[s[0] for s in SCENARIOS])
def test_liveness(initial, steps, expected):
    tracker = LivenessTracker(lease=1.0, base_hold_down=1.0, max_hold_down=60.0, flap_window=300.0)
    assert run(tracker, site(node("n1", initial)), steps) == expected


def test_reasons():
    tracker = LivenessTracker(lease=2.5)
    state = site(node("n1"), node("n2", JOINING), node("n3", DOWN))
    tracker.reset(state, 0)
    heartbeat(state, "n2")
    heartbeat(state, "n3")
    first = tracker.observe(state, 1)
    assert first == [Transition("n2", READY, "first report")]
    commit(state, first)
    heartbeat(state, "n2")
    heartbeat(state, "n3")
    assert tracker.observe(state, 2.6) == [
        Transition("n1", DOWN, "missed heartbeat lease of 2.5s"),
        Transition("n3", READY, "heartbeating again for 1.6s (hold-down 1s, 0 down(s) in the last 300s)"),
    ]


def test_hold_down_is_capped_and_forgets_old_flaps():
    tracker = LivenessTracker(lease=1.0, base_hold_down=1.0, max_hold_down=5.0, flap_window=100.0)
    state = site(node("n1"))
    steps = [("reset", 0)]
    t = 0.0
    for _ in range(5):  # five downs, each followed by a recovery long enough for any hold-down
        t += 1.5
        steps.append(("observe", t))
        for _ in range(12):
            t += 0.5
            steps += beats("n1", t)
    run(tracker, state, steps)
    assert tracker.recent_downs("n1", t) == 5
    assert tracker.hold_down("n1", t) == 5.0  # 16s by doubling, capped
    assert tracker.hold_down("n1", t + 1000) == 1.0  # the flaps left the window


def test_unapplied_down_is_reemitted_but_counted_once():
    tracker = LivenessTracker(lease=1.0)
    state = site(node("n1"))
    tracker.reset(state, 0)
    assert [t.to for t in tracker.observe(state, 2)] == [DOWN]
    assert [t.to for t in tracker.observe(state, 3)] == [DOWN]  # state still says ready
    assert tracker.recent_downs("n1", 3) == 1


def test_transitions_the_state_already_reflects_are_not_emitted():
    tracker = LivenessTracker(lease=1.0)
    state = site(node("n1", DOWN), node("n2", READY))
    tracker.reset(state, 0)
    heartbeat(state, "n2")
    assert tracker.observe(state, 5) == []  # n1 already down; n2 ready and heartbeating


@pytest.mark.parametrize("admin", [ADMIN_LEFT, ADMIN_REVOKED])
def test_departed_nodes_are_ignored(admin):
    tracker = LivenessTracker(lease=1.0)
    state = site(node("n1", READY, admin), node("n2", JOINING, admin))
    tracker.reset(state, 0)
    heartbeat(state, "n2")
    assert tracker.observe(state, 10) == []


def test_vanished_nodes_are_forgotten_and_new_ones_get_a_fresh_lease():
    tracker = LivenessTracker(lease=1.0)
    state = site(node("n1"))
    tracker.reset(state, 0)
    del state.nodes["n1"]
    assert tracker.observe(state, 5) == []
    state.nodes["n1"] = node("n1", JOINING)
    assert tracker.observe(state, 10) == []  # first sight: the lease (a joiner's: its grace) starts now
    assert tracker.observe(state, 10 + JOIN_GRACE - 0.1) == []
    assert tracker.observe(state, 10 + JOIN_GRACE + 0.1) == [Transition("n1", DOWN, f"no first report within {JOIN_GRACE:g}s")]


@pytest.mark.parametrize("before", ["first sight", "reset"])
def test_a_joining_node_that_reported_before_the_leader_looked_is_ready(before):
    tracker = LivenessTracker(lease=1.0)
    state = site(node("n1", JOINING, seq=7))  # its first report is already applied
    if before == "reset":
        tracker.reset(state, 0)
    assert tracker.observe(state, 0.1) == [Transition("n1", READY, "first report")]


def test_transitions_are_sorted_by_node_id():
    tracker = LivenessTracker(lease=1.0)
    state = site(node("c"), node("a"), node("b"))
    tracker.reset(state, 0)
    assert [t.node_id for t in tracker.observe(state, 2)] == ["a", "b", "c"]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"lease": 0}, "lease must be positive"),
        ({"lease": 1, "base_hold_down": 5, "max_hold_down": 1}, "base_hold_down <= max_hold_down"),
        ({"lease": 1, "flap_window": -1}, "flap_window must not be negative"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LivenessTracker(**kwargs)


# --- properties ----------------------------------------------------------------------
NODE_IDS = ["n0", "n1", "n2"]
events = st.lists(
    st.tuples(
        st.sampled_from([0.0, 0.05, 0.2, 0.5, 0.9, 1.0, 1.5, 3.0]),  # time since the previous event
        st.sampled_from(["hb", "hb", "contact", "contact", "observe", "observe", "reset"]),
        st.sampled_from(NODE_IDS),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(schedule=events, initial=st.lists(st.sampled_from([READY, JOINING, DOWN]), min_size=3, max_size=3),
       lease=st.sampled_from([0.5, 1.0, 2.0]), base=st.sampled_from([0.0, 0.5, 1.0]))
def test_random_heartbeat_schedules(schedule, initial, lease, base):
    tracker = LivenessTracker(lease=lease, base_hold_down=base, max_hold_down=8.0, flap_window=30.0)
    state = site(*(node(n, liveness) for n, liveness in zip(NODE_IDS, initial)))
    last_heartbeat: dict[str, float] = {}
    heard: dict[str, float] = {}
    went_down: dict[str, float] = {}
    now = 0.0
    tracker.reset(state, now)
    for dt, kind, node_id in schedule:
        now += dt
        if kind in ("hb", "contact"):
            if kind == "hb":
                heartbeat(state, node_id)
            else:
                heard[node_id] = now
            last_heartbeat[node_id] = now
            continue
        if kind == "reset":
            tracker.reset(state, now)
            assert all(t.to == READY and state.nodes[t.node_id].liveness == JOINING
                       and state.nodes[t.node_id].heartbeat_seq != 0
                       for t in tracker.observe(state, now, heard)), (
                "a leader reset alone changes nothing, except a joining node that reported is ready")
            continue
        transitions = tracker.observe(state, now, heard)
        for t in transitions:
            assert state.nodes[t.node_id].liveness != t.to, "only transitions the state does not reflect"
            if t.to == DOWN:
                assert t.node_id not in last_heartbeat or now - last_heartbeat[t.node_id] > lease, (
                    "a node that heartbeated within the lease is never marked down")
                went_down[t.node_id] = now
            elif state.nodes[t.node_id].liveness == DOWN and t.node_id in went_down:
                assert now - went_down[t.node_id] >= base, "a recovered node waited out its hold-down"
        commit(state, transitions)


# --- next_check: when the leader must look again ----------------------------------------
def test_next_check_is_the_earliest_lease_end():
    tracker = LivenessTracker(lease=1.0, join_grace=1.0)  # (a joiner's grace is never below the lease)
    state = site(node("n1"), node("n2", JOINING), node("n3", DOWN), node("n4", admin=ADMIN_LEFT))
    tracker.reset(state, 0)
    assert tracker.next_check(state) == 1.0
    tracker.observe(state, 0.6, {"n1": 0.5, "n2": 0.3})
    assert tracker.next_check(state) == 1.3  # n2's contact at 0.3 + lease
    tracker.observe(state, 0.7, {"n1": 0.5, "n2": 0.65})
    assert tracker.next_check(state) == 1.5


def test_next_check_for_down_nodes():
    tracker = LivenessTracker(lease=1.0, base_hold_down=1.0)
    state = site(node("n1", DOWN))
    tracker.reset(state, 0)
    assert tracker.next_check(state) is None  # only news can bring it back
    tracker.observe(state, 3.0, {"n1": 2.9})
    assert tracker.next_check(state) == pytest.approx(3.9)  # run started at 2.9, 1 s hold-down


def test_nothing_pending_without_nodes():
    assert LivenessTracker(lease=1.0).next_check(SiteState(site="s")) is None


@settings(max_examples=300, deadline=None)
@given(schedule=events, lease=st.sampled_from([0.5, 1.0, 2.0]))
def test_no_lease_runs_out_before_next_check(schedule, lease):
    """Observing before next_check, with no news since the last observation, never marks a
    node down: the leader may sleep until then."""
    tracker = LivenessTracker(lease=lease)
    state = site(*(node(n) for n in NODE_IDS))
    heard: dict[str, float] = {}
    now = 0.0
    tracker.reset(state, now)
    for dt, kind, node_id in schedule:
        now += dt
        if kind == "hb":
            heartbeat(state, node_id)
        elif kind == "contact":
            heard[node_id] = now
        else:
            commit(state, tracker.observe(state, now, heard))
            deadline = tracker.next_check(state)
            if deadline is not None and deadline > now:
                probe = LivenessTracker(lease=lease)
                probe._watch = {k: dataclasses.replace(v, downs=list(v.downs)) for k, v in tracker._watch.items()}
                quiet = now + (deadline - now) * 0.999
                assert all(t.to != DOWN for t in probe.observe(state, quiet, heard))
