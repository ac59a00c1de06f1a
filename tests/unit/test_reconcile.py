from __future__ import annotations

import dataclasses
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.reconcile import Reconciliation, covers, reconcile
from meshd.state import (
    ADMIN_ACTIVE,
    ADMIN_DRAINING,
    ADMIN_LEFT,
    ADMIN_REVOKED,
    ALLOC_FAILED,
    ALLOC_LOST,
    ALLOC_PENDING,
    ALLOC_RUNNING,
    ALLOC_STATES,
    ALLOC_STOPPED,
    APP_RUNNING,
    APP_STOPPED,
    DESIRED_RUN,
    DESIRED_STOP,
    LIVENESS_DOWN,
    LIVENESS_JOINING,
    LIVENESS_READY,
    Alloc,
    AppRecord,
    AppSpec,
    NodeRecord,
    SiteState,
)


def N(node_id, admin=ADMIN_ACTIVE, liveness=LIVENESS_READY) -> NodeRecord:
    return NodeRecord(node_id=node_id, name=node_id, site="s", address="198.18.0.1:7700",
                      raft_address="198.18.0.1:7701", public_key="00", admin=admin, liveness=liveness)


def App(name, replicas, version=1, status=APP_RUNNING, policy="always") -> AppRecord:
    return AppRecord(spec=AppSpec(name=name, replicas=replicas, command=("true",), restart_policy=policy),
                     version=version, status=status)


def A(alloc_id, app="web", version=1, replica=0, node="n1", desired=DESIRED_RUN, state=ALLOC_RUNNING,
      created_at=0.0) -> Alloc:
    return Alloc(alloc_id=alloc_id, app=app, version=version, replica=replica, node_id=node,
                 desired=desired, state=state, created_at=created_at)


def S(nodes=(), apps=(), allocs=()) -> SiteState:
    state = SiteState(site="s")
    state.nodes = {n.node_id: n for n in nodes}
    state.apps = {a.spec.name: a for a in apps}
    state.allocs = {a.alloc_id: a for a in allocs}
    return state


NODES = (N("n1"), N("n2"), N("n3"))

