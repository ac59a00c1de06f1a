"""Deployments in one site: how a new app version replaces the old one, and when it is done.

One place decides the pace of a change of spec (reconcile asks it) and the moves of a
deployment (the leader commits them as `Rollout` commands; meshd.sitestate records them).

Words:
- a *new* replica runs the app's current spec (`AppRecord.runs`); an *old* one runs another
  version and still holds its replica index;
- a replica *counts* once it has been healthy (running, its check passing or none) for
  `min_healthy_s` (`counts`); a revert's replicas count once healthy;
- an index is *done* when a new replica holding it counts.

Invariants:
- Pure: reads the state and `wall` (seconds since the epoch) it is given, nothing else. The
  timestamps it compares come from the replicated state, so a new leader decides exactly what
  the old one would have: a leader change neither restarts nor repeats anything.
- An old replica stops only once its index is done, and for a canary's index only once the
  deployment was promoted: a good update never runs fewer healthy replicas than it wants.
- Indexes held by an old replica get a new one only while the deployment runs (not paused,
  not awaiting promotion, not ended), canaries' indexes first and alone until promoted, and
  at most `max_parallel` of them not done at a time. An index nobody holds (a first deploy,
  a scale-up, a replica lost) is placed at once: nothing running is at stake.
- A deployment fails when a new replica failed for good, stayed not healthy past
  `healthy_deadline_s` since it was placed or fell ill, or no index became done for
  `progress_deadline_s`; it succeeds when every index is done and no old replica is left.
- Indexes held by an old replica wait while a node running one lacks an artifact of the new
  version (`unstaged`): a rollout stages its artifacts on the nodes it changes before the
  first replica changes.
- A revert (returning to the stable version after a failure) is not paced and has no
  canaries: its only purpose is to get the failing version out of the way.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshd.state import (
    ALLOC_FAILED,
    ALLOC_LOST,
    ALLOC_RUNNING,
    APP_RUNNING,
    DEPLOY_RUNNING,
    DESIRED_RUN,
    HEALTH_HEALTHY,
    HEALTH_NONE,
    Alloc,
    AppRecord,
    Deployment,
    SiteState,
)

# Moves the leader commits (Rollout.action; the operator's are commands.OPERATOR_ACTIONS).
MOVE_AWAIT = "await"  # every canary counts: wait for `promote`
MOVE_PROMOTE = "promote"
MOVE_SUCCEED = "succeed"
MOVE_FAIL = "fail"


def is_healthy(alloc: Alloc) -> bool:
    """Running, and its health check passing (or it has none)."""
    return alloc.state == ALLOC_RUNNING and alloc.health in (HEALTH_HEALTHY, HEALTH_NONE)


def counts(alloc: Alloc, record: AppRecord, wall: float) -> bool:
    """A live new replica that has been healthy long enough to count (see the header)."""
    if not (alloc.live and alloc.healthy_at and is_healthy(alloc)):
        return False
    deployment = record.deployment
    if deployment is not None and deployment.revert and deployment.version == record.version:
        return True
    return wall - alloc.healthy_at >= record.spec.update.min_healthy_s


@dataclass(frozen=True)
class Look:
    """One app's replicas seen by its deployment."""

    new: dict[int, list[Alloc]]  # index -> new replicas holding it (wanted, not lost; failed ones too)
    old: dict[int, list[Alloc]]  # index -> live old replicas (in range)
    done: frozenset[int]
    in_flight: int  # indexes held by an old replica whose new one does not count yet


def look(state: SiteState, record: AppRecord, wall: float) -> Look:
    new: dict[int, list[Alloc]] = {}
    old: dict[int, list[Alloc]] = {}
    replicas = record.spec.replicas
    for alloc in state.allocs.of_app(record.spec.name):
        if not 0 <= alloc.replica < replicas:
            continue
        if record.runs(alloc.version):
            # A new replica that failed still holds its index (reconcile.covers): not done.
            if alloc.desired == DESIRED_RUN and alloc.state != ALLOC_LOST:
                new.setdefault(alloc.replica, []).append(alloc)
        elif alloc.live:
            old.setdefault(alloc.replica, []).append(alloc)
    done = frozenset(i for i, group in new.items() if any(counts(a, record, wall) for a in group))
    in_flight = sum(1 for i in new if i in old and i not in done)
    return Look(new=new, old=old, done=done, in_flight=in_flight)


def _canary_phase(d: Deployment | None) -> bool:
    return d is not None and d.active and d.canary > 0 and not d.promoted


def unstaged(state: SiteState, record: AppRecord, seen: Look) -> list[str]:
    """Names of the nodes running an old replica that do not yet hold every artifact of the
    new version (meshd.artifacts.catalog.staging fetches them there first)."""
    digests = {a.digest for a in record.spec.artifacts if a.digest}
    if not digests:
        return []
    nodes = {a.node_id for group in seen.old.values() for a in group}
    return sorted(state.nodes[n].name for n in nodes
                  if n in state.nodes and not digests <= set(state.nodes[n].artifacts))


