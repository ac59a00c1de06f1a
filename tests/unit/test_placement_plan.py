from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.placement.feasible import Reserved, node_usage
from meshd.placement.plan import Filtered, Placement, Plan, make_plan, recheck_plan
from meshd.reconcile import reconcile
from meshd.state import (
    ADMIN_ACTIVE,
    ADMIN_DRAINING,
    ALLOC_PENDING,
    ALLOC_RUNNING,
    APP_STOPPED,
    DESIRED_RUN,
    DESIRED_STOP,
    LIVENESS_DOWN,
    LIVENESS_READY,
    Alloc,
    AppRecord,
    AppSpec,
    Constraints,
    NodeRecord,
    NodeResources,
    ResourceRequest,
    SiteState,
)

from tests.unit import placement_reference as reference

SITE = "factory-a"


def node(node_id, *, arch="x86_64", cpu=4.0, mem=4096, liveness=LIVENESS_READY, admin=ADMIN_ACTIVE,
         site=SITE) -> NodeRecord:
    return NodeRecord(node_id=node_id, name=f"dev-{node_id}", site=site, address="198.18.0.1:7700",
                      raft_address="198.18.0.1:7701", public_key="00", arch=arch, liveness=liveness, admin=admin,
                      resources=NodeResources(cpu_total=cpu, cpu_free=cpu, mem_total_mb=mem, mem_free_mb=mem,
                                              enforces=("cpu", "memory", "pids"), cgroup=2))


def spec(name="web", replicas=3, *, cpu=0.0, mem=0, arch=()) -> AppSpec:
    return AppSpec(name=name, replicas=replicas, command=("true",), constraints=Constraints(arch=arch),
                   resources=ResourceRequest(cpu=cpu, memory_mb=mem))


def state_of(nodes=(), apps=(), allocs=()) -> SiteState:
    state = SiteState(site=SITE)
    state.nodes = {n.node_id: n for n in nodes}
    state.apps = {a.spec.name: a for a in apps}
    state.allocs = {a.alloc_id: a for a in allocs}
    return state


def alloc(alloc_id, app="web", node_id="n1", *, version=1, replica=0, desired=DESIRED_RUN,
          state=ALLOC_RUNNING) -> Alloc:
    return Alloc(alloc_id=alloc_id, app=app, version=version, replica=replica, node_id=node_id,
                 desired=desired, state=state)


def ids(prefix="p"):
    counter = itertools.count()
    return lambda: f"{prefix}{next(counter)}"


def where(plan: Plan) -> dict[int, str]:
    return {p.replica: p.node_id for p in plan.placements}


# --- make_plan -----------------------------------------------------------------------
def test_spread_puts_one_replica_per_node():
    state = state_of([node("n1"), node("n2"), node("n3")])
    plan = make_plan(state, spec(), 1, range(3), ids())
    assert where(plan) == {0: "n1", 1: "n2", 2: "n3"}
    assert [p.alloc_id for p in plan.placements] == ["p0", "p1", "p2"]
    assert plan.filtered == () and plan.unplaced == ()


def test_spread_avoids_nodes_that_already_run_the_app():
    web = spec(replicas=3)
    state = state_of([node("n1"), node("n2"), node("n3")], [AppRecord(web, 1)],
                     [alloc("a0", node_id="n1", replica=0), alloc("a1", node_id="n2", replica=1)])
    plan = make_plan(state, web, 1, [2], ids())
    assert where(plan) == {2: "n3"}


def test_binpack_fills_one_node():
    state = state_of([node("n1"), node("n2")], [AppRecord(spec("db", 1), 1)],
                     [alloc("d0", app="db", node_id="n2")])
    plan = make_plan(state, spec(), 1, range(3), ids(), algorithm="binpack")
    assert where(plan) == {0: "n2", 1: "n2", 2: "n2"}


def test_capacity_limits_and_unplaced_reason():
    state = state_of([node("n1", cpu=1), node("n2", cpu=0.5, arch="aarch64")])
    plan = make_plan(state, spec(cpu=0.5, arch=("x86_64",)), 1, range(3), ids())
    assert where(plan) == {0: "n1", 1: "n1"}
    assert plan.unplaced == ((2, "no feasible node among 2 (arch 1, cpu 1); "
                                 "dev-n1: needs 0.5 cpu, 0 free of 1 reserved 1"),)
    # filtered shows the state as given: n1 was fine before this plan placed anything.
    assert plan.filtered == (Filtered("n2", "dev-n2", "arch aarch64 not in [x86_64]"),)


