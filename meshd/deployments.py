"""What `meshctl deployments`, `history` and `deploy --wait` show of one site's deployments.

Pure reads of the replicated state (meshd.rollout decides, meshd.sitestate records); the
admin layer adds nothing but the transport.

Invariants:
- A deployment row's `sites` holds this site's part, from its own Raft state; a site the
  app names but this one has no word from is `pending`, never `failed`.
- A deployment an edit with `[app.rollout]` started shows the rollout across sites
  (`with_rollout`, from meshd.waves): its state is the rollout's, and every site's part
  holds its wave.
- `wait_outcome` ends a `deploy --wait` only on a verdict the state holds: the deployment
  succeeded (ok), or it failed, was reverted or cancelled, or a later deploy replaced it
  (an error that says which).
"""

from __future__ import annotations

from dataclasses import dataclass

from meshd import rollout, waves
from meshd.state import (
    DEPLOY_CANCELLED,
    DEPLOY_FAILED,
    DEPLOY_REVERTED,
    DEPLOY_SUCCEEDED,
    AppRecord,
    Deployment,
    SiteState,
)

PENDING = "pending"  # a site's part of a deployment this site has no word from


def site_part(state: SiteState, record: AppRecord, d: Deployment, wall: float) -> dict:
    """This site's part of deployment `d`: its state, healthy and desired new replicas, canaries."""
    if d is not record.deployment or d.version != record.version:
        # An ended deployment that is no longer the latest: what it ended as.
        return {"state": d.state, "healthy": None, "desired": record.spec.replicas, "canaries": d.canary}
    seen = rollout.look(state, record, wall)
    healthy = sum(1 for group in seen.new.values() if any(rollout.is_healthy(a) and a.live for a in group))
    canaries = sum(1 for a in state.allocs.of_app(record.spec.name)
                   if a.canary and a.live and a.version == d.version)
    return {"state": d.state, "healthy": healthy, "desired": record.spec.replicas, "canaries": canaries,
            "counted": len(seen.done), "old": sum(len(g) for g in seen.old.values())}


def edit_state(record: AppRecord) -> tuple[str, float]:
    """(this site's outcome of the mesh edit its record runs, when it reached it): the state of
    the deployment that edit started, or `reverted` when it succeeded but the site has since
    returned from it (the rollout was stopped elsewhere); `succeeded` (at 0) when taking the
    edit in changed nothing here. Costs no allocation."""
    d = next((x for x in reversed(record.deployments) if x.edit_id and x.edit_id == record.edit_id), None)
    if d is None:
        return DEPLOY_SUCCEEDED, 0.0
    if d.state == DEPLOY_SUCCEEDED and record.version != d.version:
        returned = next((x for x in reversed(record.deployments) if x.revert and x.from_version == d.version), None)
        return DEPLOY_REVERTED, returned.started_at if returned is not None else d.ended_at
    return d.state, (d.ended_at if not d.active else 0.0)


def edit_outcome(state: SiteState, record: AppRecord, wall: float) -> dict:
    """This site's word on the mesh edit its record runs (meshd.waves.SiteWord's fields): its
    `edit_state`, and the new replicas healthy and canaries running."""
    outcome, ended = edit_state(record)
    d = next((x for x in reversed(record.deployments) if x.edit_id and x.edit_id == record.edit_id), None)
    if d is None:
        return {"state": outcome, "healthy": state.running_replicas(record.spec.name), "canaries": 0,
                "ended_ts": ended}
    part = site_part(state, record, d, wall)
    return {"state": outcome, "healthy": part["healthy"] or 0, "canaries": part["canaries"] or 0, "ended_ts": ended}


def rollout_sites(view: waves.RolloutView) -> dict[str, dict]:
    """Every site's part of a rollout across sites, as `deployments` and `deploy --wait` show it."""
    return {site: {"state": part.state, "wave": part.wave, "reached": part.open, "healthy": part.healthy,
                   "desired": part.desired, "canaries": part.canaries}
            for site, part in view.sites.items()}


def deployment_rows(state: SiteState, wall: float, app: str | None = None) -> list[dict]:
    """Every kept deployment (of `app`, or of every app), newest first."""
    rows = []
    for name in ([app] if app is not None else sorted(state.apps)):
        record = state.apps.get(name)
        if record is None:
            continue
        targets = list(record.spec.sites) or [state.site]
        for d in reversed(record.deployments):
            sites = {site: {"state": PENDING, "healthy": None, "desired": record.spec.replicas, "canaries": None}
                     for site in targets}
            sites[state.site] = site_part(state, record, d, wall)
            rows.append({"app": name, "version": d.version, "from_version": d.from_version, "state": d.state,
                         "started_at": d.started_at, "ended_at": d.ended_at or None, "canary": d.canary,
                         "promoted": d.promoted, "revert": d.revert, "reason": d.reason, "by": d.by,
                         "edit_id": d.edit_id, "sites": sites})
    return rows


