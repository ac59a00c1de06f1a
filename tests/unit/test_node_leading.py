"""meshd.node.leading: one pass of the leader's duties, as effects."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from meshd import sitestate
from meshd.commands import ApplyPlan, Envelope, SetLiveness, encode
from meshd.node.effects import AddVoter, Commit, Emit, RemoveVoter
from meshd.node.leading import LeaderView, Leading
from meshd.state import SiteState

from tests.unit.test_sitestate import T0, cmd, founded

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



# --- the incremental pass decides what a full pass decides ------------------------------
NODE_IDS = [f"{i:032x}" for i in range(1, 5)]


@st.composite
def site_changes(draw):
    """A change to the site as Raft would apply it, or "apply": commit the incremental
    leader's plans of the last pass."""
    op = draw(st.sampled_from(["submit_app", "submit_app", "stop_app", "drain", "undrain", "report", "down",
                               "ready", "apply", "apply", "apply", "resources"]))
    app = draw(st.sampled_from(["web", "db", "cache"]))
    node_id = draw(st.sampled_from(NODE_IDS))
    if op == "submit_app":
        spec = {"app": {"name": app, "replicas": draw(st.integers(1, 4)), "command": [draw(st.sampled_from("ab"))],
                        "resources": {"cpu": draw(st.sampled_from([0, 1, 2.5]))}}}
        return cmd(op, spec=spec)
    if op == "stop_app":
        return cmd(op, app=app)
    if op in ("drain", "undrain"):
        return cmd(op, node=node_id)
    if op in ("down", "ready"):
        return cmd("set_liveness", node_id=node_id, liveness=op)
    if op == "resources":
        return cmd("heartbeat", node_id=node_id, seq=draw(st.integers(2, 9)), resources={
            "cpu_total": draw(st.sampled_from([0.5, 1, 4])), "cpu_free": 1, "mem_total_mb": 4096, "mem_free_mb": 4000,
            "enforces": ["cpu", "memory", "pids"], "cgroup": 2})
    if op == "report":
        return ("report", draw(st.integers(0, 30)), draw(st.sampled_from(["running", "failed", "stopped"])))
    return "apply"


def _plans(effects) -> list:
    """The plans of a pass without their new allocation ids (each leader draws its own)."""
    return sorted((e.command.app, e.command.version, tuple((p.replica, p.node_id) for p in e.command.placements),
                   e.command.stops) for e in effects if isinstance(e, Commit) and isinstance(e.command, ApplyPlan))


@settings(max_examples=150, deadline=None)
@given(st.lists(site_changes(), max_size=40))
def test_a_pass_over_what_changed_plans_what_a_pass_over_everything_plans(changes):
    state = founded(4)
    incremental = leading()
    incremental.step(view(state), now=0.0)  # the term's first pass: announce
    last: list = []
    for n, change in enumerate(changes, start=1):
        if change == "apply":
            for e in last:
                if isinstance(e, Commit):
                    sitestate.apply(state, encode(e.command, Envelope(ts=T0 + n)))
        elif isinstance(change, tuple):
            _, pick, what = change
            allocs = sorted(state.allocs.values(), key=lambda a: a.alloc_id)
            if allocs:
                alloc = allocs[pick % len(allocs)]
                sitestate.apply(state, cmd("heartbeat", node_id=alloc.node_id, seq=100 + n, reports=[{
                    "alloc_id": alloc.alloc_id, "state": what, "restarts": 0, "pid": None, "exit_code": 1,
                    "reason": "", "stopped_by_meshd": False}]))
        else:
            sitestate.apply(state, change)
        fresh = itertools.count(1)
        full = Leading(lease=1.0, new_alloc_id=lambda: f"f{n}-{next(fresh)}")  # a new leader looks at everything
        full.step(view(state), now=0.0)
        now = float(n)  # within the safety period of neither: only change detection works
        last = incremental.step(view(state, contacts=tuple((a, now) for a, _ in view(state).contacts)), now=now)
        if any(isinstance(e, Commit) and isinstance(e.command, SetLiveness) for e in last):
            continue  # liveness verdicts come first, alone in their pass (it looks again after them)
        assert _plans(last) == _plans(full.step(view(state), now=0.0))


def _commit_all(state: SiteState, effects, ts: float = T0) -> None:
    for e in effects:
        if isinstance(e, Commit):
            assert sitestate.apply(state, encode(e.command, Envelope(ts=ts))).ok


def alive(state: SiteState, now: float) -> LeaderView:
    """Every member answered the leader just now."""
    return view(state, contacts=tuple((n.raft_address, now) for n in state.nodes.values()))


