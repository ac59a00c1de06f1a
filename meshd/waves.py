"""Waves of a rollout across sites (`[app.rollout]`): which sites may take an app's edit when,
and what the rollout as a whole has come to.

Each site's leader runs its own part of a rollout (meshd.rollout, per site); what crosses sites
is only the mesh document: the edit (crdt.schema.AppEdit), each site's word on how far it got
with it (AppSiteStatus: the edit it runs and its deployment's outcome) and the operators'
pause, resume and cancel (RolloutControl). `view` reads those and nothing else, so every site
that holds the same records decides the same: once the document has converged after a cut,
all sites agree on the rollout's state and on each site's part.

The plan:
- Sites are ordered once per edit: the sites waves name, in wave order, then the rest of the
  edit's targets ranked by sha256(app, site), so a percent wave picks the same sites
  everywhere and a different spread per app. Percent wave k holds the first
  ceil(percent * N / 100) sites of that order (percents count from the first wave on), less
  those earlier waves hold; targets no wave reaches form a last wave of their own.
- Wave 0 is open from the start. Wave k opens when every site of the waves before it has an
  outcome (succeeded, failed, reverted, cancelled) and the last of wave k-1's outcomes is
  `soak_s` of that wave old.

Invariants:
- Pure: no I/O, no clock (`now` is an argument).
- A site the document has no word from about the edit is `pending`, never `failed`; it holds
  back later waves (a wave that reached a site goes on there while it is cut off).
- The rollout stops (`reverted`) once failed sites reach abort_failed_percent of the app's
  sites (0: the first one); `cancelled` once any operator cancelled it. Both are final: every
  site that took the edit returns from it (sitestate "abort"); no held site opens.
- `paused` (the latest pause or resume, by time, is a pause) opens no new wave.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from meshd.state import (
    DEPLOY_AWAITING,
    DEPLOY_CANCELLED,
    DEPLOY_FAILED,
    DEPLOY_PAUSED,
    DEPLOY_REVERTED,
    DEPLOY_RUNNING,
    DEPLOY_SUCCEEDED,
    RolloutPlan,
)

PENDING = "pending"  # no word from the site about this edit (not reached yet, or cut off)
ENDED = (DEPLOY_SUCCEEDED, DEPLOY_FAILED, DEPLOY_REVERTED, DEPLOY_CANCELLED)
BAD = (DEPLOY_FAILED, DEPLOY_REVERTED)  # a site's outcome that counts towards the abort threshold
CONTROL_ACTIONS = ("pause", "resume", "cancel")


@dataclass(frozen=True)
class SiteWord:
    """What one site last published about its part of an edit."""
    state: str  # its deployment's state (DEPLOY_*)
    healthy: int = 0
    desired: int = 0
    canaries: int = 0
    ended_ts: float = 0.0  # when it reached an outcome (0: none yet)


@dataclass(frozen=True)
class Control:
    """An operator's pause, resume or cancel of the rollout, made in `site` at `ts`."""
    action: str
    ts: float
    site: str
    actor: str = ""
    reason: str = ""


@dataclass(frozen=True)
class SitePart:
    state: str
    wave: int  # 1-based, as `deployments` shows it
    open: bool  # its wave has opened: it may run the edit
    healthy: int | None = None
    desired: int | None = None
    canaries: int | None = None


@dataclass(frozen=True)
class RolloutView:
    state: str  # DEPLOY_RUNNING | DEPLOY_PAUSED | DEPLOY_AWAITING | DEPLOY_SUCCEEDED | DEPLOY_REVERTED | DEPLOY_CANCELLED
    sites: dict[str, SitePart] = field(default_factory=dict)
    waves_open: int = 0
    failed: int = 0
    reason: str = ""
    next_open_at: float | None = None  # when the next wave's soak ends, if that is all it waits on

    @property
    def stopped(self) -> bool:
        """Cancelled or aborted: sites that took the edit return from it."""
        return self.state in (DEPLOY_REVERTED, DEPLOY_CANCELLED)

    def may_run(self, site: str) -> bool:
        part = self.sites.get(site)
        return part is not None and part.open and not self.stopped


