from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.placement.feasible import (
    CHECKERS,
    Reserved,
    check_cpu,
    check_memory,
    check_node,
    failing_check,
    free_mem_mb,
    node_usage,
)
from meshd.state import (
    ADMIN_ACTIVE,
    ADMIN_DRAINING,
    ADMIN_LEFT,
    ADMIN_REVOKED,
    ALLOC_FAILED,
    ALLOC_LOST,
    ALLOC_PENDING,
    ALLOC_RUNNING,
    ALLOC_STOPPED,
    DESIRED_RUN,
    DESIRED_STOP,
    LIVENESS_DOWN,
    LIVENESS_JOINING,
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

SITE = "factory-a"


def make_node(node_id="n1", *, site=SITE, arch="x86_64", labels=None, liveness=LIVENESS_READY,
              admin=ADMIN_ACTIVE, cpu=4.0, mem=1024, mem_free=None, enforces=("cpu", "memory", "pids")) -> NodeRecord:
    return NodeRecord(
        node_id=node_id, name=f"name-{node_id}", site=site, address="198.18.0.1:7700",
        raft_address="198.18.0.1:7701", public_key="00", arch=arch, labels=labels or {},
        liveness=liveness, admin=admin,
        resources=NodeResources(cpu_total=cpu, cpu_free=cpu, mem_total_mb=mem,
                                mem_free_mb=mem if mem_free is None else mem_free, enforces=enforces,
                                cgroup=2 if enforces else 0),
    )


def make_spec(name="app", *, cpu=0.0, mem=0, arch=(), labels=None, sites=(), pids=0) -> AppSpec:
    return AppSpec(name=name, replicas=1, command=("true",), sites=sites,
                   constraints=Constraints(arch=arch, labels=labels or {}),
                   resources=ResourceRequest(cpu=cpu, memory_mb=mem, pids=pids))


def make_state(nodes=(), apps=(), allocs=()) -> SiteState:
    state = SiteState(site=SITE)
    state.nodes = {n.node_id: n for n in nodes}
    state.apps = {a.name: AppRecord(spec=a, version=1) for a in apps}
    state.allocs = {a.alloc_id: a for a in allocs}
    return state


def alloc(alloc_id, app, node_id="n1", *, desired=DESIRED_RUN, state=ALLOC_RUNNING, replica=0) -> Alloc:
    return Alloc(alloc_id=alloc_id, app=app, version=1, replica=replica, node_id=node_id,
                 desired=desired, state=state)


OTHER_CPU = make_spec("other", cpu=3.75)
OTHER_MEM = make_spec("other", mem=992)

CASES = [
    # (id, node, spec, other apps, allocs, expected)
    ("fits", make_node(), make_spec(cpu=1, mem=64), (), (), None),
    ("down", make_node(liveness=LIVENESS_DOWN), make_spec(), (), (), "node is down"),
    ("joining", make_node(liveness=LIVENESS_JOINING), make_spec(), (), (), "node is joining"),
    ("draining", make_node(admin=ADMIN_DRAINING), make_spec(), (), (), "node is draining"),
    ("left", make_node(admin=ADMIN_LEFT), make_spec(), (), (), "node is left"),
    ("revoked", make_node(admin=ADMIN_REVOKED), make_spec(), (), (), "node is revoked"),
    ("site listed", make_node(site="factory-b"), make_spec(sites=("factory-a",)), (), (),
     "site factory-b not in app sites [factory-a]"),
    ("site listed ok", make_node(site="factory-b"), make_spec(sites=("factory-a", "factory-b")), (), (), None),
    ("site default", make_node(site="factory-b"), make_spec(), (), (),
     "site factory-b not in app sites [factory-a]"),
    ("arch", make_node(arch="aarch64"), make_spec(arch=("x86_64",)), (), (), "arch aarch64 not in [x86_64]"),
    ("arch many", make_node(arch="riscv64"), make_spec(arch=("x86_64", "aarch64")), (), (),
     "arch riscv64 not in [x86_64, aarch64]"),
    ("arch unknown", make_node(arch=""), make_spec(arch=("x86_64",)), (), (), "arch unknown not in [x86_64]"),
    ("arch ok", make_node(arch="aarch64"), make_spec(arch=("x86_64", "aarch64")), (), (), None),
    ("label differs", make_node(labels={"line": "2"}), make_spec(labels={"line": "1"}), (), (),
     "label line=2, want line=1"),
    ("label missing", make_node(), make_spec(labels={"line": "1"}), (), (), "label line missing, want line=1"),
    ("labels first sorted key", make_node(labels={"a": "x", "b": "x"}), make_spec(labels={"b": "y", "a": "y"}),
     (), (), "label a=x, want a=y"),
    ("labels extra on node ok", make_node(labels={"line": "1", "zone": "z"}), make_spec(labels={"line": "1"}),
     (), (), None),
    ("cpu", make_node(cpu=4), make_spec(cpu=0.5), (OTHER_CPU,), (alloc("a1", "other"),),
     "needs 0.5 cpu, 0.25 free of 4 reserved 3.75"),
    ("cpu exact fit", make_node(cpu=4), make_spec(cpu=0.25), (OTHER_CPU,), (alloc("a1", "other"),), None),
    ("cpu float noise", make_node(cpu=0.6), make_spec(cpu=0.3),
     (make_spec("p", cpu=0.1), make_spec("q", cpu=0.2)), (alloc("a1", "p"), alloc("a2", "q")), None),
    ("memory reserved", make_node(mem=1024), make_spec(mem=64), (OTHER_MEM,), (alloc("a1", "other"),),
     "needs 64 MB memory, 32 free of 1024 reserved 992"),
    ("memory measured", make_node(mem=1024, mem_free=32), make_spec(mem=64), (), (),
     "needs 64 MB memory, node measures 32 MB free"),
    ("memory exact fit", make_node(mem=1024), make_spec(mem=32), (OTHER_MEM,), (alloc("a1", "other"),), None),
    ("zero request on empty node", make_node(cpu=0, mem=0), make_spec(), (), (), None),
    ("failed alloc reserves nothing", make_node(cpu=4), make_spec(cpu=0.5), (OTHER_CPU,),
     (alloc("a1", "other", state=ALLOC_FAILED),), None),
    ("lost alloc reserves nothing", make_node(cpu=4), make_spec(cpu=0.5), (OTHER_CPU,),
     (alloc("a1", "other", state=ALLOC_LOST),), None),
    ("stopping alloc reserves nothing", make_node(cpu=4), make_spec(cpu=0.5), (OTHER_CPU,),
     (alloc("a1", "other", desired=DESIRED_STOP),), None),
    ("pending alloc reserves", make_node(cpu=4), make_spec(cpu=0.5), (OTHER_CPU,),
     (alloc("a1", "other", state=ALLOC_PENDING),), "needs 0.5 cpu, 0.25 free of 4 reserved 3.75"),
    ("alloc elsewhere reserves nothing here", make_node(cpu=4), make_spec(cpu=0.5), (OTHER_CPU,),
     (alloc("a1", "other", node_id="n2"),), None),
    ("alloc of removed app has no price", make_node(cpu=4), make_spec(cpu=0.5), (),
     (alloc("a1", "gone"),), None),
    ("first failing checker wins", make_node(liveness=LIVENESS_DOWN, arch="aarch64"),
     make_spec(arch=("x86_64",)), (), (), "node is down"),
    ("arch before cpu", make_node(arch="aarch64", cpu=0), make_spec(arch=("x86_64",), cpu=1), (), (),
     "arch aarch64 not in [x86_64]"),
]


@pytest.mark.parametrize("node,spec,apps,allocs,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_check_node(node, spec, apps, allocs, expected):
    state = make_state([node], apps, allocs)
    assert check_node(node, spec, state, Reserved()) == expected


def test_reservation_uses_current_spec_of_the_app():
    old = alloc("a1", "other")
    state = make_state([make_node(cpu=4)], [make_spec("other", cpu=1)], [old])
    spec = make_spec(cpu=3)
    assert check_node(state.nodes["n1"], spec, state, Reserved()) is None
    state.apps["other"] = AppRecord(spec=make_spec("other", cpu=2), version=2)
    assert check_node(state.nodes["n1"], spec, state, Reserved()) == "needs 3 cpu, 2 free of 4 reserved 2"


@pytest.mark.parametrize(
    "added,expected",
    [
        ([], None),
        ([0.5], None),
        ([0.5, 0.5], None),
        ([0.5, 0.5, 0.5], "needs 0.5 cpu, 0.25 free of 2 reserved 1.75"),
    ],
)
def test_plan_in_progress_counts(added, expected):
    state = make_state([make_node(cpu=2)], [make_spec("other", cpu=0.25)], [alloc("a1", "other")])
    reserved = Reserved()
    for cpu in added:
        reserved.add("n1", "app", ResourceRequest(cpu=cpu))
    assert check_node(state.nodes["n1"], make_spec(cpu=0.5), state, reserved) == expected


def test_released_allocations_free_their_resources():
    state = make_state([make_node(cpu=4)], [OTHER_CPU], [alloc("a1", "other")])
    spec = make_spec(cpu=1)
    assert check_node(state.nodes["n1"], spec, state, Reserved()) is not None
    assert check_node(state.nodes["n1"], spec, state, Reserved(released=["a1"])) is None


def test_measured_memory_counts_what_the_plan_already_put_there():
    node = make_node(mem=1024, mem_free=100)
    state = make_state([node])
    reserved = Reserved()
    assert check_node(node, make_spec(mem=64), state, reserved) is None
    reserved.add("n1", "app", ResourceRequest(memory_mb=64))
    assert check_node(node, make_spec(mem=64), state, reserved) == (
        "needs 64 MB memory, node measures 100 MB free, 64 MB of it taken by this plan")


def test_node_usage_counts_allocs_of_the_app_and_the_plan():
    state = make_state(
        [make_node()], [make_spec("app", mem=10), make_spec("other", mem=20)],
        [alloc("a1", "app"), alloc("a2", "other"), alloc("a3", "app", state=ALLOC_STOPPED)],
    )
    reserved = Reserved()
    reserved.add("n1", "app", ResourceRequest(memory_mb=10))
    usage = node_usage("n1", state, reserved, "app")
    assert (usage.allocs, usage.app_allocs, usage.mem_mb, usage.planned_mem_mb) == (3, 2, 40, 10)
    assert free_mem_mb(state.nodes["n1"], usage) == 1024 - 40


def test_checker_order_is_fixed():
    assert [name for name, _ in CHECKERS] == ["schedulable", "site", "arch", "labels", "limits", "devices", "cpu", "memory"]


# --- properties ----------------------------------------------------------------------
node_strategy = st.builds(
    make_node,
    liveness=st.sampled_from([LIVENESS_READY, LIVENESS_DOWN, LIVENESS_JOINING]),
    admin=st.sampled_from([ADMIN_ACTIVE, ADMIN_DRAINING]),
    arch=st.sampled_from(["x86_64", "aarch64"]),
    labels=st.dictionaries(st.sampled_from(["line", "zone"]), st.sampled_from(["1", "2"]), max_size=2),
    cpu=st.sampled_from([0.0, 0.5, 1.0, 2.0, 4.0]),
    mem=st.integers(0, 2048),
    mem_free=st.integers(0, 2048),
)
spec_strategy = st.builds(
    make_spec,
    cpu=st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0]),
    mem=st.integers(0, 512),
    arch=st.sampled_from([(), ("x86_64",), ("aarch64", "x86_64")]),
    labels=st.dictionaries(st.sampled_from(["line", "zone"]), st.sampled_from(["1", "2"]), max_size=2),
)
requests = st.lists(st.tuples(st.sampled_from([0.0, 0.25, 0.5]), st.integers(0, 256)), max_size=6)