def test_filtered_lists_every_infeasible_node_sorted():
    state = state_of([node("n3", liveness=LIVENESS_DOWN), node("n1", admin=ADMIN_DRAINING), node("n2"),
                      node("n4", site="factory-b")])
    plan = make_plan(state, spec(replicas=1), 1, [0], ids())
    assert plan.filtered == (
        Filtered("n1", "dev-n1", "node is draining"),
        Filtered("n3", "dev-n3", "node is down"),
        Filtered("n4", "dev-n4", "site factory-b not in app sites [factory-a]"),
    )
    assert where(plan) == {0: "n2"}


def test_no_nodes():
    plan = make_plan(state_of(), spec(replicas=1), 1, [0], ids())
    assert plan.unplaced == ((0, "no nodes in site factory-a"),)


def test_dry_run_of_an_app_not_in_state():
    state = state_of([node("n1")])
    plan = make_plan(state, spec("new", 2), 1, range(2), ids())
    assert where(plan) == {0: "n1", 1: "n1"}
    assert "new" not in state.apps and state.allocs == {}  # the state is not touched


def test_stops_free_resources_for_the_replacement():
    web = spec(replicas=1, cpu=2)
    state = state_of([node("n1", cpu=2)], [AppRecord(web, 2)], [alloc("a0", version=1)])
    plan = make_plan(state, web, 2, [0], ids())
    assert plan.unplaced and plan.filtered[0].reason == "needs 2 cpu, 0 free of 2 reserved 2"
    plan = make_plan(state, web, 2, [0], ids(), stops=[("a0", "replaced by version 2")])
    assert where(plan) == {0: "n1"} and plan.filtered == ()
    assert plan.stops == (("a0", "replaced by version 2"),)


def test_replicas_are_placed_in_index_order_once():
    plan = make_plan(state_of([node("n1")]), spec(), 1, [2, 0, 2], ids())
    assert [p.replica for p in plan.placements] == [0, 2]


def test_unknown_algorithm():
    with pytest.raises(ValueError, match="unknown placement algorithm"):
        make_plan(state_of([node("n1")]), spec(), 1, [0], ids(), algorithm="random")


def test_to_plain_follows_the_contract_and_round_trips():
    state = state_of([node("n1"), node("n2", arch="aarch64")])
    plan = make_plan(state, spec(replicas=1, arch=("x86_64",)), 4, [0], ids(), stops=[("old", "scaled down")])
    plain = json.loads(json.dumps(plan.to_plain()))
    assert plain == {
        "app": "web",
        "version": 4,
        "placements": [{"node": "dev-n1", "node_id": "n1", "replica": 0, "alloc_id": "p0", "version": 4}],
        "filtered": [{"node": "dev-n2", "node_id": "n2", "reason": "arch aarch64 not in [x86_64]"}],
        "stops": [["old", "scaled down"]],
        "unplaced": [],
    }
    assert Plan.from_plain(plain) == plan


# --- recheck_plan --------------------------------------------------------------------
def base_state() -> SiteState:
    return state_of([node("n1", cpu=1), node("n2", cpu=1)], [AppRecord(spec(replicas=2, cpu=0.5), 3)])


def P(alloc_id="p0", replica=0, node_id="n1", version=3, app="web") -> Placement:
    return Placement(alloc_id=alloc_id, app=app, version=version, replica=replica, node_id=node_id)


def plan_of(*placements, stops=()) -> Plan:
    return Plan(app="web", version=3, placements=tuple(placements), stops=tuple(stops), filtered=(), unplaced=())


def test_recheck_accepts_a_valid_plan():
    plan = plan_of(P("p0", 0, "n1"), P("p1", 1, "n2"))
    assert recheck_plan(base_state(), plan) == (list(plan.placements), [])


def without_app(state):
    state.apps.clear()


def stop_app(state):
    state.apps["web"] = dataclasses.replace(state.apps["web"], status=APP_STOPPED)


def bump_version(state):
    state.apps["web"] = dataclasses.replace(state.apps["web"], version=4)


def scale_down(state):
    state.apps["web"] = dataclasses.replace(state.apps["web"], spec=spec(replicas=0, cpu=0.5))


def node_down(state):
    state.nodes["n1"] = dataclasses.replace(state.nodes["n1"], liveness=LIVENESS_DOWN)


def node_gone(state):
    del state.nodes["n1"]


def node_full(state):
    state.apps["db"] = AppRecord(spec("db", 1, cpu=0.75), 1)
    state.allocs["d0"] = alloc("d0", app="db")