def waves_of(app: str, targets: Iterable[str], plan: RolloutPlan) -> list[list[str]]:
    """The sites of each wave, in order (see the module's header)."""
    targets = list(dict.fromkeys(targets))
    named = [s for wave in plan.waves for s in wave.sites if s in targets]
    rest = sorted((s for s in targets if s not in named),
                  key=lambda s: hashlib.sha256(f"{app}\0{s}".encode()).hexdigest())
    order = named + rest
    total = len(order)
    out: list[list[str]] = []
    taken = 0
    named_at = 0
    for wave in plan.waves:
        if wave.sites:
            sites = [s for s in wave.sites if s in targets]
            named_at += len(sites)
            taken = max(taken, named_at)
        else:
            upto = max(taken, min(total, math.ceil(wave.percent * total / 100)))
            sites = order[taken:upto]
            taken = upto
        out.append(sites)
    if taken < total:
        out.append(order[taken:])
    return out


def view(app: str, targets: Iterable[str], plan: RolloutPlan, words: Mapping[str, SiteWord],
         controls: Iterable[Control], now: float) -> RolloutView:
    """The rollout of one edit as the document shows it: `words` holds each site's word about
    that edit (sites without one are absent), `controls` the operators' moves of it."""
    waves = waves_of(app, targets, plan)
    soaks = [w.soak_s for w in plan.waves] + [0.0] * (len(waves) - len(plan.waves))
    total = sum(len(w) for w in waves)
    failed = sorted(s for s, w in words.items() if w.state in BAD)
    controls = sorted(controls, key=lambda c: (c.ts, c.site, c.action))
    cancel = next((c for c in controls if c.action == "cancel"), None)
    latest_hold = next((c for c in reversed(controls) if c.action in ("pause", "resume")), None)
    paused = latest_hold is not None and latest_hold.action == "pause"
    aborted = bool(failed) and len(failed) * 100 >= plan.abort_failed_percent * total

    opened, next_at = 0, None
    for k, sites in enumerate(waves):
        if k == 0:
            opened = 1
            continue
        before = [s for w in waves[:k] for s in w]
        if any(s not in words or words[s].state not in ENDED for s in before):
            break
        last = max((words[s].ended_ts for s in waves[k - 1]), default=0.0)
        if now < last + soaks[k - 1]:
            next_at = last + soaks[k - 1]
            break
        if paused or cancel is not None or aborted:
            break
        opened = k + 1
    # A wave opened before the pause stays open (its sites may already run the edit).
    parts: dict[str, SitePart] = {}
    for k, sites in enumerate(waves):
        for s in sites:
            w = words.get(s)
            if w is None:
                parts[s] = SitePart(PENDING, k + 1, k < opened)
            else:
                parts[s] = SitePart(w.state, k + 1, True, w.healthy, w.desired, w.canaries)
    if cancel is not None:
        why = f"cancelled by {cancel.actor or 'an operator'} in site {cancel.site}"
        state, reason = DEPLOY_CANCELLED, why + (f": {cancel.reason}" if cancel.reason else "")
    elif aborted:
        state = DEPLOY_REVERTED
        reason = (f"{len(failed)} of {total} sites failed ({', '.join(failed[:5])}), at least "
                  f"{plan.abort_failed_percent}% stops the rollout")
    elif opened == len(waves) and all(s in words and words[s].state in ENDED for s in parts) \
            and now >= max((words[s].ended_ts for s in waves[-1]), default=0.0) + soaks[len(waves) - 1]:
        state, reason = DEPLOY_SUCCEEDED, ""
    elif paused:
        state, reason = DEPLOY_PAUSED, f"paused by {latest_hold.actor or 'an operator'} in site {latest_hold.site}"
    elif any(w.state == DEPLOY_AWAITING for w in words.values()):
        state, reason = DEPLOY_AWAITING, ""
    else:
        state, reason = DEPLOY_RUNNING, ""
    return RolloutView(state=state, sites=parts, waves_open=opened, failed=len(failed), reason=reason,
                       next_open_at=next_at)


def site_step(view: RolloutView, site: str, local_state: str | None) -> str | None:
    """What the site's leader must do about its own deployment of the edit so it follows the
    rollout: "abort" (return from it), "pause", "resume", or None. `local_state` is the site's
    deployment of the edit (None when it has none, or has not taken the edit)."""
    if local_state is None:
        return None
    if view.stopped:
        return "abort" if local_state not in (DEPLOY_REVERTED, DEPLOY_CANCELLED, DEPLOY_FAILED) else None
    if view.state == DEPLOY_PAUSED and local_state == DEPLOY_RUNNING:
        return "pause"
    if view.state != DEPLOY_PAUSED and local_state == DEPLOY_PAUSED:
        return "resume"
    return None