def history_rows(record: AppRecord) -> list[dict]:
    """Every kept version of the app, newest first."""
    return [{"version": e.version, "state": e.state, "submitted_at": e.submitted_at, "by": e.by, "site": e.site,
             "spec_digest": e.digest, "pinned": e.pinned, "reason": e.reason,
             "current": e.version == record.version}
            for e in reversed(record.history)]


def rollback_target(record: AppRecord, to: int | None) -> tuple[int | None, str]:
    """(the version `rollback` deploys again, "") or (None, why not): `to`, or by default the
    newest stable version other than the current one, else the one before the current."""
    if to is not None:
        if to == record.version:
            return None, f"{record.spec.name} runs v{to} already"
        return (to, "") if record.version_entry(to) is not None else (None, version_missing(record, to))
    earlier = [e for e in reversed(record.history) if e.version != record.version]
    stable = next((e for e in earlier if e.state == "stable"), None)
    choice = stable or next((e for e in earlier if e.version < record.version), None)
    if choice is None:
        return None, f"{record.spec.name} has no earlier version in its history"
    return choice.version, ""


def version_missing(record: AppRecord, version: int) -> str:
    """Why `version` of the app is not in its history (for a refusal, here and in the state machine)."""
    name, latest = record.spec.name, max(record.latest_version, record.version)
    if 0 < version <= latest:
        return (f"{name} v{version} was forgotten: its history keeps the last {record.spec.update.keep_versions} "
                "versions (`[app.update] keep_versions`), pinned ones, the stable one and any still running")
    return f"{name} has no version {version} (its latest is v{latest})"


def complete(state: SiteState, record: AppRecord) -> bool:
    """Every replica index has a healthy new replica and no old one is left (the rollout is
    through; the version still soaks min_healthy_s before it is stable)."""
    seen = rollout.look(state, record, 0.0)
    return not seen.old and all(any(a.live and rollout.is_healthy(a) for a in seen.new.get(i, ()))
                                for i in range(record.spec.replicas))


@dataclass(frozen=True)
class Outcome:
    done: bool
    error: str = ""  # set when it ended badly


def wait_outcome(record: AppRecord | None, version: int) -> Outcome:
    """Whether a `deploy --wait` of site version `version` is over, and how."""
    if record is None:
        return Outcome(True, "the app was removed while waiting")
    d = next((x for x in reversed(record.deployments) if x.version == version and not x.revert), None)
    if d is None:
        return Outcome(False)
    if d.state == DEPLOY_SUCCEEDED:
        return Outcome(True)
    if d.state == DEPLOY_REVERTED:
        return Outcome(True, f"v{version} failed and was reverted to v{record.version}: {d.reason}")
    if d.state == DEPLOY_FAILED:
        return Outcome(True, f"v{version} failed: {d.reason}")
    if d.state == DEPLOY_CANCELLED:
        return Outcome(True, f"v{version}'s deployment was cancelled: {d.reason}")
    return Outcome(False)


def with_rollout(rows: list[dict], app: str, edit_id: str, version: int, from_version: int, view: waves.RolloutView,
                 own_site: str) -> list[dict]:
    """`rows` (deployment_rows of `app`) with the rollout of edit `edit_id` across sites shown
    on the row of the deployment it started here: the rollout's state and every site's part,
    with its wave. A site whose wave has not reached it yet has no such deployment: the
    rollout gets a row of its own, at the top (`version` is then the mesh's version)."""
    sites = rollout_sites(view)
    rollout_fields = {"state": view.state, "rollout": {"waves_open": view.waves_open, "failed_sites": view.failed,
                                                       "reason": view.reason, "edit_id": edit_id}}
    out, shown = [], False
    for row in rows:
        if not shown and row.get("edit_id") == edit_id and row["app"] == app:
            own = row["sites"].get(own_site)
            merged = dict(sites)
            if own is not None and own_site in merged:  # this site's own part is fresher than its word
                word = merged[own_site]["state"]
                merged[own_site] = own | {"state": word if word != waves.PENDING else own["state"],
                                          "wave": merged[own_site]["wave"], "reached": True}
            row = row | rollout_fields | {"sites": merged}
            shown = True
        out.append(row)
    if not shown:
        out.insert(0, {"app": app, "version": version, "from_version": from_version, "started_at": None,
                       "ended_at": None, "canary": 0, "promoted": False, "revert": False, "by": "",
                       "edit_id": edit_id, "sites": sites} | rollout_fields | {"reason": view.reason})
    return out
