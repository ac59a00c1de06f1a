"""The site state machine: every command, its refusals, idempotence and determinism."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd import commands as cmds
from meshd import sitestate
from meshd import spec as specmod
from meshd.commands import REFUSAL_CODES
from meshd.state import SiteState

T0 = 1_700_000_000.0


def node(i: int, site: str = "s1", **extra) -> dict:
    return {"node_id": f"{i:032x}", "name": f"n{i}", "site": site, "address": f"198.18.0.{i}:7700",
            "raft_address": f"198.18.0.{i}:7701", "public_key": f"{i:064x}", "arch": "x86_64",
            "labels": {}, "version": "0.1.0", **extra}


def cmd(op: str, ts: float = T0, **fields) -> dict:
    return {"op": op, "ts": ts, **fields}


def founded(nodes: int = 1) -> SiteState:
    state = SiteState()
    assert sitestate.apply(state, cmd("bootstrap", site="s1", mesh_id="m1", node=node(1))).ok
    for i in range(2, nodes + 1):
        assert sitestate.apply(state, cmd("create_token", token_id=f"t{i}", site="s1", secret="ab" * 32,
                                          expires_at=T0 + 100)).ok
        assert sitestate.apply(state, cmd("admit_node", token_id=f"t{i}", node=node(i))).ok
    for n in list(state.nodes):
        assert sitestate.apply(state, cmd("set_liveness", node_id=n, liveness="ready")).ok
        assert sitestate.apply(state, cmd("heartbeat", node_id=n, seq=1, resources={
            "cpu_total": 4, "cpu_free": 4, "mem_total_mb": 4096, "mem_free_mb": 4000,
            "enforces": ["cpu", "memory", "pids"], "cgroup": 2})).ok
    return state


APP = {"app": {"name": "web", "replicas": 2, "command": ["sleep", "100"]}}


def test_bootstrap_founds_the_site_with_the_founder_as_voter():
    state = founded()
    assert state.site == "s1"
    (only,) = state.nodes.values()
    assert only.voter and only.name == "n1"


def test_second_bootstrap_is_refused_and_changes_nothing():
    state = founded()
    before = copy.deepcopy(state)
    result = sitestate.apply(state, cmd("bootstrap", site="other", mesh_id="m2", node=node(9, site="other")))
    assert not result.ok and "already founded" in result.text
    assert state.nodes == before.nodes and state.site == "s1"


@pytest.mark.parametrize("command, reason", [
    ("not a dict", "not a mapping"),
    ({"op": "fly", "ts": T0}, "unknown command"),
    ({"op": "heartbeat"}, "ts must be"),
    ({"op": "heartbeat", "ts": T0, "node_id": "nope", "seq": 1}, "not a member"),
    ({"op": "heartbeat", "ts": T0, "node_id": f"{1:032x}", "seq": -1}, "seq must be"),
    ({"op": "heartbeat", "ts": T0, "node_id": f"{1:032x}", "seq": 2**63}, "seq must be"),
    ({"op": "heartbeat", "ts": T0, "node_id": f"{1:032x}", "seq": 1, "reports": [{"alloc_id": "a", "state": "dancing",
                                                                                   "restarts": 0}]}, "unknown allocation state"),
    ({"op": "submit_app", "ts": T0, "spec": {"app": {"name": "BAD NAME", "replicas": 1, "command": ["x"]}}}, "app.name"),
    ({"op": "submit_app", "ts": T0, "spec": "nope"}, "spec must be"),
    ({"op": "stop_app", "ts": T0, "app": "ghost"}, "no app named"),
    ({"op": "drain", "ts": T0, "node": "ghost"}, "no member named"),
    ({"op": "set_liveness", "ts": T0, "node_id": f"{1:032x}", "liveness": "zombie"}, "ready or down"),
    ({"op": "admit_node", "ts": T0, "token_id": "none", "node": node(5)}, "unknown join token"),
    ({"op": "create_token", "ts": T0, "token_id": "t", "site": "s1", "secret": "ab", "expires_at": T0 - 1}, "already be expired"),
    ({"op": "apply_plan", "ts": T0, "plan": {"app": "web", "version": 1, "stops": "x"}}, "stops must be"),
    ({"op": "heartbeat", "ts": T0, "request_id": "", "node_id": "x", "seq": 1}, "request_id"),
])
def test_bad_commands_are_refused_with_a_reason_and_change_nothing(command, reason):
    state = founded()
    before = pickle.dumps(state)
    result = sitestate.apply(state, command)
    assert result.ok is False
    assert reason in result.text
    assert result.code in REFUSAL_CODES
    after = copy.deepcopy(state)
    after.last_ts = pickle.loads(before).last_ts
    after.applied -= 1  # the count of log entries applied moves on every member alike
    assert pickle.dumps(after) == before


def test_token_is_single_use_and_expires():
    state = founded()
    sitestate.apply(state, cmd("create_token", token_id="t", site="s1", secret="ab" * 32, expires_at=T0 + 10))
    assert sitestate.apply(state, cmd("admit_node", token_id="t", node=node(2))).ok
    # the same node retrying its own admission is fine (idempotent) ...
    assert sitestate.apply(state, cmd("admit_node", token_id="t", node=node(2))).ok
    # ... another node with the same token is not
    reused = sitestate.apply(state, cmd("admit_node", token_id="t", node=node(3)))
    assert not reused.ok and "already used" in reused.text
    sitestate.apply(state, cmd("create_token", token_id="u", site="s1", secret="ab" * 32, expires_at=T0 + 10))
    expired = sitestate.apply(state, cmd("admit_node", ts=T0 + 11, token_id="u", node=node(4)))
    assert not expired.ok and "expired" in expired.text
    assert f"{4:032x}" not in state.nodes


def test_voters_up_to_five_then_non_voters():
    state = founded(7)
    voters = [n for n in state.nodes.values() if n.voter]
    assert len(voters) == sitestate.MAX_VOTERS
    assert sum(1 for n in state.nodes.values() if not n.voter) == 2


def test_request_id_makes_commands_idempotent():
    state = founded()
    first = sitestate.apply(state, cmd("submit_app", request_id="r1", spec=APP))
    APP2 = {"app": {**APP["app"], "replicas": 3}}
    again = sitestate.apply(state, cmd("submit_app", request_id="r1", spec=APP2))
    assert first == again
    assert state.apps["web"].spec.replicas == 2 and state.apps["web"].version == 1


def test_request_ids_are_remembered_for_minutes_and_the_newest_thousand_whatever_the_clocks():
    state = founded()
    memory, least = sitestate.REQUEST_MEMORY_S, sitestate.MIN_REMEMBERED_REQUESTS
    for i in range(3000):  # 2 a second: 1,500 s of them
        assert sitestate.apply(state, cmd("drain" if i % 2 else "undrain", ts=T0 + i / 2, node="n1", actor="op",
                                          request_id=f"r{i}")).ok
    held = [int(r[1:]) for r in state.applied_order]
    assert held == list(range(3000 - len(held), 3000)) and set(state.applied_requests) == set(state.applied_order)
    assert len(held) == 2 * memory + 1  # the last ten minutes, not 10,000
    # a retry within them is answered; one of a forgotten request is applied again
    assert sitestate.apply(state, cmd("undrain", ts=T0 + 1500, node="n1", actor="op", request_id="r2999")).ok
    assert state.applied_order[-1] == "r2999"
    # a member's clock an hour ahead cannot make the site forget the newest thousand
    sitestate.apply(state, cmd("drain", ts=T0 + 1500 + 3600, node="n1", actor="op", request_id="ahead"))
    assert len(state.applied_order) == least and state.applied_order[-2] == "r2999"
    # request ids a meshd remembered without dating them are dated as of the next command
    state.applied_at = []
    sitestate.apply(state, cmd("undrain", ts=T0 + 1500 + 3601, node="n1", actor="op", request_id="next"))
    assert len(state.applied_at) == len(state.applied_order) == least + 1  # none older than the newest


def test_redeploying_the_same_spec_keeps_the_version_and_a_change_bumps_it():
    state = founded()
    assert sitestate.apply(state, cmd("submit_app", spec=APP))["version"] == 1
    assert sitestate.apply(state, cmd("submit_app", spec=APP))["version"] == 1
    APP2 = {"app": {**APP["app"], "replicas": 3}}
    assert sitestate.apply(state, cmd("submit_app", spec=APP2))["version"] == 2
    assert len(state.audit) >= 3


def plan_cmd(placements, version=1, stops=()):
    return cmd("apply_plan", plan={"app": "web", "version": version, "placements": placements,
                                   "stops": [list(s) for s in stops]})


def test_apply_plan_places_and_rechecks_at_apply_time():
    state = founded(2)
    sitestate.apply(state, cmd("submit_app", spec=APP))
    n1, n2 = sorted(state.nodes)
    result = sitestate.apply(state, plan_cmd([{"alloc_id": "a0", "replica": 0, "node_id": n1},
                                              {"alloc_id": "a1", "replica": 1, "node_id": n2}]))
    assert result["placed"] == ["a0", "a1"]
    # a stale plan (the node went down in between) is refused at apply time
    sitestate.apply(state, cmd("set_liveness", node_id=n2, liveness="down", reason="test"))
    assert state.allocs["a1"].state == "lost"
    stale = sitestate.apply(state, plan_cmd([{"alloc_id": "a2", "replica": 1, "node_id": n2}]))
    assert stale["placed"] == [] and stale["refused"]
    # a duplicate of an accepted placement is refused too
    dup = sitestate.apply(state, plan_cmd([{"alloc_id": "a3", "replica": 0, "node_id": n1}]))
    assert dup["placed"] == []
    reused_id = sitestate.apply(state, plan_cmd([{"alloc_id": "a0", "replica": 1, "node_id": n1}]))
    assert not reused_id.ok


def test_heartbeat_reports_update_allocations_of_that_node_only():
    state = founded(2)
    sitestate.apply(state, cmd("submit_app", spec=APP))
    n1, n2 = sorted(state.nodes)
    sitestate.apply(state, plan_cmd([{"alloc_id": "a0", "replica": 0, "node_id": n1}]))
    report = {"alloc_id": "a0", "state": "running", "pid": 42, "restarts": 0, "exit_code": None, "reason": ""}
    sitestate.apply(state, cmd("heartbeat", node_id=n2, seq=5, reports=[report]))
    assert state.allocs["a0"].state == "pending"  # n2 does not hold a0
    sitestate.apply(state, cmd("heartbeat", node_id=n1, seq=5, reports=[report]))
    assert state.allocs["a0"].state == "running" and state.allocs["a0"].pid == 42


def test_a_replicas_health_is_kept_while_it_runs_and_turning_unhealthy_is_an_event():
    state = founded(1)
    sitestate.apply(state, cmd("submit_app", spec=APP))
    (n1,) = state.nodes
    sitestate.apply(state, plan_cmd([{"alloc_id": "a0", "replica": 0, "node_id": n1}]))
    report = {"alloc_id": "a0", "state": "running", "pid": 42, "restarts": 0, "exit_code": None, "reason": ""}
    sitestate.apply(state, cmd("heartbeat", node_id=n1, seq=5, reports=[report | {"health": "healthy"}]))
    assert state.allocs["a0"].health == "healthy"
    sick = report | {"health": "unhealthy", "reason": "unhealthy: 3 consecutive http checks failed"}
    sitestate.apply(state, cmd("heartbeat", node_id=n1, seq=6, reports=[sick]))
    assert state.allocs["a0"].health == "unhealthy"
    assert state.events[-1].message == "web replica 0 on n1 is unhealthy (unhealthy: 3 consecutive http checks failed)"
    # not running: no health, whatever the report says
    sitestate.apply(state, cmd("heartbeat", node_id=n1, seq=7, reports=[sick | {"state": "pending", "pid": None}]))
    assert state.allocs["a0"].health == "none"
    bad = sitestate.apply(state, cmd("heartbeat", node_id=n1, seq=8, reports=[report | {"health": "great"}]))
    assert not bad.ok and "unknown health 'great'" in bad.text


def test_a_replica_its_nodes_meshd_stopped_is_replaced_while_one_that_exited_keeps_covering():
    """A node that stopped a replica the site still wants (a stale view on that node) must not
    leave the app short for good: that replica no longer covers and reconcile replaces it.
    A workload's own exit (its restart policy decided) keeps covering."""
    from meshd.reconcile import reconcile
    state = founded(2)
    sitestate.apply(state, cmd("submit_app", spec=APP))
    n1, n2 = sorted(state.nodes)
    sitestate.apply(state, plan_cmd([{"alloc_id": "a0", "replica": 0, "node_id": n1},
                                     {"alloc_id": "a1", "replica": 1, "node_id": n2}]))
    stopped = {"alloc_id": "a0", "state": "stopped", "pid": None, "restarts": 0, "exit_code": -15,
               "reason": "no longer assigned to this node; killed by SIGTERM", "stopped_by_meshd": True}
    exited = {"alloc_id": "a1", "state": "stopped", "pid": None, "restarts": 0, "exit_code": 0,
              "reason": "exited with code 0"}
    assert sitestate.apply(state, cmd("heartbeat", node_id=n1, seq=5, reports=[stopped])).ok
    assert sitestate.apply(state, cmd("heartbeat", node_id=n2, seq=5, reports=[exited])).ok
    assert state.allocs["a0"].desired == "stop" and "while the site still wanted it" in state.allocs["a0"].reason
    assert state.allocs["a1"].desired == "run"
    assert reconcile(state).place == {"web": (0,)}


