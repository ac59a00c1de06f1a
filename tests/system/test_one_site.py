"""One site of real daemons on loopback: formation by mDNS, placement, failover, restart.

Each daemon is a separate `meshd run` process; they find each other by real mDNS packets on
the loopback interface (no --peer) and agree through a real pysyncobj cluster.
"""

from __future__ import annotations

import collections
import os

import psutil
import pytest

from meshd.io.admin import AdminError
from meshd.io.localsite import wait_for

pytestmark = pytest.mark.system


def app_toml(name: str = "web", replicas: int = 6, command: str = '["sleep", "3600"]', extra: str = "") -> str:
    return f'[app]\nname = "{name}"\nreplicas = {replicas}\ncommand = {command}\n{extra}'


def deploy(node, text: str, **kwargs):
    return node.call("deploy", spec_toml=text, wait=kwargs.pop("wait", False), timeout=kwargs.pop("timeout", None),
                     **kwargs)


def running_by_node(site, app: str) -> collections.Counter:
    return collections.Counter(a["node"] for a in site.running(app))


def test_three_daemons_form_a_site_by_mdns_and_spread_six_replicas(three):
    leader = three.leader()
    assert leader is not None
    nodes = leader.call("nodes", site=None)
    assert sorted(n["name"] for n in nodes) == ["t-1", "t-2", "t-3"]
    assert all(n["state"] == "ready" for n in nodes)
    # every member was attested at its join; software evidence is labelled as self-reported
    assert all(n["evidence"] == "software-only (self-reported)" and n["attested_s_ago"] is not None for n in nodes)
    assert sorted(n["role"] for n in nodes) == ["follower", "follower", "leader"]
    for node in three.nodes:  # every member sees the same site
        status = node.call("status")
        assert status["members"] == 3 and status["partitioned"] is False and status["leader"] == leader.name

    follower = next(n for n in three.nodes if n is not leader)
    result = deploy(follower, app_toml(), wait=True, timeout=30)  # forwarded to the leader
    assert result["accepted"] and result["running"] == 6
    assert running_by_node(three, "web") == {"t-1": 2, "t-2": 2, "t-3": 2}
    # the processes are real and in their own process groups
    for alloc in three.running("web"):
        proc = psutil.Process(alloc["pid"])
        assert proc.is_running() and os.getpgid(alloc["pid"]) == alloc["pid"]
    apps = leader.call("apps")
    assert [{k: row[k] for k in ("app", "version", "status", "replicas", "running", "sites")} for row in apps] == \
        [{"app": "web", "version": 1, "status": "running", "replicas": 6, "running": 6, "sites": ["lab"]}]
    assert apps[0]["per_site"] == [{"site": "lab", "current": True, "running": 6, "desired": 6}]