SCENARIOS = [
    # (id, state, place, stop)
    ("new app", S(NODES, [App("web", 3)]), {"web": (0, 1, 2)}, ()),
    ("steady", S(NODES, [App("web", 2)], [A("a0", replica=0), A("a1", replica=1, node="n2")]), {}, ()),
    ("pending covers", S(NODES, [App("web", 1)], [A("a0", state=ALLOC_PENDING)]), {}, ()),
    ("scale up", S(NODES, [App("web", 3)], [A("a0", replica=0), A("a1", replica=1)]), {"web": (2,)}, ()),
    ("scale down", S(NODES, [App("web", 1)], [A("a0", replica=0), A("a1", replica=1)]), {},
     (("a1", "scaled down"),)),
    ("scale down ignores finished", S(NODES, [App("web", 1)],
                                      [A("a0"), A("a1", replica=1, state=ALLOC_FAILED)]), {}, ()),
    ("scale to zero", S(NODES, [App("web", 0)], [A("a0")]), {}, (("a0", "scaled down"),)),
    ("new version rollout", S(NODES, [App("web", 2, version=2)],
                              [A("a0", replica=0), A("a1", replica=1, node="n2")]),
     {"web": (0, 1)}, (("a0", "replaced by version 2"), ("a1", "replaced by version 2"))),
    ("rollout half done", S(NODES, [App("web", 2, version=2)],
                            [A("a0", replica=0), A("a1", replica=1), A("b0", version=2, replica=0)]),
     {"web": (1,)}, (("a0", "replaced by version 2"), ("a1", "replaced by version 2"))),
    ("new version with fewer replicas", S(NODES, [App("web", 1, version=2)],
                                          [A("a0", replica=0), A("a1", replica=1)]),
     {"web": (0,)}, (("a0", "replaced by version 2"), ("a1", "scaled down"))),
    ("drain", S([N("n1", admin=ADMIN_DRAINING), N("n2")], [App("web", 2)],
                [A("a0", replica=0, node="n1"), A("a1", replica=1, node="n2")]),
     {"web": (0,)}, (("a0", "node draining"),)),
    ("drain moved already", S([N("n1", admin=ADMIN_DRAINING), N("n2")], [App("web", 1)],
                              [A("a0", node="n1", desired=DESIRED_STOP), A("b0", node="n2")]), {}, ()),
    ("node down, allocs lost", S([N("n1", liveness=LIVENESS_DOWN), N("n2")], [App("web", 2)],
                                 [A("a0", replica=0, node="n1", desired=DESIRED_STOP, state=ALLOC_LOST),
                                  A("a1", replica=1, node="n2")]),
     {"web": (0,)}, ()),
    ("lost but still wanted does not cover", S(NODES, [App("web", 1)], [A("a0", state=ALLOC_LOST)]),
     {"web": (0,)}, ()),
    ("node left", S([N("n1", admin=ADMIN_LEFT), N("n2")], [App("web", 1)], [A("a0")]),
     {"web": (0,)}, (("a0", "node left"),)),
    ("node revoked", S([N("n1", admin=ADMIN_REVOKED), N("n2")], [App("web", 1)], [A("a0")]),
     {"web": (0,)}, (("a0", "node revoked"),)),
    ("node gone", S([N("n2")], [App("web", 1)], [A("a0")]), {"web": (0,)}, (("a0", "node n1 gone"),)),
    ("partition heal duplicates: oldest kept", S(NODES, [App("web", 1)],
                                                 [A("a0", node="n1", created_at=10), A("b0", node="n2", created_at=20)]),
     {}, (("b0", "duplicate replica"),)),
    ("duplicates: running beats older pending", S(NODES, [App("web", 1)],
                                                  [A("a0", state=ALLOC_PENDING, created_at=1),
                                                   A("b0", node="n2", created_at=5)]),
     {}, (("a0", "duplicate replica"),)),
    ("duplicates: alloc id breaks ties", S(NODES, [App("web", 1)],
                                           [A("z0", created_at=1), A("c0", node="n2", created_at=1),
                                            A("m0", node="n3", created_at=1)]),
     {}, (("m0", "duplicate replica"), ("z0", "duplicate replica"))),
    ("duplicates: live beats failed", S(NODES, [App("web", 1)],
                                        [A("a0", state=ALLOC_FAILED, created_at=1),
                                         A("b0", node="n2", state=ALLOC_PENDING, created_at=5)]),
     {}, ()),
    ("stopped app", S(NODES, [App("web", 2, status=APP_STOPPED)],
                      [A("a0"), A("a1", replica=1, state=ALLOC_PENDING), A("a2", state=ALLOC_FAILED),
                       A("a3", desired=DESIRED_STOP)]),
     {}, (("a0", "app stopped"), ("a1", "app stopped"))),
    ("removed app", S(NODES, [], [A("a0", app="old"), A("a1", app="old", state=ALLOC_STOPPED)]),
     {}, (("a0", "app removed"),)),
    ("failed with policy never stays failed and covered",
     S(NODES, [App("web", 1, policy="never")], [A("a0", state=ALLOC_FAILED)]), {}, ()),
    ("exited on its own keeps covering", S(NODES, [App("web", 1)], [A("a0", state=ALLOC_STOPPED)]), {}, ()),
    ("operator-stopped alloc does not cover", S(NODES, [App("web", 1)],
                                                [A("a0", desired=DESIRED_STOP, state=ALLOC_STOPPED)]),
     {"web": (0,)}, ()),
    ("two apps", S(NODES, [App("web", 1), App("db", 2)], [A("a0"), A("d0", app="db", replica=1)]),
     {"db": (0,)}, ()),
]


@pytest.mark.parametrize("state,place,stop", [s[1:] for s in SCENARIOS], ids=[s[0] for s in SCENARIOS])
def test_reconcile(state, place, stop):
    assert reconcile(state) == Reconciliation(place=place, stop=stop)


def test_empty():
    assert reconcile(S()).empty
    assert not reconcile(S(NODES, [App("web", 1)])).empty


def test_stops_for_one_app():
    state = S(NODES, [App("web", 0), App("db", 0)], [A("a0"), A("d0", app="db")])
    result = reconcile(state)
    assert result.stops_for("db", state) == (("d0", "scaled down"),)


@pytest.mark.parametrize(
    "alloc,node,expected",
    [
        (A("a"), N("n1"), True),
        (A("a", state=ALLOC_FAILED), N("n1"), True),
        (A("a", state=ALLOC_LOST), N("n1"), False),
        (A("a", desired=DESIRED_STOP), N("n1"), False),
        (A("a"), None, False),
        (A("a"), N("n1", admin=ADMIN_DRAINING), False),
        (A("a"), N("n1", admin=ADMIN_LEFT), False),
        (A("a"), N("n1", admin=ADMIN_REVOKED), False),
        (A("a"), N("n1", liveness=LIVENESS_JOINING), True),
    ],
)
def test_covers(alloc, node, expected):
    assert covers(alloc, node) is expected