@settings(max_examples=200, deadline=None)
@given(node=node_strategy, spec=spec_strategy, placed=requests, more=requests)
def test_more_reservations_never_make_a_node_feasible(node, spec, placed, more):
    state = make_state([node], [spec])
    reserved = Reserved()
    for cpu, mem in placed:
        reserved.add(node.node_id, "x", ResourceRequest(cpu=cpu, memory_mb=mem))
    before = check_node(node, spec, state, reserved)
    for cpu, mem in more:
        reserved.add(node.node_id, "x", ResourceRequest(cpu=cpu, memory_mb=mem))
    after = check_node(node, spec, state, reserved)
    if before is not None:
        assert after is not None


@settings(max_examples=200, deadline=None)
@given(node=node_strategy, spec=spec_strategy, placed=requests)
def test_check_node_is_the_first_failing_checker(node, spec, placed):
    state = make_state([node], [spec])
    reserved = Reserved()
    for cpu, mem in placed:
        reserved.add(node.node_id, "x", ResourceRequest(cpu=cpu, memory_mb=mem))
    reasons = [checker(node, spec, state, reserved) for _, checker in CHECKERS]
    first = next((r for r in reasons if r is not None), None)
    assert check_node(node, spec, state, reserved) == first
    failure = failing_check(node, spec, state, reserved)
    assert (failure is None) == (first is None)
    for reason in reasons:
        assert reason is None or (reason and "\n" not in reason)