def test_node_down_marks_its_allocations_lost_and_late_reports_do_not_revive_them():
    state = founded(2)
    sitestate.apply(state, cmd("submit_app", spec=APP))
    n1, _ = sorted(state.nodes)
    sitestate.apply(state, plan_cmd([{"alloc_id": "a0", "replica": 0, "node_id": n1}]))
    sitestate.apply(state, cmd("set_liveness", node_id=n1, liveness="down", reason="missed lease"))
    sitestate.apply(state, cmd("heartbeat", node_id=n1, seq=9, reports=[
        {"alloc_id": "a0", "state": "running", "pid": 1, "restarts": 0, "exit_code": None, "reason": ""}]))
    assert state.allocs["a0"].state == "lost" and state.allocs["a0"].desired == "stop"


def test_stop_app_and_drain():
    state = founded(2)
    sitestate.apply(state, cmd("submit_app", spec=APP))
    n1, n2 = sorted(state.nodes)
    sitestate.apply(state, plan_cmd([{"alloc_id": "a0", "replica": 0, "node_id": n1}]))
    result = sitestate.apply(state, cmd("stop_app", app="web"))
    assert result["allocs"] == ["a0"] and state.allocs["a0"].desired == "stop"
    assert state.apps["web"].status == "stopped"
    drained = sitestate.apply(state, cmd("drain", node="n2"))
    assert drained["state"] == "draining"
    assert sitestate.apply(state, cmd("undrain", node="n2"))["state"] == "ready"


