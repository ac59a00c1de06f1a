"""meshd.node.leading: one pass of the leader's duties, as effects."""

from __future__ import annotations

import itertools

from meshd import sitestate
from meshd.commands import ApplyPlan, SetLiveness
from meshd.node.effects import AddVoter, Commit, Emit, RemoveVoter
from meshd.node.leading import LeaderView, Leading
from meshd.state import SiteState

from tests.unit.test_sitestate import cmd, founded

ONE = f"{1:032x}"


def leading() -> Leading:
    ids = itertools.count(1)
    return Leading(lease=1.0, new_alloc_id=lambda: f"x{next(ids)}")


def view(state: SiteState, term: int = 1, **changes) -> LeaderView:
    values = dict(state=state, term=term, own_id=ONE, own_raft_address="198.18.0.1:7701",
                  configured=tuple(n.raft_address for n in state.nodes.values() if n.node_id != ONE and n.voter),
                  contacts=tuple((n.raft_address, 0.0) for n in state.nodes.values()))
    values.update(changes)
    return LeaderView(**values)


def deploy(state: SiteState, name: str, replicas: int, cpu: float = 0.0) -> None:
    spec = {"app": {"name": name, "replicas": replicas, "command": ["sleep", "1"]}}
    if cpu:
        spec["app"]["resources"] = {"cpu": cpu}
    assert sitestate.apply(state, cmd("submit_app", spec=spec)).ok


def test_a_new_term_gives_every_member_a_fresh_lease_and_moves_nothing():
    state = founded(3)
    core = leading()
    [announce, *plans] = core.step(view(state), now=100.0)
    assert isinstance(announce, Emit) and "leads site s1 (term 1)" in announce.message and plans == []
    # long after the members' last contacts, but a new term: nobody is marked down
    assert core.step(view(state, term=2, contacts=()), now=500.0)[0].data == {"term": 2}


def test_a_member_silent_past_its_lease_is_marked_down_before_anything_is_placed():
    state = founded(3)
    deploy(state, "svc", 3)
    core = leading()
    core.step(view(state), now=0.0)
    quiet = tuple((n.raft_address, 2.0) for n in state.nodes.values() if n.node_id != f"{3:032x}")
    effects = core.step(view(state, contacts=quiet), now=2.0)
    assert [e.command for e in effects] == [SetLiveness(node_id=f"{3:032x}", liveness="down",
                                                        reason=effects[0].command.reason)]


def test_one_voter_change_at_a_time_removals_first():
    state = founded(3)
    core = leading()
    unconfigured = view(state, configured=())
    assert core.voter_change(unconfigured) == AddVoter("198.18.0.2:7701", "n2")
    assert sitestate.apply(state, cmd("create_token", token_id="r", site="s1", secret="ab" * 32,
                                      expires_at=2e9)).ok
    state.nodes[f"{3:032x}"] = state.nodes[f"{3:032x}"].__class__(**{**vars(state.nodes[f"{3:032x}"]),
                                                                     "admin": "revoked"})
    assert core.voter_change(view(state)) == RemoveVoter("198.18.0.3:7701", "n3", "revoked")


def test_plans_of_one_pass_do_not_count_on_the_same_free_capacity():
    state = founded(1)  # one node, 4 cores free
    deploy(state, "a", 1, cpu=3.0)
    deploy(state, "b", 1, cpu=3.0)
    core = leading()
    effects = core.step(view(state), now=0.0)  # a new term: announced, then placed at once
    plans = [e.command for e in effects if isinstance(e, Commit) and isinstance(e.command, ApplyPlan)]
    assert [(p.app, len(p.placements)) for p in plans] == [("a", 1)]
    unplaced = [e for e in effects if isinstance(e, Emit) and e.kind == "placement"]
    assert len(unplaced) == 1 and "b: cannot place 1 replica" in unplaced[0].message
    # said once per distinct reason (the plan for `a` is made again: it was not applied here)
    assert not [e for e in core.step(view(state), now=0.2) if isinstance(e, Emit)]


def test_an_old_view_is_not_acted_on():
    state = founded(3)
    deploy(state, "svc", 3)
    core = leading()
    core.step(view(state), now=0.0)
    assert core.step(view(state, caught_up=False), now=0.1) == []
    assert core.step(view(founded(3)), now=0.2) == []  # fewer entries applied than a view acted on