def test_an_app_left_unplaced_is_placed_when_another_frees_room_or_a_node_grows():
    state = founded(2)  # 4 cpu each
    core = leading()
    core.step(alive(state, 0.0), now=0.0)
    deploy(state, "big", 2, cpu=2.5)
    _commit_all(state, core.step(alive(state, 1.0), now=1.0))
    deploy(state, "late", 1, cpu=2.5)  # 1.5 cpu left on each node: cannot place
    [emit] = core.step(alive(state, 2.0), now=2.0)
    assert isinstance(emit, Emit) and "cannot place 1 replica" in emit.message
    assert core.step(alive(state, 3.0), now=3.0) == []  # nothing changed: nothing to do, nothing said again
    assert sitestate.apply(state, cmd("stop_app", app="big")).ok  # only "big" changed
    _commit_all(state, core.step(alive(state, 4.0), now=4.0))
    assert [a.app for a in state.allocs.values() if a.live] == ["late"]
    assert core._unplaced_reported == {}  # placed: nothing kept of what was said of it

    state = founded(1)
    core = leading()
    core.step(alive(state, 0.0), now=0.0)
    deploy(state, "wide", 1, cpu=6)
    assert "cannot place" in core.step(alive(state, 1.0), now=1.0)[0].message
    assert sitestate.apply(state, cmd("heartbeat", node_id=ONE, seq=2, resources={
        "cpu_total": 8, "cpu_free": 8, "mem_total_mb": 4096, "mem_free_mb": 4000,
        "enforces": ["cpu", "memory", "pids"], "cgroup": 2})).ok  # only the node changed
    [plan] = core.step(alive(state, 2.0), now=2.0)
    assert plan.command.app == "wide" and len(plan.command.placements) == 1


def test_a_new_leader_looks_at_a_large_site_in_passes_of_bounded_size(monkeypatch):
    import meshd.node.leading as leading_module
    monkeypatch.setattr(leading_module, "PASS_ALLOCS", 3)
    state = founded(2)
    for name in ("a", "b", "c", "d", "e"):
        deploy(state, name, 2)
    core = leading()
    passes = []
    effects = core.step(alive(state, 0.0), now=0.0)  # the announcement and the first share
    while True:
        plans = [e for e in effects if isinstance(e, Commit)]
        passes.append(sorted(e.command.app for e in plans))
        _commit_all(state, plans)
        if core.next_look(state, 0.0) != 0.0 and not plans:
            break
        effects = core.step(alive(state, 0.0), now=0.0)
    # An app counts its allocations + 1 against the pass's 3: a, b, c unplaced fill the first
    # pass; once placed (3 each) they are looked at one a pass; then d and e, placed, likewise.
    assert passes == [["a", "b", "c"], [], [], [], ["d", "e"], [], []]


def test_a_member_is_heard_from_at_the_newer_of_its_raft_answer_and_its_beat():
    from meshd.node.leading import heard_from
    state = founded(3)
    two, three = f"{2:032x}", f"{3:032x}"
    contacts = ((state.nodes[two].raft_address, 5.0), (state.nodes[three].raft_address, 5.0), ("10.9.9.9:1", 99.0))
    heard = heard_from(state, contacts, ((two, 7.0), (three, 1.0), ("unknown", 50.0)))
    assert heard[two] == 7.0 and heard[three] == 5.0
    assert "unknown" in heard and all(at != 99.0 for at in heard.values())  # an address of no member: nobody


def test_a_leader_whose_raft_status_predates_a_freeze_decides_nothing():
    """SIGSTOP'd for 20 s: the trio loop runs first, on a status the Raft thread made before
    the freeze (it may no longer lead): no verdict, no plan."""
    state = founded(3)
    deploy(state, "svc", 3)
    core = leading()
    core.step(view(state, status_at=0.0), now=0.0)
    old = tuple((n.raft_address, 0.0) for n in state.nodes.values())
    assert core.step(view(state, contacts=old, status_at=0.1), now=20.1) == []


def test_after_a_freeze_no_lease_runs_out_for_the_silence_it_could_not_hear():
    """Raft has ticked since the freeze (awake_since), but its contacts are still those from
    before it: nobody is marked down until a lease passes after the wake, and a member that
    stays silent after it is."""
    state = founded(3)
    core = leading()
    core.step(view(state, status_at=0.0), now=0.0)
    before = tuple((n.raft_address, 0.0) for n in state.nodes.values())
    assert core.step(view(state, contacts=before, status_at=20.1, awake_since=20.1), now=20.1) == []
    assert core.step(view(state, contacts=before, status_at=20.6, awake_since=20.1), now=20.6) == []
    # the others answer after the wake, one stays silent: only that one goes down
    heard = tuple((n.raft_address, 20.9 if n.node_id != f"{3:032x}" else 0.0) for n in state.nodes.values())
    effects = core.step(view(state, contacts=heard, status_at=21.3, awake_since=20.1), now=21.3)
    assert [e.command.node_id for e in effects] == [f"{3:032x}"]
    assert effects[0].command.liveness == "down"