def test_purge_forgets_only_stopped_apps_past_their_retention_whose_allocations_ended():
    state = founded(2)
    n1, _ = sorted(state.nodes)
    for name in ("web", "db", "old"):
        spec = {"app": {"name": name, "replicas": 1, "command": ["sleep", "100"]}}
        assert sitestate.apply(state, cmd("submit_app", spec=spec)).ok
        assert sitestate.apply(state, plan_cmd([{"alloc_id": f"{name}0", "replica": 0, "node_id": n1}]) | {
            "plan": {"app": name, "version": 1, "placements": [
                {"alloc_id": f"{name}0", "replica": 0, "node_id": n1}], "stops": []}}).ok
    sitestate.apply(state, cmd("heartbeat", node_id=n1, seq=5, reports=[
        {"alloc_id": f"{a}0", "state": "running", "pid": 1, "restarts": 0, "exit_code": None, "reason": ""}
        for a in ("web", "db", "old")]))
    assert sitestate.apply(state, cmd("stop_app", ts=T0 + 10, app="old")).ok
    assert sitestate.apply(state, cmd("stop_app", ts=T0 + 10, app="db")).ok
    sitestate.apply(state, cmd("heartbeat", node_id=n1, seq=6, reports=[  # old's replica ended, db's not yet
        {"alloc_id": "old0", "state": "stopped", "pid": None, "restarts": 0, "exit_code": 0, "reason": ""}]))
    before = copy.deepcopy(state.apps)
    early = sitestate.apply(state, cmd("purge_apps", ts=T0 + 30, apps=["old"], retention=60.0))
    assert early["purged"] == [] and early["kept"] == [["old", "stopped 20s ago, kept for 60s"]]
    assert state.apps == before
    result = sitestate.apply(state, cmd("purge_apps", ts=T0 + 100, apps=["old", "db", "web", "nope"],
                                        retention=60.0))
    assert result["purged"] == ["old"]
    assert result["kept"] == [["db", "an allocation has not ended yet"], ["web", "not stopped"],
                              ["nope", "no such app"]]
    assert "old" not in state.apps and "old0" not in state.allocs and set(state.apps) == {"web", "db"}
    for bad in ({"apps": [], "retention": 1}, {"apps": ["x"] * 501, "retention": 1}, {"apps": ["x"], "retention": -1}):
        assert sitestate.apply(state, cmd("purge_apps", **bad)).code == "malformed"


