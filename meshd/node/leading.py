"""The leader's duties, as one pure step: liveness verdicts, the Raft voter set, placement.

`Leading.step(view, now)` looks at what the leader knows and returns what to do this pass:
- on a new term: every member gets a fresh lease (a leader change by itself never marks
  anyone down or reschedules anything) and the leadership is announced;
- liveness: `set_liveness` for every member whose lease ran out or that came back
  (meshd.liveness decides, from Raft heartbeat contacts, non-voters' beats and report
  sequence numbers);
- voters: at most one Raft configuration change (pysyncobj takes one at a time): a member
  that left or was revoked goes first, then an admitted voter that is not configured yet;
- deployments: at most one move per app whose deployment is under way (meshd.rollout:
  await promotion, promote, succeed, fail); such apps are reconciled on every pass, and
  the next look is no later than their next deadline; an app with a move outstanding (made
  this pass, or asked on the same record and not committed yet) is not planned until the
  move shows, whether this leader asked it or a new one asks it again;
- checkpoints: at most every CHECKPOINT_PERIOD, when the log moved since the last one, the
  digest of the history this leader applied (SiteState.chain), which every member compares
  with its own at the same point (sitestate._checkpoint);
- placement: reconcile the apps that changed since the last pass, then one plan per app
  that needs one (Nomad's plan/apply split: the plan is re-checked when it is applied).
  Plans of one pass are made one after the other on a working copy of the state, so two
  apps do not both count on the same free capacity.

What changed is found by identity, not by content: records are replaced, never mutated
(meshd.state), and the allocation table stamps each app it writes, so an app is looked at
again exactly when its record, one of its allocations, or a node it runs on (or, for an app
with replicas left unplaced, any node) was replaced. A pass over an unchanged site costs a
walk of the apps and nodes, never of the allocations. A safety sweep also reconciles a few
apps per RECONCILE_SAFETY_PERIOD, in turn, bounded by SWEEP_ALLOCS.

Invariants:
- Pure: `now` is monotonic seconds (leases); `view.wall` is the wall clock, compared only
  with the state's own wall-clock stamps (deployments' healthy times and deadlines).
- It never acts on a view Raft has not caught up with, nor on an older view than one it
  already acted on, nor on a Raft status older than a lease (made before a freeze: the node
  may have lost its leadership meanwhile; Raft refreshes it every tick, and config keeps the
  lease above two heartbeat intervals, a tick's longest wait). No lease counts from before the Raft
  thread's last freeze (`awake_since`): a leader paused past the lease marks nobody down
  for the silence it could not hear.
- An app it made a plan for counts as unseen until a later view shows its allocations
  changed, so a plan that did not commit is made again on the next pass.
- On a new term everything counts as changed: a new leader reconciles the whole site once.
- Plans never stop a draining replica before its replacement is placed, nor an old-version
  one before its index is done (sitestate.waits_for_replacement, checked again at apply).
- A placement problem is announced once per distinct reason, not on every pass.
"""

from __future__ import annotations

import bisect
import copy
from dataclasses import dataclass, field, replace
from typing import Callable

from meshd import rollout
from meshd.commands import ApplyPlan, Checkpoint, Rollout, SetLiveness
from meshd.liveness import LivenessTracker
from meshd.node.effects import AddVoter, Commit, Effect, Emit, RemoveVoter
from meshd.placement.plan import make_plan
from meshd.reconcile import reconcile, site_apps
from meshd.sitestate import stop_released
from meshd.state import ADMIN_LEFT, ADMIN_REVOKED, ALLOC_PENDING, DESIRED_RUN, DESIRED_STOP, LIVENESS_DOWN, Alloc, \
    AppWatch, NodeRecord, SiteState

