"""meshd.rollout: the pace of a change of spec and a deployment's verdicts, on hand-built
states (the transcripts in tests/harness/testdata/rollout_*.txt drive it through a site)."""

from __future__ import annotations

from dataclasses import replace

from meshd import rollout
from meshd.state import (
    ALLOC_FAILED,
    ALLOC_PENDING,
    ALLOC_RUNNING,
    DEPLOY_AWAITING,
    DEPLOY_PAUSED,
    DEPLOY_RUNNING,
    HEALTH_CHECKING,
    HEALTH_HEALTHY,
    HEALTH_UNHEALTHY,
    Alloc,
    AppRecord,
    AppSpec,
    Deployment,
    SiteState,
    UpdatePolicy,
)

T = 1000.0


def record(replicas=4, version=2, deployment=None, **policy) -> AppRecord:
    spec = AppSpec(name="web", replicas=replicas, command=("true",),
                   update=UpdatePolicy(**{"min_healthy_s": 5.0, "healthy_deadline_s": 30.0,
                                          "progress_deadline_s": 60.0, **policy}))
    d = deployment or Deployment(version=version, from_version=version - 1, started_at=T, moved_at=T,
                                 canary=spec.update.canary, promoted=spec.update.canary == 0)
    return AppRecord(spec=spec, version=version, deployments=(d,), latest_version=version)


def alloc(alloc_id, replica, version, state=ALLOC_RUNNING, health=HEALTH_HEALTHY, healthy_at=T, created_at=T,
          **extra) -> Alloc:
    return Alloc(alloc_id=alloc_id, app="web", version=version, replica=replica, node_id="n1", state=state,
                 health=health, healthy_at=healthy_at if health == HEALTH_HEALTHY and state == ALLOC_RUNNING else 0.0,
                 created_at=created_at, unhealthy_since=created_at, **extra)


def site(rec: AppRecord, *allocs: Alloc) -> SiteState:
    state = SiteState(site="s")
    state.apps = {"web": rec}
    state.allocs = {a.alloc_id: a for a in allocs}
    return state


def olds(replicas=4):
    return [alloc(f"old{i}", i, 1, healthy_at=T - 100) for i in range(replicas)]


def test_a_replica_counts_only_after_min_healthy_s_of_health():
    rec = record()
    new = alloc("n0", 0, 2, healthy_at=T)
    assert not rollout.counts(new, rec, T + 4.9)
    assert rollout.counts(new, rec, T + 5.0)
    assert not rollout.counts(replace(new, health=HEALTH_CHECKING), rec, T + 50)
    assert not rollout.counts(replace(new, state=ALLOC_PENDING), rec, T + 50)


def test_at_most_max_parallel_held_indexes_are_replaced_at_a_time():
    rec = record(max_parallel=2)
    state = site(rec, *olds())
    seen = rollout.look(state, rec, T)
    assert rollout.paced_indexes(rec, seen, [0, 1, 2, 3]) == {0, 1}
    # One new replica placed, not counted yet: one more may go.
    state = site(rec, *olds(), alloc("n0", 0, 2, health=HEALTH_CHECKING))
    assert rollout.paced_indexes(rec, rollout.look(state, rec, T), [1, 2, 3]) == {1}
    # Once it counts, two again.
    state = site(rec, *olds(), alloc("n0", 0, 2))
    assert rollout.paced_indexes(rec, rollout.look(state, rec, T + 5), [1, 2, 3]) == {1, 2}


def test_indexes_nobody_holds_are_placed_at_once_whatever_the_pace():
    rec = record(replicas=4, max_parallel=1)
    state = site(rec, *olds(2))  # scaled up from 2 to 4
    assert rollout.paced_indexes(rec, rollout.look(state, rec, T), [0, 1, 2, 3]) == {0, 2, 3}


def test_a_paused_or_awaiting_deployment_places_only_free_indexes():
    for held in (DEPLOY_PAUSED, DEPLOY_AWAITING):
        rec = record(deployment=Deployment(version=2, from_version=1, state=held, started_at=T))
        state = site(rec, *olds(3))
        assert rollout.paced_indexes(rec, rollout.look(state, rec, T), [0, 1, 2, 3]) == {3}


def test_canaries_go_first_and_alone_and_their_old_replicas_stay_until_promotion():
    rec = record(canary=2, max_parallel=4)
    state = site(rec, *olds())
    assert rollout.paced_indexes(rec, rollout.look(state, rec, T), [0, 1, 2, 3]) == {0, 1}
    state = site(rec, *olds(), alloc("n0", 0, 2), alloc("n1", 1, 2))
    assert not rollout.old_may_stop(state, state.allocs["old0"], T + 50)  # done, but not promoted
    verdict = rollout.decide(state, rec, T + 5)
    assert verdict.move == rollout.Move("web", 2, rollout.MOVE_AWAIT, "every canary is healthy")
    promoted = replace(rec, deployments=(replace(rec.deployment, promoted=True),))
    state.apps["web"] = promoted
    assert rollout.old_may_stop(state, state.allocs["old0"], T + 5)
    assert not rollout.old_may_stop(state, state.allocs["old2"], T + 5)  # its index is not done