def test_a_site_under_churn_keeps_a_bounded_state():
    """One deploy and one stop of a new app every second for 100 simulated minutes, the
    leader placing, nodes reporting, stopped apps purged after a ten-minute retention: every
    part of the state stays bounded by what runs and by its fixed limits, not by what ran."""
    from meshd.commands import Envelope, encode
    from meshd.meshstate import TRIM_AUDIT_BATCH, apps_to_purge, audit_to_trim
    from meshd.node.effects import Commit
    from meshd.node.leading import LeaderView, Leading

    state = founded(3)
    ids = itertools.count()
    core = Leading(lease=1e9, new_alloc_id=lambda: f"x{next(ids)}")
    voters = tuple(n.raft_address for n in state.nodes.values())
    retention, sizes = 600.0, []
    for second in range(6000):
        ts = T0 + second
        name = f"app{second}"
        sitestate.apply(state, cmd("submit_app", ts=ts, request_id=f"d{second}", spec={
            "app": {"name": name, "replicas": 2, "command": ["sleep", "1"]}}))
        if second >= 5:
            sitestate.apply(state, cmd("stop_app", ts=ts, request_id=f"s{second}", app=f"app{second - 5}"))
        view = LeaderView(state=state, term=1, own_id=next(iter(state.nodes)), own_raft_address=voters[0],
                          configured=voters[1:], contacts=tuple((a, float(second)) for a in voters))
        for effect in core.step(view, float(second)):
            if isinstance(effect, Commit):
                sitestate.apply(state, encode(effect.command, Envelope(ts=ts)))
        for node_id in state.nodes:  # each node reports its replicas: running, or ended once stopped
            reports = [{"alloc_id": a.alloc_id, "state": "running" if a.desired == "run" else "stopped",
                        "pid": 1, "restarts": 0, "exit_code": 0, "reason": ""}
                       for a in state.allocs.on_node(node_id) if a.state not in ("stopped", "lost")]
            if reports:
                sitestate.apply(state, cmd("heartbeat", ts=ts, node_id=node_id, seq=second + 10, reports=reports))
        purge = apps_to_purge(state, ts, retention, lambda edit_id: True)
        if purge is not None:
            sitestate.apply(state, encode(purge, Envelope(ts=ts)))
        trim = audit_to_trim(state, ts, retention, lambda key: True, 0)  # the document holds it all
        if trim is not None:
            assert sitestate.apply(state, encode(trim, Envelope(ts=ts))).ok
        if second % 600 == 599:
            sizes.append((len(state.apps), len(state.allocs), len(state.mesh_edits), len(state.events),
                          len(state.audit), len(state.applied_requests), len(state.allocs._stamps),
                          len(pickle.dumps(state))))
    apps, allocs, _, events, audit, requests, stamps, _ = sizes[-1]
    assert apps <= retention + 10 and allocs <= 2 * apps and stamps <= apps
    assert events <= sitestate.MAX_EVENTS
    # the audit follows the retention (2 records a second), request ids their ten minutes
    assert audit <= 2 * retention + TRIM_AUDIT_BATCH + 2
    assert requests <= 2 * sitestate.REQUEST_MEMORY_S + 2
    # nothing grows once the events' cap is full (a thousand seconds here): the last hour
    # left the state as it was, and the snapshot within 1 %
    assert len({size[:-1] for size in sizes[-6:]}) == 1 and sizes[-1][-1] <= 1.01 * sizes[-6][-1]


def test_snapshot_round_trips_through_pickle():
    state = founded(3)
    sitestate.apply(state, cmd("submit_app", spec=APP))
    clone = pickle.loads(pickle.dumps(state))
    assert clone == state


ops = st.sampled_from(["heartbeat", "set_liveness", "submit_app", "stop_app", "drain", "undrain", "apply_plan",
                       "create_token", "admit_node"])


