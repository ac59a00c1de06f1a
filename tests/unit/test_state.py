"""meshd.state.AllocTable: the per-node, per-app and live-count indexes agree with a full recomputation
after any sequence of commands, and survive pickling and copying."""

from __future__ import annotations

import copy
import pickle
from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd import sitestate
from meshd.state import Alloc, AllocTable, SiteState, app_health

from tests.unit.test_sitestate import APP, T0, cmd, founded

NODES = [f"{i:032x}" for i in range(1, 4)]
APPS = ["web", "db"]


@st.composite
def commands(draw):
    op = draw(st.sampled_from(["submit_app", "apply_plan", "apply_plan", "heartbeat", "set_liveness", "stop_app"]))
    app = draw(st.sampled_from(APPS))
    node_id = draw(st.sampled_from(NODES))
    alloc_id = f"a{draw(st.integers(0, 30))}"
    ts = T0 + draw(st.integers(0, 1000))
    if op == "submit_app":
        return cmd(op, ts=ts, spec={"app": {"name": app, "replicas": draw(st.integers(1, 3)), "command": ["x"]}})
    if op == "apply_plan":
        stops = [[f"a{draw(st.integers(0, 30))}", "test"]] if draw(st.booleans()) else []
        return cmd(op, ts=ts, plan={"app": app, "version": draw(st.integers(1, 3)), "stops": stops, "placements": [
            {"alloc_id": alloc_id, "replica": draw(st.integers(0, 2)), "node_id": node_id}]})
    if op == "heartbeat":
        report = {"alloc_id": alloc_id, "state": draw(st.sampled_from(["running", "stopped", "failed"])),
                  "restarts": 0, "pid": None, "exit_code": 0, "reason": "",
                  "stopped_by_meshd": draw(st.booleans())}
        return cmd(op, ts=ts, node_id=node_id, seq=draw(st.integers(0, 99)), reports=[report])
    if op == "set_liveness":
        return cmd(op, ts=ts, node_id=node_id, liveness=draw(st.sampled_from(["ready", "down"])))
    return cmd(op, ts=ts, app=app)


def assert_indexes_agree(state: SiteState) -> None:
    table = state.allocs
    for node_id in {*NODES, *(a.node_id for a in table.values())}:
        assert table.on_node(node_id) == [a for a in table.values() if a.node_id == node_id]
    for app in {*APPS, *(a.app for a in table.values())}:
        assert table.of_app(app) == [a for a in table.values() if a.app == app]
    assert set(table._by_node) == {a.node_id for a in table.values()}  # no empty buckets left behind
    assert set(table._by_app) == {a.app for a in table.values()}
    for node_id in {*NODES, *(a.node_id for a in table.values())}:
        live = Counter(a.app for a in table.values() if a.node_id == node_id and a.live)
        assert dict(table.live_on(node_id)) == dict(live)
        assert table.live_count(node_id) == sum(live.values())
    assert set(table._live) == set(table._live_total) == {a.node_id for a in table.values() if a.live}
    assert set(table.apps()) == {a.app for a in table.values()}


@settings(max_examples=80, deadline=None)
@given(st.lists(commands(), max_size=60))
def test_indexes_agree_with_a_full_recomputation(sequence):
    state = founded(3)
    for command in sequence:
        before = {app: (state.allocs.app_stamp(app), state.allocs.of_app(app)) for app in APPS}
        sitestate.apply(state, command)
        assert_indexes_agree(state)
        for app, (stamp, allocs) in before.items():  # a stamp moves whenever the app's allocations do
            if state.allocs.of_app(app) != allocs:
                assert state.allocs.app_stamp(app) != stamp
    for again in (pickle.loads(pickle.dumps(state)), copy.deepcopy(state)):
        assert again.allocs == state.allocs
        assert_indexes_agree(again)
    copied = state.allocs.copy()
    copied["zz"] = Alloc(alloc_id="zz", app="web", version=1, replica=0, node_id=NODES[0])
    assert "zz" not in state.allocs and state.allocs.on_node(NODES[0]) == [
        a for a in state.allocs.values() if a.node_id == NODES[0]]


def test_an_allocation_never_moves_and_plain_mappings_are_indexed():
    alloc = Alloc(alloc_id="a", app="web", version=1, replica=0, node_id="n1")
    state = SiteState()
    state.allocs = {"a": alloc}  # any mapping assigned is indexed
    assert isinstance(state.allocs, AllocTable) and state.allocs.on_node("n1") == [alloc]
    with pytest.raises(ValueError, match="cannot move"):
        state.allocs["a"] = Alloc(alloc_id="a", app="web", version=1, replica=0, node_id="n2")
    assert state.allocs.pop("a") == alloc and state.allocs.on_node("n1") == [] and state.allocs.pop("b", None) is None
    with pytest.raises(TypeError):
        state.allocs.setdefault("a", alloc)


def test_a_snapshot_of_an_older_version_with_a_plain_dict_loads_indexed():
    alloc = Alloc(alloc_id="a", app="web", version=1, replica=0, node_id="n1")
    state = SiteState.__new__(SiteState)
    state.__setstate__({"site": "s1", "allocs": {"a": alloc}})
    assert state.allocs.of_app("web") == [alloc] and state.applied == 0


def test_an_app_is_running_degraded_failed_or_stopped():
    assert app_health(stopped=True, desired=0, running=0, failing=True) == "stopped"
    assert app_health(stopped=False, desired=3, running=3, failing=True) == "running"  # an old failure, replaced
    assert app_health(stopped=False, desired=3, running=1, failing=True) == "degraded"
    assert app_health(stopped=False, desired=3, running=0, failing=False) == "degraded"  # still starting
    assert app_health(stopped=False, desired=3, running=0, failing=True) == "failed"
    assert app_health(stopped=False, desired=0, running=0, failing=False) == "running"


def test_an_app_is_failing_when_an_allocation_of_its_version_failed_or_keeps_restarting():
    state = founded(1)
    assert sitestate.apply(state, cmd("submit_app", spec=APP, request_id="r1")).ok
    name, node = next(iter(state.apps)), next(iter(state.nodes))
    version = state.apps[name].version
    state.allocs["a1"] = Alloc(alloc_id="a1", app=name, version=version, replica=0, node_id=node, state="running")
    assert not state.failing(name)
    state.allocs["a1"] = replace(state.allocs["a1"], state="running", restarts=3)  # restarted, runs now
    assert not state.failing(name)
    state.allocs["a1"] = replace(state.allocs["a1"], state="pending", restarts=4)  # crash-looping
    assert state.failing(name)
    state.allocs["a1"] = replace(state.allocs["a1"], state="failed")
    assert state.failing(name)
    state.allocs["a1"] = replace(state.allocs["a1"], version=version - 1)  # an older version's failure
    assert not state.failing(name)