# Look at liveness when the next lease may run out, plus this much so it really passed.
LEASE_EPSILON = 0.01
# While a member is down, its return is only seen by looking: this often.
DOWN_LOOK_PERIOD = 0.1
# Apps are reconciled when they changed; this often also a few without a change (the safety
# sweep), as a net under the change detection.
RECONCILE_SAFETY_PERIOD = 5.0
# The sweep's share per period: apps in turn until this many allocations were looked at
# (about 5 ms of reconcile), so the net costs the same at any size; a site of 100,000
# allocations is swept whole in 20 periods.
SWEEP_ALLOCS = 5_000
# One pass reconciles changed apps up to this many allocations (about 40 ms), the rest in the
# next passes at once: a new leader's look at a whole 100,000-allocation site, or a burst of
# deploys, never holds the event loop for long.
PASS_ALLOCS = 10_000
# A member whose history is not the site's is found within this long of the site doing
# anything; an idle site commits no checkpoint (nothing moved since the last).
CHECKPOINT_PERIOD = 10.0


@dataclass(frozen=True)
class LeaderView:
    """What the leader knows this pass."""
    state: SiteState
    term: int
    own_id: str
    own_raft_address: str
    configured: tuple[str, ...]  # Raft addresses of the other voters, per the Raft configuration
    contacts: tuple[tuple[str, float], ...] = ()  # (raft address, when it last answered a heartbeat)
    beats: tuple[tuple[str, float], ...] = ()  # (node id, when its last beat arrived): non-voters
    # Raft has applied every entry it knows committed. A node that restarted Raft (a secret
    # rotation) or was just elected may still be replaying its journal: its state is old.
    caught_up: bool = True
    wall: float = 0.0  # seconds since the epoch, now (deployments' clocks)
    # When Raft made what this view says of roles and contacts (monotonic), None: just now.
    status_at: float | None = None
    # When this node's Raft last came back from being frozen (monotonic): nobody could be
    # heard before it, so no lease counts from earlier.
    awake_since: float = float("-inf")


def heard_from(state: SiteState, contacts, beats) -> dict[str, float]:
    """node_id -> when the leader last heard the node: the newer of its answer to a Raft
    heartbeat (`contacts`, by Raft address) and its last beat (`beats`, by node id)."""
    by_address = dict(contacts)
    heard = {node.node_id: by_address[node.raft_address]
             for node in state.nodes.values() if node.raft_address in by_address}
    for node_id, at in beats:
        if at > heard.get(node_id, float("-inf")):
            heard[node_id] = at
    return heard


