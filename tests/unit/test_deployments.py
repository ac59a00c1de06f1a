"""meshd.deployments: what `deployments`, `history`, `rollback` and `deploy --wait` read."""

from __future__ import annotations

from dataclasses import replace

from meshd import deployments, sitestate
from tests.unit.test_sitestate import T0, _submit, cmd, founded, plan_cmd


def two_versions():
    state = founded(1)
    _submit(state, "1")
    sitestate.apply(state, cmd("rollout", app="web", version=1, action="succeed", reason="ok"))
    _submit(state, "2", ts=T0 + 1)
    return state


def test_a_deployment_row_gives_this_sites_part_and_pending_for_sites_not_heard_from():
    state = two_versions()
    record = state.apps["web"]
    state.apps["web"] = replace(record, spec=replace(record.spec, sites=("s1", "far")))
    (n1,) = state.nodes
    sitestate.apply(state, plan_cmd([{"alloc_id": "x0", "replica": 0, "node_id": n1}], version=2))
    rows = deployments.deployment_rows(state, T0 + 5, "web")
    assert [(r["version"], r["from_version"], r["state"]) for r in rows] == [(2, 1, "running"), (1, 0, "succeeded")]
    assert rows[0]["sites"]["s1"]["state"] == "running" and rows[0]["sites"]["s1"]["desired"] == 2
    assert rows[0]["sites"]["s1"]["healthy"] == 0  # placed, not running yet
    assert rows[0]["sites"]["far"]["state"] == "pending"  # never `failed` for want of news


def test_history_rows_are_newest_first_and_mark_the_current_version():
    rows = deployments.history_rows(two_versions().apps["web"])
    assert [(r["version"], r["state"], r["current"]) for r in rows] == [(2, "running", True), (1, "stable", False)]
    assert rows[0]["spec_digest"].startswith("sha256:") and rows[0]["by"] == "op"


def test_rollback_goes_to_the_newest_stable_version_or_the_one_named():
    record = two_versions().apps["web"]
    assert deployments.rollback_target(record, None) == (1, "")
    assert deployments.rollback_target(record, 1) == (1, "")
    assert deployments.rollback_target(record, 2) == (None, "web runs v2 already")
    target, why = deployments.rollback_target(record, 7)
    assert target is None and "has no version 7" in why


def test_rollback_without_an_earlier_version_says_so():
    state = founded(1)
    _submit(state, "1")
    assert deployments.rollback_target(state.apps["web"], None) == (None, "web has no earlier version in its history")


def test_a_wait_ends_on_success_and_fails_on_a_revert_or_a_replacing_deploy():
    state = two_versions()
    assert deployments.wait_outcome(state.apps["web"], 2) == deployments.Outcome(False)
    assert deployments.wait_outcome(state.apps["web"], 1) == deployments.Outcome(True)
    sitestate.apply(state, cmd("rollout", ts=T0 + 2, app="web", version=2, action="fail", reason="replica 0 failed"))
    outcome = deployments.wait_outcome(state.apps["web"], 2)
    assert outcome.done and outcome.error == "v2 failed and was reverted to v1: replica 0 failed"
    _submit(state, "3", ts=T0 + 3)
    _submit(state, "4", ts=T0 + 4)
    assert "cancelled: replaced by version 4" in deployments.wait_outcome(state.apps["web"], 3).error