@st.composite
def commands(draw):
    op = draw(ops)
    ts = T0 + draw(st.integers(0, 1000))
    node_id = f"{draw(st.integers(1, 4)):032x}"
    fields = {
        "heartbeat": {"node_id": node_id, "seq": draw(st.integers(0, 10))},
        "set_liveness": {"node_id": node_id, "liveness": draw(st.sampled_from(["ready", "down"]))},
        "submit_app": {"spec": {"app": {"name": "web", "replicas": draw(st.integers(1, 4)), "command": ["x"]}}},
        "stop_app": {"app": "web"},
        "drain": {"node": f"n{draw(st.integers(1, 4))}"},
        "undrain": {"node": f"n{draw(st.integers(1, 4))}"},
        "apply_plan": {"plan": {"app": "web", "version": draw(st.integers(1, 3)), "placements": [
            {"alloc_id": f"a{draw(st.integers(0, 50))}", "replica": draw(st.integers(0, 4)), "node_id": node_id}],
            "stops": []}},
        "create_token": {"token_id": f"t{draw(st.integers(0, 5))}", "site": "s1", "secret": "ab" * 32,
                         "expires_at": ts + 10},
        "admit_node": {"token_id": f"t{draw(st.integers(0, 5))}", "node": node(draw(st.integers(5, 8)))},
    }[op]
    if draw(st.booleans()):
        fields["request_id"] = f"r{draw(st.integers(0, 20))}"
    return cmd(op, ts=ts, **fields)


@settings(max_examples=60, deadline=None)
@given(st.lists(commands(), max_size=40))
def test_any_command_sequence_is_deterministic_and_never_raises(sequence):
    a, b = founded(4), founded(4)
    results_a = [sitestate.apply(a, c) for c in sequence]
    results_b = [sitestate.apply(b, copy.deepcopy(c)) for c in sequence]
    assert results_a == results_b
    assert pickle.dumps(a) == pickle.dumps(b)
    # every live allocation sits on a known node, at most one live per (app, version, replica)
    live = [x for x in a.allocs.values() if x.live]
    assert all(x.node_id in a.nodes for x in live)
    keys = [(x.app, x.version, x.replica) for x in live]
    assert len(keys) == len(set(keys))


def test_rollout_stop_waits_until_the_replacement_counts_healthy():
    """An old replica's stop is held until its replacement is placed, running, and healthy
    for min_healthy_s (10 s by default), checked again when the plan is applied."""
    state = founded(1)
    sitestate.apply(state, cmd("submit_app", spec=APP))
    (n1,) = state.nodes
    sitestate.apply(state, plan_cmd([{"alloc_id": "old0", "replica": 0, "node_id": n1}]))
    sitestate.apply(state, cmd("submit_app", spec={"app": {**APP["app"], "command": ["sleep", "200"]}}))
    sitestate.apply(state, cmd("drain", node="n1"))  # no node left for the new version
    stop_old = [("old0", "replaced by version 2")]
    held = sitestate.apply(state, plan_cmd([{"alloc_id": "new0", "replica": 0, "node_id": n1}], version=2,
                                           stops=stop_old))
    assert held["placed"] == [] and held["stopped"] == []
    assert state.allocs["old0"].live
    sitestate.apply(state, cmd("undrain", node="n1"))
    placed = sitestate.apply(state, plan_cmd([{"alloc_id": "new0", "replica": 0, "node_id": n1}], version=2,
                                             stops=stop_old))
    assert placed["placed"] == ["new0"] and placed["stopped"] == []  # placed is not healthy
    assert sitestate.apply(state, cmd("heartbeat", ts=T0 + 1, node_id=n1, seq=2, reports=[
        {"alloc_id": "new0", "state": "running", "restarts": 0}])).ok
    assert state.allocs["new0"].healthy_at == T0 + 1
    early = sitestate.apply(state, cmd("apply_plan", ts=T0 + 5, plan={"app": "web", "version": 2, "placements": [],
                                                                       "stops": [list(s) for s in stop_old]}))
    assert early["stopped"] == [] and state.allocs["old0"].live
    done = sitestate.apply(state, cmd("apply_plan", ts=T0 + 11, plan={"app": "web", "version": 2, "placements": [],
                                                                      "stops": [list(s) for s in stop_old]}))
    assert done["stopped"] == ["old0"]


def test_secret_rotations_get_unique_increasing_epochs():
    state = SiteState(site="s1")
    epochs = [sitestate.apply(state, {"op": "rotate_secret", "ts": 1.0 + i, "request_id": f"r{i}"})["epoch"]
              for i in range(3)]
    assert epochs == [1, 2, 3] and state.secret_epoch == 3
    # a retried rotation (same request id) is answered, not applied twice
    assert sitestate.apply(state, {"op": "rotate_secret", "ts": 9.0, "request_id": "r2"})["epoch"] == 3
    assert state.secret_epoch == 3


def with_founder_token(nodes: int = 1, site: str = "beta") -> SiteState:
    """Site s1 holding token "nb", which lets its holder found `site`."""
    state = founded(nodes)
    assert sitestate.apply(state, cmd("create_token", token_id="nb", site=site, secret="cd" * 32,
                                      expires_at=T0 + 10)).ok
    return state