@dataclass
class Leading:
    lease: float
    new_alloc_id: Callable[[], str]
    tracker: LivenessTracker = field(init=False)
    _term: int | None = None
    _newest_applied: int = -1  # the newest view acted on (SiteState.applied)
    _view_was_old: bool = False  # the last view was older than one acted on: look again soon
    _last_sweep: float = float("-inf")
    _sweep_after: str = ""  # the safety sweep goes on after this app
    _unplaced_reported: dict[str, str] = field(default_factory=dict)
    # What the apps and nodes looked like when last reconciled (compared by identity).
    _apps: AppWatch = field(default_factory=AppWatch)
    _seen_nodes: dict[str, NodeRecord] = field(default_factory=dict)
    _unplaced: set[str] = field(default_factory=set)  # apps whose last plan left replicas unplaced
    _pending: set[str] = field(default_factory=set)  # changed apps a pass left for the next (PASS_ALLOCS)
    # app -> (the record a move was asked on, the move): not asked again on that very record.
    # Only apps with a move outstanding: it holds their records (with every spec of their
    # history), so an entry goes when its deployment wants no move or the app goes.
    _moved: dict[str, tuple[object, rollout.Move]] = field(default_factory=dict)
    _wall: float = 0.0  # the wall time of the last pass
    _awake_since: float = float("-inf")  # the last freeze of Raft it took into account (LeaderView)
    _app_wake: dict[str, float] = field(default_factory=dict)  # app -> when its deployment needs a look
    _checkpointed: tuple[float, int] = (float("-inf"), -1)  # when, and at which `applied`, the last checkpoint

    def __post_init__(self) -> None:
        self.tracker = LivenessTracker(lease=self.lease)

    def stepped_down(self) -> None:
        """This node no longer leads: the next term it leads starts afresh."""
        self._term = None
        self._moved.clear()
        self._app_wake.clear()

    def step(self, view: LeaderView, now: float) -> list[Effect]:
        if view.status_at is not None and now - view.status_at > self.lease:
            # Raft has not run for longer than a lease (the process was frozen): its "leader"
            # may be over, and its contacts say nothing yet. The next pass comes once it ticked.
            return []
        if not view.caught_up or view.state.applied < self._newest_applied:
            self._view_was_old = True
            return []  # an old view (a Raft node replaying its journal): wait until it caught up
        self._newest_applied = view.state.applied
        self._view_was_old = False
        effects = self.liveness(view, now)
        if any(isinstance(e, Commit) for e in effects):
            return effects  # the verdicts first: the next pass places on the state they make
        voter = self.voter_change(view)
        if voter is not None:
            effects.append(voter)
        moves, rolling, moving = self.deployments(view.state, view.wall)
        effects.extend(moves)
        apps = self.changed_apps(view.state) | self._pending | rolling
        if now - self._last_sweep > RECONCILE_SAFETY_PERIOD:
            self._last_sweep = now
            apps |= self._sweep(view.state)
        # An app whose deployment moves (this pass, or asked before and not committed yet) is
        # planned on the state the move makes.
        apps -= moving
        apps, self._pending = _within(view.state, apps, PASS_ALLOCS)
        if apps:
            effects.extend(self.plans(view.state, apps, view.wall))
        effects.extend(self.checkpoint(view.state, now))
        return effects

    def checkpoint(self, state: SiteState, now: float) -> list[Effect]:
        """The history digest to commit now, if one is due (see the module header)."""
        at, applied = self._checkpointed
        # +1: the last checkpoint's own entry is no news
        if not state.chain or now - at < CHECKPOINT_PERIOD or state.applied <= applied + 1:
            return []
        self._checkpointed = (now, state.applied)
        return [Commit(Checkpoint(applied=state.applied, chain=state.chain.hex()))]

    def deployments(self, state: SiteState, wall: float) -> tuple[list[Effect], set[str], set[str]]:
        """The moves of deployments under way (one per app), the apps under way, and those
        with a move outstanding (made now, or asked on this very record already)."""
        effects: list[Effect] = []
        rolling: set[str] = set()
        moving: set[str] = set()
        for name, record in state.apps.items():
            d = record.deployment
            if d is None or not d.active:
                self._app_wake.pop(name, None)
                self._moved.pop(name, None)
                continue
            if self._app_wake.get(name, float("-inf")) <= wall:
                rolling.add(name)  # a deadline of its came (or it is new here): reconcile it too
            verdict = rollout.decide(state, record, wall)
            self._app_wake[name] = verdict.wake if verdict.wake is not None else float("inf")
            move = verdict.move
            if move is None:
                self._moved.pop(name, None)  # no move wanted: none outstanding to remember
                continue
            moving.add(name)
            asked = self._moved.get(name)
            if asked is not None and asked[0] is record and asked[1] == move:
                continue  # asked already on this very record: wait for the commit to show
            self._moved[name] = (record, move)
            effects.append(Commit(Rollout(app=name, version=move.version, action=move.action, reason=move.reason,
                                          actor="meshd (site leader)")))
        for kept in (self._moved, self._app_wake):
            if len(kept) > len(state.apps):  # apps forgotten without a pass seeing them end
                for name in kept.keys() - state.apps.keys():
                    del kept[name]
        self._wall = wall
        return effects, rolling, moving

    def changed_apps(self, state: SiteState) -> set[str]:
        """The apps to reconcile: replaced or new records, written allocations, and the apps
        on nodes whose record changed (any node, for apps with replicas left unplaced)."""
        changed = self._apps.changed(state)
        nodes = self._seen_nodes
        moved = [node_id for node_id in state.nodes.keys() | nodes.keys()
                 if nodes.get(node_id) is not state.nodes.get(node_id)]
        if moved or changed:
            changed |= self._unplaced  # any news of nodes or allocations may make room for them
        if moved:
            for node_id in moved:
                before, after = nodes.get(node_id), state.nodes.get(node_id)
                # Whether a node's allocations hold their replicas depends on its existence,
                # admin state and quarantine only (reconcile.covers); a heartbeat changes none.
                if before is None or after is None or before.admin != after.admin \
                        or before.quarantine != after.quarantine:
                    changed.update(a.app for a in state.allocs.on_node(node_id))
                if after is None:
                    nodes.pop(node_id, None)
                else:
                    nodes[node_id] = after
        return changed

    def _sweep(self, state: SiteState) -> set[str]:
        """The safety sweep's share of this period: the next apps in name order, wrapping,
        until SWEEP_ALLOCS allocations."""
        names = site_apps(state)
        if not names:
            return set()
        start = bisect.bisect_right(names, self._sweep_after) % len(names)
        picked: set[str] = set()
        looked = 0
        for app in names[start:] + names[:start]:
            if looked >= SWEEP_ALLOCS or app in picked:
                break
            picked.add(app)
            looked += state.allocs.count_of_app(app) + 1
            self._sweep_after = app
        return picked

    def liveness(self, view: LeaderView, now: float) -> list[Effect]:
        state = view.state
        if self._term != view.term:
            self._term = view.term
            self.tracker.reset(state, now)
            self._apps.clear()
            self._app_wake.clear()
            self._seen_nodes.clear()
            self._unplaced.clear()
            self._pending.clear()
            return [Emit("leader", f"{_name(state, view.own_id)} leads site {state.site} (term {view.term})",
                         {"term": view.term})]
        if view.awake_since > self._awake_since:
            # What it did not hear while frozen says nothing of the others.
            self._awake_since = view.awake_since
            self.tracker.resumed(view.awake_since)
        contacts = heard_from(state, view.contacts, view.beats)
        contacts[view.own_id] = now  # the leader hears itself
        return [Commit(SetLiveness(node_id=t.node_id, liveness=t.to, reason=t.reason))
                for t in self.tracker.observe(state, now, contacts)]

    def next_look(self, state: SiteState, now: float) -> float:
        """Seconds until the leader should look again without news (soon while its view is
        old: what it has not looked at is waiting)."""
        if self._view_was_old:
            return DOWN_LOOK_PERIOD
        if self._pending:
            return 0.0  # changed apps wait for the next pass: at once
        deadline = self.tracker.next_check(state)
        wait = RECONCILE_SAFETY_PERIOD if deadline is None else deadline - now + LEASE_EPSILON
        wake = min(self._app_wake.values(), default=float("inf"))
        if wake != float("inf"):  # a deployment's deadline, in wall time
            wait = min(wait, wake - self._wall + LEASE_EPSILON)
        if any(n.liveness == LIVENESS_DOWN and n.admin not in (ADMIN_LEFT, ADMIN_REVOKED) for n in state.nodes.values()):
            wait = min(wait, DOWN_LOOK_PERIOD)
        return min(max(wait, LEASE_EPSILON), RECONCILE_SAFETY_PERIOD)

    def deployment_wake(self) -> float | None:
        """Wall time of the next deployment deadline this leader waits for, if any (the part of
        `next_look` that does not come from leases)."""
        wake = min(self._app_wake.values(), default=float("inf"))
        return None if wake == float("inf") else wake

    @staticmethod
    def voter_change(view: LeaderView) -> AddVoter | RemoveVoter | None:
        """The one Raft configuration change to make now, if any."""
        state, own = view.state, view.own_raft_address
        configured = set(view.configured)
        for node in sorted(state.nodes.values(), key=lambda n: n.raft_address):
            if node.admin in (ADMIN_LEFT, ADMIN_REVOKED) and node.raft_address in configured \
                    and node.raft_address != own:
                return RemoveVoter(node.raft_address, node.name, node.admin)
        for node in state.nodes.values():
            if node.voter and node.admin not in (ADMIN_LEFT, ADMIN_REVOKED) and node.raft_address not in configured \
                    and node.raft_address != own:
                return AddVoter(node.raft_address, node.name)
        return None

    def plans(self, state: SiteState, apps: set[str], wall: float | None = None) -> list[Effect]:
        """One `apply_plan` per app of `apps` that needs placing or stopping, made in turn on
        a working copy of the state. The apps are then seen as they are in `state`, except
        those given a plan (seen once their allocations changed)."""
        wall = state.last_ts if wall is None else wall
        rec = reconcile(state, apps, wall)
        self._unplaced.difference_update(apps)
        stops_by_app: dict[str, list[tuple[str, str]]] = {}
        for alloc_id, reason in rec.stop:
            stops_by_app.setdefault(state.allocs[alloc_id].app if alloc_id in state.allocs else "", []).append(
                (alloc_id, reason))
        effects: list[Effect] = []
        working: SiteState | None = None
        for app_name in sorted(set(rec.place) | set(stops_by_app)):
            record = state.apps.get(app_name)
            stops = stops_by_app.get(app_name, [])
            if record is None:
                self._apps.forget(app_name)
                effects.append(Commit(ApplyPlan(app=app_name or "unknown", version=1, stops=tuple(stops))))
                continue
            if working is None:
                working = copy.copy(state)
                working.allocs = state.allocs.copy()
            plan = make_plan(working, record.spec, record.version, rec.place.get(app_name, ()), self.new_alloc_id,
                             stops=stops)
            if plan.unplaced:
                self._unplaced.add(app_name)
                reason = "; ".join(f"replica {r}: {why}" for r, why in plan.unplaced)
                if self._unplaced_reported.get(app_name) != reason:
                    self._unplaced_reported[app_name] = reason
                    effects.append(Emit("placement", f"{app_name}: cannot place {len(plan.unplaced)} replica(s): "
                                        f"{reason}", {"app": app_name}))
            placed = {p.replica for p in plan.placements}
            kept_stops = tuple((alloc_id, why) for alloc_id, why in plan.stops
                               if stop_released(working, working.allocs[alloc_id], record.version, placed, wall))
            if not plan.placements and not kept_stops:
                continue
            self._apps.forget(app_name)
            effects.append(Commit(ApplyPlan(app=app_name, version=record.version, placements=plan.placements,
                                            stops=kept_stops)))
            for p in plan.placements:  # later apps of this pass see this capacity taken
                working.allocs[p.alloc_id] = Alloc(alloc_id=p.alloc_id, app=p.app, version=p.version,
                                                   replica=p.replica, node_id=p.node_id, desired=DESIRED_RUN,
                                                   state=ALLOC_PENDING)
            for alloc_id, _ in kept_stops:
                working.allocs[alloc_id] = replace(working.allocs[alloc_id], desired=DESIRED_STOP)
        for app_name in apps - self._unplaced:  # placed in full now, or gone: said again if it recurs
            self._unplaced_reported.pop(app_name, None)
        return effects


def _within(state: SiteState, apps: set[str], budget: int) -> tuple[set[str], set[str]]:
    """(the first apps in name order whose allocations fit in `budget`, at least one; the rest)."""
    taken: set[str] = set()
    used = 0
    ordered = sorted(apps)
    for at, app in enumerate(ordered):
        used += state.allocs.count_of_app(app) + 1
        if used > budget and taken:
            return taken, set(ordered[at:])
        taken.add(app)
    return taken, set()


def _name(state: SiteState, node_id: str) -> str:
    node = state.nodes.get(node_id)
    return node.name if node is not None else node_id