def test_sigkill_of_a_non_leader_moves_its_allocations(three):
    leader = three.leader()
    deploy(leader, app_toml(), wait=True, timeout=30)
    victim = next(n for n in three.nodes if n is not leader)
    before = max(e["ts"] for e in leader.call("events", follow=False))
    heard = leader.call("status")["heard_s_ago"]  # what each member's lease counts from
    assert set(heard) == {n.name for n in three.nodes if n is not leader} and max(heard.values()) < 1.0
    victim.kill()
    wait_for(lambda: three.node_state(victim.name, via=leader) == "down", 10, what="victim marked down")
    wait_for(lambda: len(three.running("web", via=leader)) == 6 and victim.name not in running_by_node(three, "web"),
             15, what="replacements running")
    events = leader.call("events", follow=False)
    assert any(e["kind"] == "node" and victim.name in e["message"] and "down" in e["message"] for e in events)
    assert leader.call("status")["heard_s_ago"][victim.name] > 1.0
    # --since resumes after the last event seen: only what happened since, the down among it.
    newer = leader.call("events", follow=False, since=before)
    assert newer and all(e["ts"] > before for e in newer) and len(newer) < len(events)
    assert any(e["kind"] == "node" and victim.name in e["message"] and "down" in e["message"] for e in newer)
    # --after-seq resumes by the site's event numbers: exactly the replicated events after it.
    numbered = [e for e in events if "seq" in e]
    middle = numbered[len(numbered) // 2]["seq"]
    resumed = leader.call("events", follow=False, after_seq=middle)
    assert [e["seq"] for e in resumed] == [e["seq"] for e in numbered if e["seq"] > middle]
    with pytest.raises(AdminError, match="no event numbered"):
        leader.call("events", follow=False, after_seq=numbered[-1]["seq"] + 1000)
    # filters: the kinds, app and node asked for, nothing else
    about_victim = leader.call("events", follow=False, kinds=["node"], node=victim.name)
    assert about_victim and all(e["kind"] == "node" and e["node"] == victim.name for e in about_victim)
    assert any("down" in e["message"] for e in about_victim)
    placed = leader.call("events", follow=False, kinds=["placement"], app="web")
    assert placed and all(e["kind"] == "placement" and e["app"] == "web" for e in placed)
    with pytest.raises(AdminError, match="--kind"):
        leader.call("events", follow=False, kinds="node")


def test_sigkill_of_the_leader_elects_a_new_one_and_deploys_still_work(three):
    old = three.leader()
    deploy(old, app_toml(replicas=3), wait=True, timeout=30)
    old.kill()
    new = three.wait_leader(timeout=15, exclude=old)
    assert new is not old
    result = deploy(new, app_toml(name="after", replicas=2), wait=True, timeout=30)
    assert result["accepted"] and result["running"] == 2
    # the acknowledged app from before the failover survived it
    assert {a["app"] for a in new.call("apps")} == {"web", "after"}
    wait_for(lambda: len(three.running("web", via=new)) == 3, 15, what="web back to 3 replicas")


def test_a_node_restarted_while_all_others_are_down_restarts_its_workloads(three):
    leader = three.leader()
    deploy(leader, app_toml(replicas=3), wait=True, timeout=30)
    survivor = three.nodes[2]
    before = {a["alloc_id"] for a in three.running("web") if a["node"] == survivor.name}
    assert before
    for node in three.nodes:
        node.kill()
    survivor.start()  # same data dir; no peer is reachable
    wait_for(lambda: survivor.try_call("status"), 15, what="survivor answering")
    status = survivor.call("status")
    assert status["partitioned"] is True

    def restarted():
        # (refused for a moment after the start, while it replays its journal)
        allocs = survivor.try_call("allocs", app="web", node=survivor.name)
        return allocs is not None and {a["alloc_id"] for a in allocs} == before \
            and len(survivor_pids(survivor)) == len(before)
    wait_for(restarted, 15, what="workloads restarted from local state")
    assert len(survivor_pids(survivor)) == len(before)


def survivor_pids(node) -> list[int]:
    pids = []
    for alloc_dir in (node.data_dir / "allocs").glob("*"):
        pgid_file = alloc_dir / "pgid"
        if pgid_file.exists():
            try:
                pgid = int(pgid_file.read_text())
                os.killpg(pgid, 0)
                pids.append(pgid)
            except (ValueError, OSError):
                pass
    return pids


def test_deploy_without_quorum_is_refused_and_changes_nothing(three):
    leader = three.leader()
    others = [n for n in three.nodes if n is not leader]
    for node in others:
        node.kill()
    wait_for(lambda: leader.call("status")["partitioned"], 10, what="leader to notice it lost quorum")
    with pytest.raises(AdminError, match="no quorum"):
        deploy(leader, app_toml(name="lonely", replicas=1))
    assert all(a["app"] != "lonely" for a in leader.call("apps"))


def test_drain_moves_work_off_a_node_and_logs_come_from_any_member(three):
    leader = three.leader()
    deploy(leader, app_toml(name="echo", replicas=3, command='["sh", "-c", "echo hello-$MESHD_ALLOC_ID; sleep 3600"]'),
           wait=True, timeout=30)
    target = next(n for n in three.nodes if n is not leader)
    assert leader.call("drain", node=target.name)["state"] == "draining"
    wait_for(lambda: target.name not in running_by_node(three, "echo") and len(three.running("echo")) == 3,
             15, what="allocations moved off the drained node")
    remote = next(a for a in three.running("echo") if a["node"] != leader.name)
    text = wait_for(lambda: leader.call("logs", alloc=remote["alloc_id"], follow=False, tail=None)["data"], 10,
                    what="remote logs")
    assert f"hello-{remote['alloc_id']}" in text
    assert leader.call("undrain", node=target.name)["state"] == "ready"


def test_stop_removes_every_allocation(three):
    leader = three.leader()
    deploy(leader, app_toml(replicas=3), wait=True, timeout=30)
    pids = [a["pid"] for a in three.running("web")]
    assert leader.call("stop", app="web")["stopped"] is True
    wait_for(lambda: not three.running("web") and not any(psutil.pid_exists(p) for p in pids), 15,
             what="all replicas stopped")


def test_sigterm_stops_the_daemon_and_its_workloads_cleanly(make_site):
    site = make_site()
    node = site.found()
    deploy(node, app_toml(replicas=2), wait=True, timeout=30)
    pids = [a["pid"] for a in site.running("web")]
    assert node.terminate() == 0
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    assert not os.path.exists(node.socket)


def test_redeploying_the_running_spec_changes_nothing_and_says_so(three):
    leader = three.leader()
    first = deploy(leader, app_toml(replicas=2), wait=True, timeout=30)
    assert first["changed"] is True
    pids = sorted((a["alloc_id"], a["pid"]) for a in three.running("web", via=leader))

    def edits() -> int:
        from crdt.schema import AppEdit
        return leader.call("document", since=None, brief=False, compact=False)["records"][AppEdit.ROOT]
    written = edits()
    again = deploy(leader, app_toml(replicas=2), wait=True, timeout=30)
    assert again["changed"] is False and again["version"] == first["version"] and again["running"] == 2
    assert sorted((a["alloc_id"], a["pid"]) for a in three.running("web", via=leader)) == pids
    assert edits() == written  # nothing written to the mesh document either
    changed = deploy(leader, app_toml(replicas=3), wait=True, timeout=30)
    assert changed["changed"] is True and changed["version"] > first["version"]