def test_a_status_as_old_as_a_tick_of_a_slow_heartbeat_is_not_stale():
    """Config lets the heartbeat interval (a tick's longest wait) reach 10 s with a longer
    lease: a status half a lease old is fresh, and the leader decides on it."""
    state = founded(3)
    core = Leading(lease=30.0, new_alloc_id=lambda: "x")
    core.step(view(state, status_at=0.0), now=0.0)
    quiet = tuple((n.raft_address, 0.0 if n.node_id == f"{3:032x}" else 40.0) for n in state.nodes.values())
    effects = core.step(view(state, contacts=quiet, status_at=35.0), now=45.0)
    assert [e.command.node_id for e in effects] == [f"{3:032x}"]


def test_the_leader_checkpoints_its_history_digest_when_the_log_moved_at_most_once_a_period():
    from meshd.commands import Checkpoint
    from meshd.node.leading import CHECKPOINT_PERIOD

    state = founded(1)
    core = leading()

    def checkpoints(now):
        return [e.command for e in core.step(view(state), now=now)
                if isinstance(e, Commit) and isinstance(e.command, Checkpoint)]

    assert checkpoints(0.0) == []  # no digest yet: entries applied without their bytes
    sitestate.apply(state, cmd("rotate_secret"), entry=b"one")
    [first] = checkpoints(1.0)
    assert first == Checkpoint(applied=state.applied, chain=state.chain.hex())
    sitestate.apply(state, cmd("checkpoint", applied=first.applied, chain=first.chain), entry=b"its entry")
    assert checkpoints(1.0 + CHECKPOINT_PERIOD) == []  # only its own entry since: an idle site commits none
    sitestate.apply(state, cmd("rotate_secret"), entry=b"two")
    assert checkpoints(2.0 + CHECKPOINT_PERIOD / 2) == []  # news, but within the period
    assert len(checkpoints(2.0 + CHECKPOINT_PERIOD)) == 1


def test_the_leader_remembers_a_deployment_move_only_while_it_is_outstanding():
    """A churning site (deploy, succeed, stop, forget, all day) leaves nothing behind in the
    leader's core: a remembered move holds its app's record and every spec of its history."""
    from meshd.commands import PurgeApps
    state = founded(1)
    core = leading()
    core.step(alive(state, 0.0), now=0.0)
    for i in range(5):
        name = f"app{i}"
        deploy(state, name, 1)
        _commit_all(state, core.step(alive(state, 1.0), now=1.0))  # the plan
        [alloc] = [a for a in state.allocs.values() if a.app == name]
        assert sitestate.apply(state, cmd("heartbeat", ts=T0 + 1, node_id=ONE, seq=10 + i, reports=[
            {"alloc_id": alloc.alloc_id, "state": "running", "restarts": 0, "health": "healthy"}])).ok
        [move] = [e for e in core.step(view(state, contacts=alive(state, 2.0).contacts, wall=T0 + 60),
                                  now=2.0) if isinstance(e, Commit)]
        assert move.command.op == "rollout" and name in core._moved  # asked: not asked again meanwhile
        _commit_all(state, [move], ts=T0 + 60)
        core.step(alive(state, 3.0), now=3.0)
        assert name not in core._moved and name not in core._app_wake  # it ended: nothing kept of it
        assert sitestate.apply(state, cmd("stop_app", app=name)).ok
        core.step(alive(state, 4.0), now=4.0)
    # A move outstanding when its app is forgotten goes with it.
    deploy(state, "late", 1)
    _commit_all(state, core.step(alive(state, 5.0), now=5.0))
    core._moved["late"] = (state.apps["late"], None)  # as if a move had been asked on it
    assert sitestate.apply(state, cmd("stop_app", app="late")).ok
    assert sitestate.apply(state, cmd("heartbeat", ts=T0 + 7, node_id=ONE, seq=99, reports=[
        {"alloc_id": a.alloc_id, "state": "stopped", "restarts": 0} for a in state.allocs.values()])).ok
    assert sitestate.apply(state, encode(PurgeApps(apps=tuple(state.apps), retention=0.0),
                                         Envelope(ts=T0 + 10_000))).ok
    assert state.apps == {}
    core.step(alive(state, 6.0), now=6.0)
    assert core._moved == {} and core._app_wake == {}
