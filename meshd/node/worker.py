"""This node as a worker: which allocations it runs, and when it must leave.

Invariants:
- It runs exactly the live allocations the replicated state assigns to it.
- It never acts on an old view: one Raft has not caught up with yet, or one with fewer
  applied log entries (`SiteState.applied`) than a view it already acted on. Such a state
  is a Raft node replaying its journal (after a restart for a secret rotation, say), and an
  allocation missing from it was not stopped by anyone. So a leader change or a secret
  rotation never stops a workload.
- It leaves (Expel) when the state says it was revoked, or a root-signed list naming it
  reached it directly (`revoked_notice`).
- It never acts on a state whose history a checkpoint found is not the site's
  (SiteState.diverged): it asks for the state to be rebuilt (RebuildState, once per such
  state) and keeps running what it ran until the rebuilt one says otherwise.
- A node whose Raft data was damaged (recovering: it rebuilds the site's state from the
  leader) runs what it last ran by its own record (meshd.io.workrecord), as an offline node
  runs its journal's state, until it holds the site's state; the first state it then acts on
  sets its workloads whatever they were, so the record never outlives the rebuild.
- What it keeps of an allocation (its directory and logs) goes once the site forgot the
  allocation (ForgetAllocs): those it knew that left the state, and at start those found on
  disk that the state no longer holds. Never on an old view: an allocation missing from a
  state still being replayed was not forgotten.
"""

from __future__ import annotations

from meshd.node.effects import Effect, Expel, ForgetAllocs, RebuildState, SetWorkloads, Workload
from meshd.state import ADMIN_REVOKED, SiteState


class Worker:
    def __init__(self, node_id: str, on_disk: frozenset[str] = frozenset(),
                 record: tuple[Workload, ...] | None = None) -> None:
        """`on_disk`: allocation directories an earlier run of this node left; `record`: the
        workloads it last ran (meshd.io.workrecord), if it has a record."""
        self.node_id = node_id
        self._record = record  # run while recovering; dropped once a state is acted on
        self._newest_seen = -1  # the largest `applied` acted on
        self._running: tuple[str, ...] | None = None  # allocation ids last asked for
        self._kept: set[str] = set(on_disk)  # allocations of this node whose traces are kept
        self._rebuild_asked = False  # for the diverged state in hand

    def step(self, state: SiteState, revoked_notice: str | None = None, caught_up: bool = True,
             recovering: bool = False) -> list[Effect]:
        """`caught_up`: Raft has applied every entry it knows committed (see meshd.io.raft);
        `recovering`: its Raft data was set aside and the state is being rebuilt."""
        own = state.nodes.get(self.node_id)
        if own is not None and own.admin == ADMIN_REVOKED:
            return [Expel(f"this node was revoked from site {state.site}: {own.reason}")]
        if revoked_notice:
            return [Expel(f"this node was revoked from site {state.site}: {revoked_notice}")]
        if state.diverged:
            if self._rebuild_asked:
                return []
            self._rebuild_asked = True
            return [RebuildState(state.diverged)]
        self._rebuild_asked = False
        if not caught_up or state.applied < self._newest_seen:
            # an old view (a Raft node replaying its journal): wait until it caught up; one
            # being rebuilt after damage: meanwhile run what this node last ran
            if recovering and self._record is not None and self._running is None:
                self._running = tuple(sorted(w.alloc_id for w in self._record))
                return [SetWorkloads(tuple(sorted(self._record, key=lambda w: w.alloc_id)))]
            return []
        self._newest_seen = state.applied
        if self._record is not None:
            self._record, self._running = None, None  # the site's state decides from here
        effects: list[Effect] = []
        mine = {alloc.alloc_id for alloc in state.allocs.on_node(self.node_id)}
        forgotten = self._kept - mine
        if forgotten:
            effects.append(ForgetAllocs(tuple(sorted(forgotten))))
        self._kept = mine
        workloads = []
        for alloc in state.allocs.on_node(self.node_id):
            if not alloc.live:
                continue
            record = state.apps.get(alloc.app)
            if record is None:
                continue
            spec = record.spec_of(alloc.version)  # an old replica runs its own version's spec
            workloads.append(Workload(alloc_id=alloc.alloc_id, app=alloc.app, command=tuple(spec.command),
                                      env=dict(spec.env), restart_policy=spec.restart_policy,
                                      health=spec.health, site=state.site, limits=spec.resources,
                                      user=spec.user, artifacts=spec.artifacts))
        key = tuple(sorted(w.alloc_id for w in workloads))
        if key != self._running:
            self._running = key
            effects.append(SetWorkloads(tuple(sorted(workloads, key=lambda w: w.alloc_id))))
        return effects