# --- property: reconciling the applied result leaves nothing to do -------------------
APP_NAMES = ["a", "b", "c"]


@st.composite
def site_states(draw) -> SiteState:
    extra_nodes = draw(st.lists(
        st.tuples(st.sampled_from([ADMIN_ACTIVE, ADMIN_ACTIVE, ADMIN_DRAINING, ADMIN_LEFT, ADMIN_REVOKED]),
                  st.sampled_from([LIVENESS_READY, LIVENESS_DOWN, LIVENESS_JOINING])),
        max_size=4))
    nodes = [N("n0")] + [N(f"n{i + 1}", admin, liveness) for i, (admin, liveness) in enumerate(extra_nodes)]
    apps = []
    for name in draw(st.lists(st.sampled_from(APP_NAMES), unique=True)):
        apps.append(App(name, draw(st.integers(0, 4)), draw(st.integers(1, 3)),
                        draw(st.sampled_from([APP_RUNNING, APP_RUNNING, APP_STOPPED]))))
    node_ids = [n.node_id for n in nodes] + ["ghost"]
    allocs = []
    for i, (app, version, replica, node, desired, state, created) in enumerate(draw(st.lists(
            st.tuples(st.sampled_from(APP_NAMES + ["gone"]), st.integers(1, 3), st.integers(0, 5),
                      st.sampled_from(node_ids), st.sampled_from([DESIRED_RUN, DESIRED_RUN, DESIRED_STOP]),
                      st.sampled_from(ALLOC_STATES), st.integers(0, 3)),
            max_size=16))):
        allocs.append(A(f"x{i:02d}", app, version, replica, node, desired, state, float(created)))
    return S(nodes, apps, allocs)


def apply(state: SiteState, result: Reconciliation) -> SiteState:
    """What the site does with a reconciliation, placing on the first eligible node."""
    out = dataclasses.replace(state, nodes=dict(state.nodes), apps=dict(state.apps), allocs=dict(state.allocs))
    for alloc_id, reason in result.stop:
        out.allocs[alloc_id] = dataclasses.replace(
            out.allocs[alloc_id], desired=DESIRED_STOP, state=ALLOC_STOPPED, reason=reason)
    target = next(n for n in sorted(out.nodes) if covers(A("probe"), out.nodes[n]))
    for app, replicas in result.place.items():
        for replica in replicas:
            alloc_id = f"new-{app}-{replica}"
            out.allocs[alloc_id] = A(alloc_id, app, out.apps[app].version, replica, target, created_at=100.0)
    return out


@settings(max_examples=300, deadline=None)
@given(state=site_states())
def test_reconcile_reaches_a_fixpoint(state):
    first = reconcile(state)
    stopped_ids = [alloc_id for alloc_id, _ in first.stop]
    assert len(stopped_ids) == len(set(stopped_ids)), "an allocation is stopped at most once"
    assert all(state.allocs[alloc_id].live for alloc_id in stopped_ids), "only live allocations are stopped"

    after = apply(state, first)
    assert reconcile(after).empty

    live_by_app: dict[str, list[Alloc]] = defaultdict(list)
    for alloc in after.allocs.values():
        if alloc.live:
            live_by_app[alloc.app].append(alloc)
    for name in set(live_by_app) | set(after.apps):
        record = after.apps.get(name)
        live = live_by_app.get(name, [])
        if record is None or record.status == APP_STOPPED:
            assert live == []
            continue
        holders = defaultdict(list)
        for alloc in after.allocs.values():
            if (alloc.app == name and alloc.version == record.version
                    and covers(alloc, after.nodes.get(alloc.node_id))):
                holders[alloc.replica].append(alloc)
        assert set(range(record.spec.replicas)) <= set(holders), "every replica index is covered"
        for alloc in live:
            assert alloc.version == record.version and 0 <= alloc.replica < record.spec.replicas
            assert covers(alloc, after.nodes.get(alloc.node_id))
        assert len({a.replica for a in live}) == len(live), "at most one live allocation per index"
        if all(a.live for group in holders.values() for a in group):
            assert len(live) == record.spec.replicas