def test_found_site_consumes_the_token_once_and_adds_no_member():
    state = with_founder_token()
    nodes_before = copy.deepcopy(state.nodes)
    result = sitestate.apply(state, cmd("found_site", ts=T0 + 1, token_id="nb", node=node(7, site="beta"),
                                        actor="op@n1"))
    assert result.to_wire() == {"ok": True, "site": "beta", "node_id": f"{7:032x}"}
    assert state.nodes == nodes_before and state.site == "s1"
    assert state.tokens["nb"].used_by == f"{7:032x}"
    audit = state.audit[-1]
    assert (audit.action, audit.target, audit.site, audit.actor) == ("found-site", "beta", "s1", "op@n1")
    assert state.events[-1].kind == "membership" and "founds site beta" in state.events[-1].message
    # the same founder asking again (its welcome was lost) is answered and changes nothing
    audits = len(state.audit)
    again = sitestate.apply(state, cmd("found_site", ts=T0 + 2, token_id="nb", node=node(7, site="beta")))
    assert again.ok and len(state.audit) == audits and state.nodes == nodes_before


def _use_token(state: SiteState) -> None:
    assert sitestate.apply(state, cmd("found_site", ts=T0 + 1, token_id="nb", node=node(7, site="beta"))).ok


def _revoke_n2(state: SiteState) -> None:
    state.nodes[f"{2:032x}"] = dataclasses.replace(state.nodes[f"{2:032x}"], admin="revoked")


def _own_site_token(state: SiteState) -> None:
    assert sitestate.apply(state, cmd("create_token", token_id="own", site="s1", secret="cd" * 32,
                                      expires_at=T0 + 10)).ok


@pytest.mark.parametrize("name, prepare, command, reason", [
    ("used by another founder", _use_token,
     cmd("found_site", ts=T0 + 2, token_id="nb", node=node(8, site="beta")), "already used"),
    ("expired", None, cmd("found_site", ts=T0 + 10, token_id="nb", node=node(8, site="beta")), "expired"),
    ("unknown token", None, cmd("found_site", token_id="zz", node=node(8, site="beta")), "unknown join token"),
    ("revoked node", _revoke_n2, cmd("found_site", token_id="nb", node=node(2, site="beta")), "revoked"),
    ("a member of this site", None, cmd("found_site", token_id="nb", node=node(1, site="beta")),
     "belongs to one site"),
    ("token for another site", None, cmd("found_site", token_id="nb", node=node(8, site="gamma")),
     "token is for site 'beta', not 'gamma'"),
    ("this site's own token", _own_site_token, cmd("found_site", token_id="own", node=node(8, site="s1")),
     "it founds none"),
    ("no node", None, cmd("found_site", token_id="nb"), "node must be"),
])
def test_found_site_refusals_change_nothing(name, prepare, command, reason):
    state = with_founder_token(nodes=2)
    if prepare is not None:
        prepare(state)
    before = copy.deepcopy(state)
    result = sitestate.apply(state, command)
    assert not result.ok and reason in result.text, result
    assert state.nodes == before.nodes and state.tokens == before.tokens and state.audit == before.audit


def test_found_site_refuses_a_bad_site_name():
    state = with_founder_token(site="Not_A_Name")
    result = sitestate.apply(state, cmd("found_site", token_id="nb", node=node(8, site="Not_A_Name")))
    assert not result.ok and "site name must be" in result.text
    assert state.tokens["nb"].used_by is None


def test_removing_a_down_voter_promotes_the_longest_standing_ready_non_voter():
    state = founded(7)  # five voters, two non-voters (n6 joined before n7)
    gone, n6, n7 = f"{3:032x}", f"{6:032x}", f"{7:032x}"
    up = sitestate.apply(state, cmd("remove_node", node="n3", actor="op"))
    assert not up.ok and up.code == "conflict" and "is up (ready): stop its meshd first" in up.text
    assert sitestate.apply(state, cmd("set_liveness", node_id=gone, liveness="down")).ok
    removed = sitestate.apply(state, cmd("remove_node", node="n3", actor="op"))
    assert removed.ok and removed["promoted"] == n6
    assert state.nodes[gone].state == "left" and not state.nodes[gone].voter
    assert state.nodes[n6].voter and not state.nodes[n7].voter
    assert sum(1 for n in state.nodes.values() if n.voter and n.admin != "left") == sitestate.MAX_VOTERS
    assert state.audit[-1].action == "node-remove" and state.audit[-1].target == "n3"
    again = sitestate.apply(state, cmd("remove_node", node="n3", actor="op"))  # a retry: the same, no second promotion
    assert again.ok and again["promoted"] is None and not state.nodes[n7].voter
    # not a revocation: the node may join again with a fresh token
    assert sitestate.apply(state, cmd("create_token", token_id="back", site="s1", secret="ab" * 32,
                                      expires_at=T0 + 100)).ok
    assert sitestate.apply(state, cmd("admit_node", token_id="back", node=node(3))).ok


def test_a_removed_nodes_replicas_do_not_count_and_nothing_is_promoted_without_a_ready_non_voter():
    from meshd.reconcile import reconcile
    state = founded(3)
    n1, n2, _n3 = sorted(state.nodes)
    sitestate.apply(state, cmd("submit_app", spec=APP))
    sitestate.apply(state, plan_cmd([{"alloc_id": "a0", "replica": 0, "node_id": n2},
                                     {"alloc_id": "a1", "replica": 1, "node_id": n1}]))
    sitestate.apply(state, cmd("set_liveness", node_id=n2, liveness="down"))
    removed = sitestate.apply(state, cmd("remove_node", node="n2", actor="op"))
    assert removed.ok and removed["promoted"] is None
    assert reconcile(state).place == {"web": (0,)}