def paced_indexes(record: AppRecord, seen: Look, missing: list[int], staged: bool = True) -> set[int]:
    """Of the indexes without a new replica (`missing`), those that may get one now.
    `staged`: every node running an old replica holds the new version's artifacts; until
    then no old replica is replaced (a fetch over a thin link takes no replica down)."""
    d = record.deployment
    free = {i for i in missing if i not in seen.old}  # nothing running is at stake
    held = [i for i in missing if i in seen.old]
    if d is None or d.revert:
        return free | set(held)  # no deployment (a record from before them), or a revert: no pace
    if d.version != record.version or d.state != DEPLOY_RUNNING or not staged:
        return free  # paused, awaiting promotion, ended, artifacts not staged: held indexes wait
    if _canary_phase(d):
        return free | {i for i in held if i < d.canary}
    room = max(record.spec.update.max_parallel - seen.in_flight, 0)
    return free | set(sorted(held)[:room])


def old_may_stop(state: SiteState, alloc: Alloc, wall: float) -> bool:
    """Whether an old replica (its version is not the current spec) may stop now: its index
    is done, and, for a canary's index, the deployment was promoted."""
    record = state.apps.get(alloc.app)
    if record is None or record.status != APP_RUNNING or not 0 <= alloc.replica < record.spec.replicas:
        return True
    d = record.deployment
    if _canary_phase(d) and alloc.replica < d.canary:
        return False
    return any(record.runs(a.version) and a.replica == alloc.replica and counts(a, record, wall)
               for a in state.allocs.of_app(alloc.app))


@dataclass(frozen=True)
class Move:
    """A deployment move the leader commits (a Rollout command)."""

    app: str
    version: int
    action: str  # MOVE_*
    reason: str = ""


@dataclass(frozen=True)
class Verdict:
    move: Move | None
    wake: float | None  # when (wall seconds) to look again without news; None: only on news


def decide(state: SiteState, record: AppRecord, wall: float) -> Verdict:
    """The move one app's active deployment makes now, if any, and when to look again."""
    d = record.deployment
    if d is None or not d.active or d.version != record.version or record.status != APP_RUNNING:
        return Verdict(None, None)
    name, policy = record.spec.name, record.spec.update
    seen = look(state, record, wall)
    wakes: list[float] = []
    if d.state == DEPLOY_RUNNING:
        failure = _failure(state, record, d, seen, wall, wakes)
        if failure:
            return Verdict(Move(name, d.version, MOVE_FAIL, failure), None)
    for group in seen.new.values():
        for a in group:
            if a.healthy_at and is_healthy(a) and a.replica not in seen.done:
                wakes.append(a.healthy_at + policy.min_healthy_s)
    wake = min(wakes) if wakes else None
    if d.state != DEPLOY_RUNNING:
        return Verdict(None, wake)
    if _canary_phase(d):
        if all(i in seen.done for i in range(d.canary)):
            action = MOVE_PROMOTE if policy.auto_promote else MOVE_AWAIT
            why = "every canary is healthy" + (": promoted automatically" if policy.auto_promote else "")
            return Verdict(Move(name, d.version, action, why), None)
        return Verdict(None, wake)
    replicas = record.spec.replicas
    if all(i in seen.done for i in range(replicas)) and not seen.old and not any(
            a.live and not record.runs(a.version) for a in state.allocs.of_app(name)):
        return Verdict(Move(name, d.version, MOVE_SUCCEED,
                            f"all {replicas} replica(s) healthy for {policy.min_healthy_s:g}s"), None)
    return Verdict(None, wake)


def _failure(state: SiteState, record: AppRecord, d: Deployment, seen: Look, wall: float,
             wakes: list[float]) -> str:
    """Why the running deployment failed now ("" if it did not); adds its deadlines to `wakes`."""
    policy = record.spec.update
    for a in sorted(state.allocs.of_app(record.spec.name), key=lambda a: (a.replica, a.alloc_id)):
        # This deployment's replicas: older ones of an equal spec (a revert's) were judged before.
        if not record.runs(a.version) or a.desired != DESIRED_RUN or (a.version != d.version
                                                                       and a.created_at < d.started_at):
            continue
        if a.state == ALLOC_FAILED:
            return f"replica {a.replica} failed" + (f": {a.reason}" if a.reason else "")
        if a.live and not (a.healthy_at and is_healthy(a)):
            since = a.unhealthy_since or a.created_at
            if wall - since > policy.healthy_deadline_s:
                return (f"replica {a.replica} not healthy within {policy.healthy_deadline_s:g}s"
                        + (f" ({a.health})" if a.health not in (HEALTH_NONE,) else f" ({a.state})"))
            wakes.append(since + policy.healthy_deadline_s)
    # Progress counts from the start, the last resume or promotion, and each index done.
    progress = max([d.started_at, d.moved_at] + [a.healthy_at + (0.0 if d.revert else policy.min_healthy_s)
                                     for i in seen.done for a in seen.new[i] if a.healthy_at])
    if wall - progress > policy.progress_deadline_s:
        return f"no replica became healthy for {policy.progress_deadline_s:g}s (progress deadline)"
    wakes.append(progress + policy.progress_deadline_s)
    return ""