@settings(max_examples=200, deadline=None)
@given(node=node_strategy, placed=requests)
def test_a_zero_request_always_fits(node, placed):
    spec = make_spec()
    state = make_state([node], [spec])
    reserved = Reserved()
    for cpu, mem in placed:
        reserved.add(node.node_id, "x", ResourceRequest(cpu=cpu + 100, memory_mb=mem + 10_000))
    assert check_cpu(node, spec, state, reserved) is None
    assert check_memory(node, spec, state, reserved) is None


@settings(max_examples=200, deadline=None)
@given(node=node_strategy, spec=spec_strategy, placed=requests)
def test_capacity_matches_the_arithmetic(node, spec, placed):
    node = dataclasses.replace(node, liveness=LIVENESS_READY, admin=ADMIN_ACTIVE)
    state = make_state([node], [spec])
    reserved = Reserved()
    for cpu, mem in placed:
        reserved.add(node.node_id, "x", ResourceRequest(cpu=cpu, memory_mb=mem))
    cpu_used = sum(c for c, _ in placed)
    mem_used = sum(m for _, m in placed)
    cpu_ok = spec.resources.cpu == 0 or spec.resources.cpu <= node.resources.cpu_total - cpu_used + 1e-9
    mem_ok = spec.resources.memory_mb == 0 or spec.resources.memory_mb <= min(
        node.resources.mem_total_mb - mem_used, node.resources.mem_free_mb - mem_used)
    assert (check_cpu(node, spec, state, reserved) is None) == cpu_ok
    assert (check_memory(node, spec, state, reserved) is None) == mem_ok