@pytest.mark.parametrize("prepare, ref, reason", [
    (lambda s: None, "nobody", "no member named 'nobody'"),
    (lambda s: s.nodes.update({f"{1:032x}": dataclasses.replace(s.nodes[f"{1:032x}"], liveness="down")}), "n1",
     "the site's last voter"),
])
def test_node_remove_refusals_change_nothing(prepare, ref, reason):
    state = founded(1)
    prepare(state)
    before = copy.deepcopy(state.nodes)
    refused = sitestate.apply(state, cmd("remove_node", node=ref, actor="op"))
    assert not refused.ok and reason in refused.text and state.nodes == before


def test_events_are_numbered_so_a_follower_sees_new_ones_once_the_history_is_full():
    from meshd.state import events_after
    state = founded(1)
    for i in range(sitestate.MAX_EVENTS + 10):
        sitestate._event(state, T0 + i, "node", f"e{i}")
    assert len(state.events) == sitestate.MAX_EVENTS  # capped: its length no longer moves
    seen = state.event_seq
    sitestate._event(state, T0 + 9999, "node", "news")
    assert [e.message for e in events_after(state.events, seen)] == ["news"]
    assert events_after(state.events, state.event_seq) == []
    assert [e.seq for e in state.events] == sorted(e.seq for e in state.events)


# --- versions, history and deployments -------------------------------------------------------

def _spec(tag: str, **update) -> dict:
    app = {**APP["app"], "command": ["sleep", tag]}
    if update:
        app["update"] = update
    return {"app": app}


def _submit(state, tag, ts=T0, **update):
    result = sitestate.apply(state, cmd("submit_app", ts=ts, spec=_spec(tag, **update), actor="op"))
    assert result.ok, result
    return result


def test_every_changed_spec_is_a_version_with_its_deployment_and_history_entry():
    state = founded(1)
    _submit(state, "1")
    _submit(state, "2", ts=T0 + 1)
    record = state.apps["web"]
    assert [e.version for e in record.history] == [1, 2] and record.latest_version == 2
    assert record.spec_of(1).command == ("sleep", "1") and record.spec_of(2).command == ("sleep", "2")
    first, second = record.deployments
    assert (first.state, first.reason) == ("cancelled", "replaced by version 2")  # it never finished
    assert (second.version, second.from_version, second.state) == (2, 1, "running")
    assert record.history[0].state == "superseded" and record.history[1].state == "running"
    assert record.history[1].digest == specmod.spec_digest(record.spec) and record.history[1].by == "op"


def test_the_history_keeps_the_last_versions_and_the_pinned_and_stable_ones():
    state = founded(1)
    _submit(state, "1", keep_versions=2)
    assert sitestate.apply(state, cmd("rollout", app="web", version=1, action="succeed", reason="ok")).ok
    assert sitestate.apply(state, cmd("pin_version", app="web", version=1, pinned=True, actor="op")).ok
    for v in range(2, 6):
        _submit(state, str(v), ts=T0 + v, keep_versions=2)
    record = state.apps["web"]
    assert [e.version for e in record.history] == [1, 4, 5]  # pinned (and stable) v1, then the last two
    refused = sitestate.apply(state, cmd("pin_version", app="web", version=2, actor="op"))
    assert refused.code == cmds.NOT_FOUND and "v2 was forgotten" in refused.text
    assert "has no version 9" in sitestate.apply(state, cmd("pin_version", app="web", version=9)).text


def test_a_deployment_move_for_another_version_or_that_does_not_apply_is_refused_and_changes_nothing():
    state = founded(1)
    _submit(state, "1")
    before = copy.deepcopy(state.apps)
    for fields, words in [
        ({"version": 7, "action": "pause"}, "web v7 is not its current deployment"),
        ({"version": 1, "action": "promote"}, "has no canaries waiting for promotion"),
        ({"version": 1, "action": "resume"}, "is not paused (it is running)"),
        ({"version": 1, "action": "cancel"}, "has no stable version to return to"),
        ({"version": 1, "action": "fly"}, "action must be one of"),
    ]:
        result = sitestate.apply(state, cmd("rollout", app="web", actor="op", **fields))
        assert not result.ok and words in result.text, (fields, result)
    assert state.apps == before


def test_a_failed_deployment_returns_to_the_stable_version_without_a_new_version():
    state = founded(1)
    _submit(state, "1")
    sitestate.apply(state, cmd("rollout", app="web", version=1, action="succeed", reason="ok"))
    _submit(state, "2", ts=T0 + 1)
    result = sitestate.apply(state, cmd("rollout", ts=T0 + 2, app="web", version=2, action="fail",
                                        reason="replica 0 not healthy within 300s", actor="meshd (site leader)"))
    assert result.ok and result["state"] == "reverted" and result["to_version"] == 1
    record = state.apps["web"]
    assert record.version == 1 and record.spec.command == ("sleep", "1") and record.latest_version == 2
    assert [(e.version, e.state) for e in record.history] == [(1, "stable"), (2, "reverted")]
    assert record.history[1].reason == "replica 0 not healthy within 300s"
    assert record.deployment.revert and record.deployment.from_version == 2
    assert state.audit[-1].action == "revert" and state.audit[-1].target == "web v2 -> v1"
    # The next deploy is v3, never a second v2.
    assert _submit(state, "3", ts=T0 + 3)["site_version"] == 3


