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


def test_a_rollout_shows_on_the_row_of_the_deployment_its_edit_started_with_every_sites_wave():
    from meshd import waves
    from meshd.state import RolloutPlan, Wave
    state = two_versions()
    rows = deployments.deployment_rows(state, T0 + 5, "web")
    rows[0]["edit_id"] = "e2"  # the deployment of v2 was started by mesh edit e2
    plan = RolloutPlan(waves=(Wave(sites=("s1",)), Wave(sites=("far",))))
    view = waves.view("web", ("s1", "far"), plan, {"s1": waves.SiteWord("running", healthy=1, desired=2)}, [], T0)
    shown = deployments.with_rollout(rows, "web", "e2", 2, 1, view, "s1")
    assert len(shown) == len(rows) and shown[0]["state"] == "running" and shown[0]["rollout"]["waves_open"] == 1
    assert shown[0]["sites"]["s1"]["wave"] == 1 and shown[0]["sites"]["s1"]["reached"]
    assert shown[0]["sites"]["far"] == {"state": "pending", "wave": 2, "reached": False, "healthy": None,
                                        "desired": None, "canaries": None}
    # a site whose wave has not come holds the edit: the rollout gets a row of its own
    held = deployments.with_rollout(rows, "web", "e3", 3, 2, view, "far")
    assert held[0]["edit_id"] == "e3" and held[0]["version"] == 3 and held[0]["sites"]["far"]["state"] == "pending"
    assert held[1:] == rows


def test_a_sites_word_on_its_edit_is_its_deployments_outcome_or_reverted_once_it_returned():
    from meshd.commands import Envelope, Rollout, encode
    state = two_versions()
    record = state.apps["web"]
    state.apps["web"] = replace(record, edit_id="e2", deployments=record.deployments[:-1]
                                + (replace(record.deployments[-1], edit_id="e2"),))
    assert deployments.edit_outcome(state, state.apps["web"], T0)["state"] == "running"
    assert sitestate.apply(state, encode(Rollout(app="web", version=2, action="succeed", reason="ok"), Envelope(T0 + 2))).ok
    word = deployments.edit_outcome(state, state.apps["web"], T0 + 3)
    assert word["state"] == "succeeded" and word["ended_ts"] == T0 + 2
    assert sitestate.apply(state, encode(Rollout(app="web", version=2, action="abort", reason="stopped elsewhere"),
                                         Envelope(T0 + 4))).ok
    record = state.apps["web"]
    assert record.version == 1 and record.deployment.revert and record.deployment.from_version == 2
    word = deployments.edit_outcome(state, record, T0 + 5)
    assert word["state"] == "reverted" and word["ended_ts"] == T0 + 4
    again = sitestate.apply(state, encode(Rollout(app="web", version=2, action="abort"), Envelope(T0 + 6)))
    assert not again.ok and "is not the deployment the site runs" in again.text  # nothing twice