@pytest.mark.parametrize("enforces,spec,reason", [
    ((), make_spec(cpu=0.5), "cannot enforce cpu limits (no cgroups)"),
    (("cpu",), make_spec(cpu=0.5, mem=64, pids=10), "cannot enforce memory, pids limits (cgroup v2 without them)"),
    (("cpu", "memory"), make_spec(pids=10), "cannot enforce pids limits (cgroup v2 without them)"),
    (("cpu", "memory", "pids"), make_spec(cpu=0.5, mem=64, pids=10), None),
    ((), make_spec(), None),  # an app without limits runs anywhere
])
def test_an_app_is_placed_only_where_its_limits_are_enforced(enforces, spec, reason):
    node = make_node("n1", enforces=enforces)
    state = make_state([node], [spec])
    assert check_node(node, spec, state, Reserved()) == reason
    if reason:
        assert failing_check(node, spec, state, Reserved())[0] == "limits"


def test_what_a_node_keeps_for_meshd_is_never_placed_on():
    node = dataclasses.replace(make_node("n1", cpu=2.0, mem=1024), resources=dataclasses.replace(
        make_node("n1", cpu=2.0, mem=1024).resources, reserved_cpu=0.5, reserved_mem_mb=128))
    fits = make_spec(cpu=1.5, mem=896)
    state = make_state([node], [fits])
    assert check_node(node, fits, state, Reserved()) is None
    cpu = make_spec(cpu=1.6)
    assert check_node(node, cpu, make_state([node], [cpu]), Reserved()) == \
        "needs 1.6 cpu, 1.5 free of 2 reserved 0, 0.5 kept for meshd"
    mem = make_spec(mem=900)
    assert check_node(node, mem, make_state([node], [mem]), Reserved()) == \
        "needs 900 MB memory, 896 free of 1024 reserved 0, 128 MB kept for meshd"


def test_an_app_needing_devices_goes_only_where_enough_are_free():
    from meshd.state import Alloc

    base = make_node("n1")
    with_two = dataclasses.replace(base, resources=dataclasses.replace(base.resources, devices=(("gpu", 2),)))
    plain = make_node("n2")
    gpu_app = dataclasses.replace(make_spec("vision"), resources=ResourceRequest(devices=(("gpu", 1),)))
    state = make_state([with_two, plain], [gpu_app])
    assert check_node(plain, gpu_app, state, Reserved()) == "no gpu device on this node"
    assert check_node(with_two, gpu_app, state, Reserved()) is None
    state.allocs = {f"a{i}": Alloc(alloc_id=f"a{i}", app="vision", version=1, replica=i, node_id="n1")
                    for i in range(2)}  # both held
    assert check_node(with_two, gpu_app, state, Reserved()) == "needs 1 gpu, 0 free of 2"
    state.allocs = {"a0": Alloc(alloc_id="a0", app="vision", version=1, replica=0, node_id="n1")}
    reserved = Reserved()
    assert check_node(with_two, gpu_app, state, reserved) is None
    reserved.add("n1", "vision", gpu_app.resources)  # the plan in progress takes the second
    assert check_node(with_two, gpu_app, state, reserved) == "needs 1 gpu, 0 free of 2"
    assert failing_check(with_two, gpu_app, state, reserved)[0] == "devices"