def already_covered(state):
    state.allocs["x0"] = alloc("x0", version=3, node_id="n2", state=ALLOC_PENDING)


def alloc_id_taken(state):
    state.allocs["p0"] = alloc("p0", app="other")


@pytest.mark.parametrize(
    "change,reason",
    [
        (without_app, "app web no longer exists"),
        (stop_app, "app web is stopped"),
        (bump_version, "version 3 of app web superseded by version 4"),
        (scale_down, "replica 0 out of range, app web has 0 replicas"),
        (node_down, "node dev-n1: node is down"),
        (node_gone, "node n1 no longer in site"),
        (node_full, "node dev-n1: needs 0.5 cpu, 0.25 free of 1 reserved 0.75"),
        (already_covered, "replica 0 of web version 3 already covered by alloc x0"),
        (alloc_id_taken, "alloc p0 already exists"),
    ],
)
def test_recheck_refuses(change, reason):
    state = base_state()
    change(state)
    placement = P("p0", 0, "n1")
    assert recheck_plan(state, plan_of(placement)) == ([], [(placement, reason)])


def test_recheck_counts_placements_accepted_earlier_in_the_plan():
    first, second, third = P("p0", 0, "n1"), P("p1", 1, "n1"), P("p2", 1, "n2")
    state = base_state()
    state.apps["web"] = dataclasses.replace(state.apps["web"], spec=spec(replicas=2, cpu=0.75))
    accepted, refused = recheck_plan(state, plan_of(first, second, third))
    assert accepted == [first, third]
    assert refused == [(second, "node dev-n1: needs 0.75 cpu, 0.25 free of 1 reserved 0.75")]


def test_recheck_refuses_the_same_replica_twice_in_one_plan():
    first, again = P("p0", 0, "n1"), P("p1", 0, "n2")
    assert recheck_plan(base_state(), plan_of(first, again)) == ([first], [(again, "replica 0 placed twice in one plan")])


def test_recheck_frees_what_the_plan_stops():
    state = base_state()
    state.apps["web"] = dataclasses.replace(state.apps["web"], spec=spec(replicas=2, cpu=1))
    state.allocs["x0"] = alloc("x0", version=2, node_id="n1")  # priced at the current spec: fills n1
    placement = P("p0", 0, "n1")
    assert recheck_plan(state, plan_of(placement)) == (
        [], [(placement, "node dev-n1: needs 1 cpu, 0 free of 1 reserved 1")])
    assert recheck_plan(state, plan_of(placement, stops=[("x0", "replaced by version 3")])) == ([placement], [])


@pytest.mark.parametrize(
    "holder_admin,stops,accepted",
    [
        (ADMIN_ACTIVE, [], False),  # a live replica holds index 0: a duplicate
        (ADMIN_ACTIVE, [("x0", "duplicate replica")], True),  # the plan stops that holder
        (ADMIN_DRAINING, [], True),  # on a draining node it no longer holds the index
    ],
)
def test_recheck_duplicates_follow_reconcile_coverage(holder_admin, stops, accepted):
    state = base_state()
    state.nodes["n2"] = dataclasses.replace(state.nodes["n2"], admin=holder_admin)
    state.allocs["x0"] = alloc("x0", version=3, node_id="n2")
    placement = P("p0", 0, "n1")
    assert recheck_plan(state, plan_of(placement, stops=stops))[0] == ([placement] if accepted else [])


def test_a_retried_plan_places_nothing_twice():
    state = base_state()
    plan = make_plan(state, state.apps["web"].spec, 3, [0, 1], ids())
    accepted, refused = recheck_plan(state, plan)
    assert len(accepted) == 2 and refused == []
    for p in accepted:
        state.allocs[p.alloc_id] = alloc(p.alloc_id, version=p.version, replica=p.replica, node_id=p.node_id,
                                         state=ALLOC_PENDING)
    accepted, refused = recheck_plan(state, plan)
    assert accepted == [] and [r for _, r in refused] == ["alloc p0 already exists", "alloc p1 already exists"]
    # The same decision planned again under new ids is refused as already covered.
    again = plan_of(P("q0", 0, "n2"), P("q1", 1, "n1"))
    accepted, refused = recheck_plan(state, again)
    assert accepted == [] and [r for _, r in refused] == [
        "replica 0 of web version 3 already covered by alloc p0",
        "replica 1 of web version 3 already covered by alloc p1",
    ]