def test_auto_promote_promotes_instead_of_waiting():
    rec = record(canary=1, auto_promote=True)
    state = site(rec, *olds(), alloc("n0", 0, 2))
    assert rollout.decide(state, rec, T + 5).move.action == rollout.MOVE_PROMOTE


def test_a_new_replica_failed_for_good_fails_the_deployment():
    rec = record()
    state = site(rec, *olds(), alloc("n0", 0, 2, state=ALLOC_FAILED, health="none", reason="exited with status 3"))
    move = rollout.decide(state, rec, T + 1).move
    assert move.action == rollout.MOVE_FAIL and move.reason == "replica 0 failed: exited with status 3"


def test_a_replica_not_healthy_past_its_deadline_fails_it_and_the_deadline_is_the_wake():
    rec = record()
    state = site(rec, *olds(), alloc("n0", 0, 2, health=HEALTH_UNHEALTHY))
    early = rollout.decide(state, rec, T + 29)
    assert early.move is None and early.wake == T + 30
    late = rollout.decide(state, rec, T + 30.5)
    assert late.move.action == rollout.MOVE_FAIL and "not healthy within 30s (unhealthy)" in late.move.reason


def test_no_index_done_for_the_progress_deadline_fails_it():
    rec = record(healthy_deadline_s=300.0, progress_deadline_s=60.0)
    state = site(rec, *olds())  # nothing could be placed
    assert rollout.decide(state, rec, T + 59).move is None
    move = rollout.decide(state, rec, T + 61).move
    assert move.action == rollout.MOVE_FAIL and "progress deadline" in move.reason


def test_a_paused_deployment_never_fails_on_its_deadlines():
    rec = record(deployment=Deployment(version=2, from_version=1, state=DEPLOY_PAUSED, started_at=T))
    state = site(rec, *olds(), alloc("n0", 0, 2, health=HEALTH_UNHEALTHY))
    assert rollout.decide(state, rec, T + 10_000).move is None


def test_it_succeeds_when_every_index_is_done_and_no_old_replica_is_left():
    rec = record(replicas=2)
    new = [alloc("n0", 0, 2), alloc("n1", 1, 2)]
    state = site(rec, *olds(2), *new)
    assert rollout.decide(state, rec, T + 5).move is None  # old ones still serve
    state = site(rec, *new)
    assert rollout.decide(state, rec, T + 4).move is None  # not counted yet
    assert rollout.decide(state, rec, T + 5).move.action == rollout.MOVE_SUCCEED


def test_a_revert_is_not_paced_and_counts_replicas_once_healthy():
    revert = Deployment(version=1, from_version=2, state=DEPLOY_RUNNING, started_at=T, promoted=True, revert=True)
    rec = record(version=1, deployment=revert, max_parallel=1)
    bad = [Alloc(alloc_id=f"bad{i}", app="web", version=2, replica=i, node_id="n1", state=ALLOC_RUNNING,
                 health=HEALTH_UNHEALTHY) for i in range(4)]
    state = site(rec, *bad)
    assert rollout.paced_indexes(rec, rollout.look(state, rec, T), [0, 1, 2, 3]) == {0, 1, 2, 3}
    good = alloc("g0", 0, 1, healthy_at=T)
    assert rollout.counts(good, rec, T)  # no soak for a revert


def test_a_decision_depends_only_on_the_state_and_the_wall_time():
    rec = record(max_parallel=2)
    state = site(rec, *olds(), alloc("n0", 0, 2, health=HEALTH_CHECKING, created_at=T + 1))
    first = [rollout.decide(state, rec, T + 10), rollout.paced_indexes(rec, rollout.look(state, rec, T + 10), [1, 2])]
    again = [rollout.decide(state, rec, T + 10), rollout.paced_indexes(rec, rollout.look(state, rec, T + 10), [1, 2])]
    assert first == again


def test_old_replicas_wait_until_their_nodes_hold_the_new_versions_artifacts():
    from meshd.artifacts.catalog import staging
    from meshd.state import ArtifactRef, NodeRecord
    digest = "sha256:" + "ab" * 32
    rec = record(replicas=2)
    rec = replace(rec, spec=replace(rec.spec, artifacts=(ArtifactRef("model", digest=digest),)))
    state = site(rec, *olds(2))
    state.nodes = {"n1": NodeRecord(node_id="n1", name="edge-1", site="s", address="a", raft_address="r",
                                    public_key="k")}
    seen = rollout.look(state, rec, T)
    assert rollout.unstaged(state, rec, seen) == ["edge-1"]
    assert staging(state, "n1") == {digest}  # what the node fetches ahead of the change
    assert rollout.paced_indexes(rec, seen, [0, 1], staged=False) == set()
    state.nodes["n1"] = replace(state.nodes["n1"], artifacts=(digest,))
    assert rollout.unstaged(state, rec, seen) == []
    assert rollout.paced_indexes(rec, seen, [0, 1], staged=True) == {0}  # max_parallel 1
