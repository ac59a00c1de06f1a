"""meshd.node.worker: the workloads a node runs, and never on an old view."""

from __future__ import annotations

import copy

from meshd import sitestate
from meshd.node.effects import Expel, ForgetAllocs, SetWorkloads
from meshd.node.worker import Worker
from meshd.state import SiteState

from tests.unit.test_sitestate import cmd, founded


def placed(state: SiteState, count: int = 2) -> SiteState:
    assert sitestate.apply(state, cmd("submit_app", spec={"app": {"name": "svc", "replicas": count,
                                                                   "command": ["sleep", "1"]}})).ok
    placements = [{"alloc_id": f"x{i}", "replica": i, "node_id": f"{1:032x}"} for i in range(count)]
    assert sitestate.apply(state, cmd("apply_plan", plan={"app": "svc", "version": 1, "placements": placements,
                                                           "stops": []})).ok
    return state


def test_it_runs_the_live_allocations_assigned_to_it_once():
    state = placed(founded())
    worker = Worker(f"{1:032x}")
    [effect] = worker.step(state)
    assert isinstance(effect, SetWorkloads) and [w.alloc_id for w in effect.workloads] == ["x0", "x1"]
    assert worker.step(state) == []  # nothing new: nothing to do


def test_an_old_view_never_stops_anything():
    """A Raft node restarted for a secret rotation replays its journal from an empty state:
    the allocations missing from it were not stopped by anyone."""
    state = placed(founded())
    worker = Worker(f"{1:032x}")
    worker.step(state)
    assert worker.step(SiteState()) == []  # empty: replaying from scratch
    older = founded()  # the same log, not yet as far as the placements
    assert older.applied < state.applied
    assert worker.step(older) == []
    assert worker.step(copy.deepcopy(state), caught_up=False) == []  # Raft still replaying


def test_a_newer_view_does_stop_what_the_site_stopped():
    state = placed(founded())
    worker = Worker(f"{1:032x}")
    worker.step(state)
    assert sitestate.apply(state, cmd("stop_app", app="svc")).ok
    [effect] = worker.step(state)
    assert isinstance(effect, SetWorkloads) and effect.workloads == ()


def test_it_leaves_when_revoked_by_the_state_or_by_a_signed_notice():
    state = founded()
    worker = Worker(f"{1:032x}")
    assert worker.step(state, revoked_notice="revoked by op@n2: stolen") == [
        Expel(f"this node was revoked from site {state.site}: revoked by op@n2: stolen")]
    state.nodes[f"{1:032x}"] = state.nodes[f"{1:032x}"].__class__(**{**vars(state.nodes[f"{1:032x}"]),
                                                                     "admin": "revoked", "reason": "by op"})
    [effect] = worker.step(state)
    assert isinstance(effect, Expel) and "by op" in effect.reason



def test_what_the_site_forgot_is_forgotten_here_too_and_never_on_an_old_view():
    state = placed(founded())
    worker = Worker(f"{1:032x}", on_disk=frozenset({"x0", "old-run"}))  # an earlier run's directories
    effects = worker.step(state)
    assert effects[0] == ForgetAllocs(("old-run",))  # x0 is still in the state
    assert worker.step(SiteState()) == []  # a state being replayed forgets nothing
    del state.allocs["x1"]  # trimmed from the history
    state.applied += 1
    assert worker.step(state)[0] == ForgetAllocs(("x1",))


def test_a_history_that_is_not_the_sites_is_rebuilt_and_never_acted_on():
    from meshd.node.effects import RebuildState

    state = placed(founded())
    worker = Worker(f"{1:032x}")
    worker.step(state)
    diverged = copy.deepcopy(state)
    sitestate.apply(diverged, cmd("stop_app", app="svc"))  # what it would stop, were it believed
    diverged.diverged = "after 9 log entries its history digest is aa…, the leader's bb…"
    assert worker.step(diverged) == [RebuildState(diverged.diverged)]
    assert worker.step(diverged) == []  # asked once; nothing stopped meanwhile
    rebuilt = placed(founded(), count=3)  # the site's state, taken from the leader again
    [effect] = worker.step(rebuilt)
    assert isinstance(effect, SetWorkloads) and [w.alloc_id for w in effect.workloads] == ["x0", "x1", "x2"]


def test_a_member_rebuilding_after_damage_runs_its_own_record_until_it_holds_the_sites_state():
    state = placed(founded())
    [ran] = Worker(f"{1:032x}").step(state)  # what it ran before its Raft data was damaged
    worker = Worker(f"{1:032x}", record=ran.workloads)
    assert worker.step(SiteState(), caught_up=False) == []  # not recovering: a replay, it waits
    [effect] = worker.step(SiteState(), caught_up=False, recovering=True)
    assert effect == SetWorkloads(ran.workloads)
    assert worker.step(SiteState(), caught_up=False, recovering=True) == []  # once
    rebuilt = placed(founded(), count=3)  # the site's state, which moved on meanwhile
    [effect] = worker.step(rebuilt)
    assert [w.alloc_id for w in effect.workloads] == ["x0", "x1", "x2"]
    assert worker.step(SiteState(), caught_up=False, recovering=True) == []  # the record is gone


def test_the_record_is_set_aside_by_the_first_state_even_when_it_asks_for_the_same():
    state = placed(founded())
    [ran] = Worker(f"{1:032x}").step(state)
    worker = Worker(f"{1:032x}", record=ran.workloads)
    worker.step(SiteState(), caught_up=False, recovering=True)
    [effect] = worker.step(state)  # the same allocations: set again, from the site's specs
    assert effect == SetWorkloads(ran.workloads)


def test_no_record_runs_nothing_while_recovering():
    assert Worker(f"{1:032x}").step(SiteState(), caught_up=False, recovering=True) == []