# --- property: a plan made and applied on the same state is accepted in full -----------
@st.composite
def sites(draw) -> SiteState:
    nodes = [node(f"n{i}", cpu=draw(st.sampled_from([0.5, 1.0, 2.0])), mem=draw(st.sampled_from([128, 512, 1024])),
                  arch=draw(st.sampled_from(["x86_64", "aarch64"])),
                  liveness=draw(st.sampled_from([LIVENESS_READY, LIVENESS_READY, LIVENESS_DOWN])),
                  admin=draw(st.sampled_from([ADMIN_ACTIVE, ADMIN_ACTIVE, ADMIN_DRAINING])))
             for i in range(draw(st.integers(0, 4)))]
    apps = [AppRecord(spec(name, draw(st.integers(0, 4)), cpu=draw(st.sampled_from([0.0, 0.25, 0.5])),
                           mem=draw(st.sampled_from([0, 64, 256])),
                           arch=draw(st.sampled_from([(), ("x86_64",)]))),
                      draw(st.integers(1, 2)))
            for name in draw(st.lists(st.sampled_from(["web", "db", "cache"]), unique=True))]
    state = state_of(nodes, apps)
    names = [a.spec.name for a in apps]
    if nodes and names:
        for i in range(draw(st.integers(0, 6))):
            state.allocs[f"x{i}"] = alloc(
                f"x{i}", app=draw(st.sampled_from(names)), node_id=draw(st.sampled_from(sorted(state.nodes))),
                version=draw(st.integers(1, 2)), replica=draw(st.integers(0, 3)),
                desired=draw(st.sampled_from([DESIRED_RUN, DESIRED_STOP])))
    return state


@settings(max_examples=200, deadline=None)
@given(state=sites(), algorithm=st.sampled_from(["spread", "binpack"]))
def test_plans_from_reconcile_are_accepted_and_never_overcommit(state, algorithm):
    todo = reconcile(state)
    new_id = ids("new")
    for app in sorted(state.apps):
        record = state.apps[app]
        plan = make_plan(state, record.spec, record.version, todo.place.get(app, ()), new_id,
                         stops=todo.stops_for(app, state), algorithm=algorithm)
        accepted, refused = recheck_plan(state, plan)
        assert refused == [] and accepted == list(plan.placements)
        assert len(plan.placements) + len(plan.unplaced) == len(todo.place.get(app, ()))
        # Apply it like the site does, then check no node took more than it had room for.
        usage_before = {n: node_usage(n, state, Reserved(released=[a for a, _ in plan.stops])) for n in state.nodes}
        for alloc_id, _ in plan.stops:
            state.allocs[alloc_id] = dataclasses.replace(state.allocs[alloc_id], desired=DESIRED_STOP)
        for p in accepted:
            state.allocs[p.alloc_id] = alloc(p.alloc_id, app=p.app, version=p.version, replica=p.replica,
                                             node_id=p.node_id, state=ALLOC_PENDING)
        for node_id, n in state.nodes.items():
            after = node_usage(node_id, state, Reserved())
            if after.cpu > usage_before[node_id].cpu:
                assert after.cpu <= n.resources.cpu_total + 1e-9
            if after.mem_mb > usage_before[node_id].mem_mb:
                assert after.mem_mb <= n.resources.mem_total_mb


@settings(max_examples=300, deadline=None)
@given(state=sites(), algorithm=st.sampled_from(["spread", "binpack"]), extra=st.integers(0, 6))
def test_the_planner_chooses_what_weighing_every_node_for_every_replica_chooses(state, algorithm, extra):
    """The heap of feasible nodes and the table's live counts give exactly the placements of
    the obvious planner (tests/unit/placement_reference.py), which sums every allocation."""
    todo = reconcile(state)
    for app in sorted(state.apps):
        record = state.apps[app]
        replicas = tuple(todo.place.get(app, ())) + tuple(range(record.spec.replicas, record.spec.replicas + extra))
        stops = todo.stops_for(app, state)
        plan = make_plan(state, record.spec, record.version, replicas, ids("a"), stops=stops, algorithm=algorithm)
        placements, filtered, unplaced = reference.make_plan(state, record.spec, record.version, replicas,
                                                             ids("a"), stops=stops, algorithm=algorithm)
        assert list(plan.placements) == placements
        assert [f.node_id for f in plan.filtered] == filtered
        assert [r for r, _ in plan.unplaced] == unplaced
        reserved = Reserved(released=[a for a, _ in stops])
        for n in state.nodes.values():
            u = node_usage(n.node_id, state, reserved, app)
            assert (u.cpu, u.mem_mb, u.allocs, u.app_allocs) == pytest.approx(reference.usage(n, state, reserved, app))