def test_without_auto_revert_a_failed_deployment_stays_failed():
    state = founded(1)
    _submit(state, "1")
    sitestate.apply(state, cmd("rollout", app="web", version=1, action="succeed", reason="ok"))
    _submit(state, "2", ts=T0 + 1, auto_revert=False)
    result = sitestate.apply(state, cmd("rollout", ts=T0 + 2, app="web", version=2, action="fail", reason="bad"))
    assert result["state"] == "failed" and state.apps["web"].version == 2
    assert state.apps["web"].history[-1].state == "failed"


def test_a_rollback_to_an_equal_spec_lets_its_running_replicas_hold_their_places():
    state = founded(1)
    _submit(state, "1")
    _submit(state, "2", ts=T0 + 1)
    _submit(state, "1", ts=T0 + 2)  # v1's spec again, as v3
    record = state.apps["web"]
    assert record.version == 3 and record.same_spec == (1,) and record.runs(1) and not record.runs(2)


def test_stopping_an_app_ends_its_deployment():
    state = founded(1)
    _submit(state, "1")
    sitestate.apply(state, cmd("stop_app", app="web", actor="op"))
    assert state.apps["web"].deployment.state == "cancelled"


def test_a_report_stamps_when_a_replica_became_healthy_and_when_it_fell_ill():
    state = founded(1)
    _submit(state, "1")
    (n1,) = state.nodes
    sitestate.apply(state, plan_cmd([{"alloc_id": "x0", "replica": 0, "node_id": n1}]))
    assert state.allocs["x0"].unhealthy_since == T0

    def report(ts, seq, **fields):
        assert sitestate.apply(state, cmd("heartbeat", ts=ts, node_id=n1, seq=seq, reports=[
            {"alloc_id": "x0", "state": "running", "restarts": 0, **fields}])).ok
        return state.allocs["x0"]

    assert report(T0 + 1, 2, health="checking").healthy_at == 0.0
    assert report(T0 + 2, 3, health="healthy").healthy_at == T0 + 2
    ill = report(T0 + 3, 4, health="unhealthy")
    assert (ill.healthy_at, ill.unhealthy_since) == (0.0, T0 + 3)


def test_a_leaders_decision_committed_in_a_later_term_than_it_was_made_in_changes_nothing():
    state = founded(2)
    n2 = f"{2:032x}"
    before = copy.deepcopy(state)
    stale = cmd("set_liveness", node_id=n2, liveness="down", reason="lease ran out", term=3, request_id="r1")
    result = sitestate.apply(state, stale, entry_term=4)  # the old leader's, committed by the new one
    assert result.code == cmds.FENCED and "term 3" in result.text and "term 4" in result.text
    assert state.nodes == before.nodes and state.applied == before.applied + 1
    assert sitestate.apply(state, dict(stale, request_id="r2"), entry_term=3).ok  # its own term: applied
    assert state.nodes[n2].liveness == "down"
    # a command that is no leader's decision carries no term and is never fenced
    assert sitestate.apply(state, cmd("set_liveness", node_id=n2, liveness="ready"), entry_term=9).ok
    for bad in ("3", -1, True, 2**60):
        assert sitestate.apply(state, dict(stale, term=bad), entry_term=1).code == cmds.MALFORMED


def test_a_members_clock_skew_is_recorded_from_its_re_attestation_and_cleared_by_the_next():
    state = founded(2)
    n2 = f"{2:032x}"
    assert sitestate.apply(state, cmd("attested", node_id=n2, boot_id="b1", clock_skew=3600.2)).ok
    assert state.nodes[n2].clock_skew_s == 3600.2 and state.nodes[n2].liveness == "ready"
    assert sitestate.apply(state, cmd("attested", node_id=n2, boot_id="b1")).ok  # in step again
    assert state.nodes[n2].clock_skew_s == 0.0
    assert sitestate.apply(state, cmd("attested", node_id=n2, boot_id="b1", clock_skew=1e12)).code == cmds.MALFORMED


def test_a_checkpoint_finds_a_member_whose_history_differs_from_the_leaders():
    leader, follower, other = SiteState(), SiteState(), SiteState()
    entries = [pickle.dumps(cmd("create_token", token_id=f"t{i}", site="s1", secret="ab" * 32, expires_at=T0 + 100))
               for i in range(5)]
    for state in (leader, follower, other):
        for n, entry in enumerate(entries):
            # `other` applied another entry at the third place of the log (a lost, re-written entry)
            raw = entries[0] if state is other and n == 2 else entry
            sitestate.apply(state, pickle.loads(raw), entry=raw)
    assert leader.chain == follower.chain != other.chain and len(leader.chain) == cmds.CHAIN_BYTES
    checkpoint = cmd("checkpoint", applied=4, chain=dict(leader.recent_chains)[4].hex())
    assert sitestate.apply(follower, checkpoint).fields == {"compared": True, "same": True} and not follower.diverged
    assert sitestate.apply(other, checkpoint).fields == {"compared": True, "same": False}
    assert "after 4 log entries" in other.diverged
    # a point this member holds no digest of (before its snapshot, or long ago): nothing said
    assert sitestate.apply(follower, cmd("checkpoint", applied=0, chain="00" * 16)).fields == {"compared": False}
    # the digests kept are bounded
    for n in range(200):
        sitestate.apply(leader, cmd("rotate_secret"), entry=b"%d" % n)
    assert len(leader.recent_chains) == 64
