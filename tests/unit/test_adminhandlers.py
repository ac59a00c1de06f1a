"""meshd.io.adminhandlers: what the admin answers derive from the state (no daemon)."""

from __future__ import annotations

from dataclasses import replace

from meshd import sitestate
from meshd.io.adminhandlers import not_running_reasons
from meshd.state import Alloc

from tests.unit.test_sitestate import cmd, founded

BIG = {"app": {"name": "big", "replicas": 3, "command": ["sleep", "100"]}}


def test_a_deploy_that_does_not_come_up_says_why_for_each_replica():
    state = founded(1)
    assert sitestate.apply(state, cmd("submit_app", spec=BIG, request_id="r1")).ok
    node = next(iter(state.nodes))
    version = state.apps["big"].version
    state.allocs["a0"] = Alloc(alloc_id="a0", app="big", version=version, replica=0, node_id=node, state="running")
    state.allocs["a1"] = Alloc(alloc_id="a1", app="big", version=version, replica=1, node_id=node,
                               state="failed", reason="exited 3", restarts=2, created_at=1.0)
    assert not_running_reasons(state, "big") == ["1 replica(s) not placed yet",
                                                 "replica 1 on n1 is failed: exited 3 (after 2 restarts)"]
    # replica 2 has nowhere to go once the only node drains
    state.nodes[node] = replace(state.nodes[node], admin="draining")
    reasons = not_running_reasons(state, "big")
    assert reasons[0].startswith("replica 1 on n1 is failed") and reasons[1].startswith("replica 2 cannot be placed: ")
    assert "drain" in reasons[1]
