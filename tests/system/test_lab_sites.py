"""Several sites of one mesh in the lab (tests.lab): each site its own segment and Raft group,
the router between them; the second and third sites founded inside the mesh with a founder
token and `--peer`. Sites are cut apart at the router, change things on both sides, and must
converge after the link returns: the same apps (winners and conflict losers), the same audit,
and no workload ever stopped because another site vanished.

Workload counts are read from real processes (psutil) as well as from the sites' state.
"""

from __future__ import annotations

import json
import time

import pytest

from meshd.io.localsite import wait_for

pytestmark = pytest.mark.system

# Fast sync for tests: state vectors every second; a silent session is dropped after 2.5 s.
FAST_SYNC = ("--sync-interval", "1")
CONVERGE_TIMEOUT = 30.0


def spec(name: str, replicas: int, sites: list[str]) -> str:
    listed = ", ".join(f'"{s}"' for s in sites)
    return f'[app]\nname = "{name}"\nreplicas = {replicas}\ncommand = ["sleep", "3600"]\nsites = [{listed}]\n'


def deploy(lab, host: str, name: str, replicas: int, sites: list[str]) -> dict:
    return lab.call(host, "deploy", spec_toml=spec(name, replicas, sites), wait=False, timeout=30)


def running_here(lab, host: str, name: str) -> int:
    """Replicas of `name` running in `host`'s site, from that site's Raft state."""
    return sum(1 for a in lab.call(host, "allocs", app=name, node=None)
               if a["state"] == "running" and a["desired"] == "run")


def apps_view(lab, host: str) -> dict:
    """What every replica must agree on: each app's winning edit, and whether it is a stop
    (not how it runs, which each site sees first for itself)."""
    return {row["app"]: (row["version"], row.get("edit_id"), row["status"] == "stopped")
            for row in lab.call(host, "apps", all=True)}


def audit_ids(lab, host: str) -> set:
    return {row["audit_id"] for row in lab.call(host, "audit")}


def conflicts(lab, host: str) -> set:
    return {(e["app"], e["winner"], e["loser"]) for e in lab.call(host, "events", follow=False)
            if e["kind"] == "conflict"}


def processes(lab, hosts) -> int:
    return sum(lab.workload_processes(h) for h in hosts)


def sites_row(lab, host: str, site: str) -> dict | None:
    return next((r for r in lab.call(host, "sites") if r["site"] == site), None)


def converged(lab, hosts) -> bool:
    views = [(apps_view(lab, h), audit_ids(lab, h), conflicts(lab, h)) for h in hosts]
    return all(v == views[0] for v in views)


@pytest.fixture
def two_sites(make_lab):
    lab = make_lab({"a": 2, "b": 2}, meshd_args=FAST_SYNC)
    lab.start_site("a")
    lab.start_site_in_mesh("b", via="a-1")
    return lab


def test_a_site_founded_in_the_mesh_syncs_and_places_what_names_it(two_sites):
    lab = two_sites
    status_a, status_b = lab.call("a-1", "status"), lab.call("b-1", "status")
    assert status_a["site"] == "a" and status_b["site"] == "b"
    wait_for(lambda: (sites_row(lab, "a-2", "b") or {}).get("reachable")
             and (sites_row(lab, "b-2", "a") or {}).get("reachable"), 20, what="each site sees the other")
    row = sites_row(lab, "a-1", "b")
    assert row["nodes"] == 2 and row["ready"] == 2 and row["last_sync_s"] is not None
    # a site that has members is not founded a second time
    refused = lab.meshctl("a-2", "token", "create", "--site", "b")
    assert refused.returncode != 0 and "already has 2 member(s)" in refused.stderr

    # deployed in a, for b only: b places it, a runs none of it (data residency)
    result = deploy(lab, "a-2", "only-b", 2, ["b"])
    assert result["accepted"] and result["sites"] == ["b"]
    wait_for(lambda: running_here(lab, "b-2", "only-b") == 2, 30, what="b running only-b")
    assert running_here(lab, "a-1", "only-b") == 0 and processes(lab, ["a-1", "a-2"]) == 0
    wait_for(lambda: next(r for r in lab.call("a-1", "apps") if r["app"] == "only-b")["running"] == 2, 20,
             what="a seeing b's progress")
    # a deploy for both sites runs in both
    deploy(lab, "b-1", "both", 1, ["a", "b"])
    wait_for(lambda: running_here(lab, "a-1", "both") == 1 and running_here(lab, "b-1", "both") == 1, 30,
             what="both running")
    wait_for(lambda: converged(lab, ["a-1", "a-2", "b-1", "b-2"]), CONVERGE_TIMEOUT, what="every member agreeing")
    # every site's audit is everywhere
    ids = audit_ids(lab, "a-1")
    assert any(i.startswith("a/") for i in ids) and any(i.startswith("b/") for i in ids)
    # the replica as meshctl document shows it; --brief skips what needs a pass over it all
    full, brief = lab.call("a-1", "document"), lab.call("a-1", "document", brief=True)
    assert full["records"]["app_edits"] == 2 and full["invalid"] == 0 and full["bytes"] > 0
    assert "b" in {session["site"] for session in full["sessions"]}
    assert "bytes" not in brief and "records" not in brief and brief["state_vector"]
    everything = lab.call("a-1", "document", since="")  # what an empty replica lacks
    assert everything["delta_items"] >= 2 and everything["delta_bytes"] > 0
    # the leaders' link came up once and stayed up: nothing on either side cut it meanwhile
    # (a member of another site is not in this site's records, which is not being revoked)
    for host, other in (("a-1", "b"), ("b-1", "a")):
        sync_events = [e["message"] for e in lab.call(host, "events")
                       if e["kind"] == "sync" and e.get("site") == other]
        assert sync_events == [f"sync with site {other} up"], (host, sync_events)


def test_cut_sites_keep_running_and_accepting_changes_then_converge_with_conflicts_named(two_sites):
    lab = two_sites
    hosts = ["a-1", "a-2", "b-1", "b-2"]
    deploy(lab, "a-1", "shared", 1, ["a", "b"])
    deploy(lab, "a-1", "home-a", 2, ["a"])
    deploy(lab, "b-1", "home-b", 2, ["b"])
    wait_for(lambda: processes(lab, hosts) == 6, 40, what="six workloads")
    wait_for(lambda: converged(lab, hosts), CONVERGE_TIMEOUT, what="agreement before the cut")

    lab.isolate_site("b")
    wait_for(lambda: not (sites_row(lab, "a-1", "b") or {}).get("connected")
             and not (sites_row(lab, "b-1", "a") or {}).get("connected"), 20, what="the sessions to notice the cut")
    # both sides keep working alone: deploys accepted, placed, and nothing that ran stopped
    deploy(lab, "a-2", "cut-a", 1, ["a"])
    deploy(lab, "b-2", "cut-b", 1, ["b"])
    a_edit = deploy(lab, "a-1", "shared", 2, ["a", "b"])  # both edit the same app: a conflict
    time.sleep(0.05)
    b_edit = deploy(lab, "b-1", "shared", 3, ["a", "b"])
    wait_for(lambda: running_here(lab, "a-1", "cut-a") == 1 and running_here(lab, "b-1", "cut-b") == 1, 30,
             what="local deploys placed while cut")
    wait_for(lambda: running_here(lab, "a-1", "shared") == 2 and running_here(lab, "b-1", "shared") == 3, 30,
             what="each side running its own edit of shared")
    assert running_here(lab, "a-1", "home-a") == 2 and running_here(lab, "b-1", "home-b") == 2
    assert lab.call("a-1", "status")["partitioned"] is False and lab.call("b-1", "status")["partitioned"] is False

    healed = time.monotonic()
    lab.reconnect_site("b")
    wait_for(lambda: converged(lab, hosts), CONVERGE_TIMEOUT, what="convergence after heal")
    print(f"converged {time.monotonic() - healed:.2f}s after the link returned")
    # the later edit (b's, same version, later time stamp) won everywhere; a's is the named loser
    assert a_edit["version"] == b_edit["version"]
    (conflict,) = [c for c in conflicts(lab, "a-2") if c[0] == "shared"]
    assert conflict[1] == b_edit["edit_id"] and conflict[2] == a_edit["edit_id"]
    wait_for(lambda: running_here(lab, "a-1", "shared") == 3 and running_here(lab, "b-1", "shared") == 3, 30,
             what="shared at the winner's 3 replicas in both sites")
    # nothing else moved: every app at its count, in state and in real processes
    assert running_here(lab, "a-1", "home-a") == 2 and running_here(lab, "b-1", "home-b") == 2
    assert running_here(lab, "a-1", "cut-a") == 1 and running_here(lab, "b-1", "cut-b") == 1
    assert running_here(lab, "a-1", "cut-b") == 0 and running_here(lab, "b-1", "cut-a") == 0
    wait_for(lambda: processes(lab, hosts) == 2 + 2 + 1 + 1 + 3 + 3, 30, what="exact process count")
    apps = {r["app"]: r for r in lab.call("b-2", "apps")}
    assert apps["shared"]["conflicts"] == 1 and apps["shared"]["running"] == 6


@pytest.fixture
def three_sites(make_lab):
    """Sites a, b and c of one host each, b and c founded through a."""
    lab = make_lab({"a": 1, "b": 1, "c": 1}, meshd_args=FAST_SYNC)
    lab.start_site("a")
    lab.start_site_in_mesh("b", via="a-1")
    lab.start_site_in_mesh("c", via="a-1")
    return lab


def test_three_sites_one_vanishes_the_others_go_on_and_all_converge(three_sites):
    lab = three_sites
    hosts = ["a-1", "b-1", "c-1"]
    for host, site in zip(hosts, "abc"):
        deploy(lab, host, f"app-{site}", 1, [site])
    wait_for(lambda: processes(lab, hosts) == 3, 30, what="one workload per site")
    wait_for(lambda: converged(lab, hosts), CONVERGE_TIMEOUT, what="three sites agreeing")
    wait_for(lambda: all((sites_row(lab, h, s) or {}).get("reachable") for h in hosts for s in "abc"), 20,
             what="every site reachable from every site")

    lab.isolate_site("a")  # the site the others were founded through
    deploy(lab, "b-1", "after-b", 1, ["b", "c"])  # b and c still talk: c places it
    deploy(lab, "a-1", "after-a", 1, ["a"])
    wait_for(lambda: running_here(lab, "c-1", "after-b") == 1 and running_here(lab, "b-1", "after-b") == 1, 30,
             what="b's deploy placed by c while a is gone")
    wait_for(lambda: processes(lab, hosts) == 6, 20, what="six workloads")
    wait_for(lambda: not (sites_row(lab, "b-1", "a") or {}).get("reachable"), 20, what="b noticing a is gone")
    assert lab.workload_processes("a-1") == 2  # a's own work never stopped

    lab.reconnect_site("a")
    wait_for(lambda: converged(lab, hosts), CONVERGE_TIMEOUT, what="convergence after a returns")
    wait_for(lambda: all((sites_row(lab, h, s) or {}).get("reachable") for h in hosts for s in "abc"), 20,
             what="every site reachable again")
    assert running_here(lab, "a-1", "after-b") == 0 and processes(lab, hosts) == 6


def test_revocations_and_policy_changed_while_cut_off_converge_after_heal(make_lab):
    lab = make_lab({"a": 1, "b": 2}, meshd_args=FAST_SYNC)
    lab.start_site("a")
    lab.start_site_in_mesh("b", via="a-1")
    wait_for(lambda: (sites_row(lab, "a-1", "b") or {}).get("reachable"), 20, what="a seeing b")
    victim = next(n["node_id"] for n in lab.call("b-1", "nodes") if n["name"] == "b-2")

    lab.isolate_site("b")
    wait_for(lambda: not (sites_row(lab, "a-1", "b") or {}).get("connected"), 20, what="a noticing the cut")
    lab.call("b-1", "revoke", node="b-2", reason="lost in transit")
    wait_for(lambda: [r["node_id"] for r in lab.call("b-1", "revocations")] == [victim], 20, what="b's list")
    # both sites change the policy while apart: two bundles of the same serial
    serial = lab.call("a-1", "policy")["serial"]
    lab.call("a-1", "policy_allow", version="9.9.1", digest="a1" * 32)
    time.sleep(0.05)
    lab.call("b-1", "policy_allow", version="9.9.2", digest="b2" * 32)
    time.sleep(1.0)
    assert lab.call("a-1", "revocations") == [], "nothing crosses a cut link"
    assert "9.9.2" not in lab.call("a-1", "policy")["allowed"]

    lab.reconnect_site("b")

    def a_lists_it() -> bool:
        rows = lab.call("a-1", "revocations")
        return [(r["node_id"], r["name"], r["site"], r["reason"], r["pending"]) for r in rows] == \
            [(victim, "b-2", "b", "lost in transit", False)]
    wait_for(a_lists_it, CONVERGE_TIMEOUT, what="a taking in b's revocation")
    # in a's own root-signed list (what its joins, certificate checks and sync port consult),
    # and in its audit and events
    audit = lab.call("a-1", "audit")
    assert any(r["action"] == "revoke-adopted" and r["site"] == "a" for r in audit)
    assert any(r["action"] == "revoke" and r["site"] == "b" and r["target"] == "b-2" for r in audit)
    assert any("revoked in b" in e["message"] for e in lab.call("a-1", "events"))
    # a sees b's members as b's leader published them: b-2 revoked, b-1 leading
    wait_for(lambda: {(n["name"], n["state"], n["role"]) for n in lab.call("a-1", "nodes", site="b")}
             == {("b-1", "ready", "leader"), ("b-2", "revoked", "follower")}, CONVERGE_TIMEOUT,
             what="b's members seen from a")
    # one policy everywhere: the later bundle of that serial (b's); the other is named as lost
    wait_for(lambda: lab.call("a-1", "policy") == lab.call("b-1", "policy"), CONVERGE_TIMEOUT, what="one policy")
    policy = lab.call("a-1", "policy")
    assert policy["serial"] == serial + 1 and "9.9.2" in policy["allowed"] and "9.9.1" not in policy["allowed"]
    for host in ("a-1", "b-1"):
        lost = [e for e in lab.call(host, "events") if e["kind"] == "conflict" and e.get("policy") == serial + 1]
        assert [(e["winner_site"], e["loser_site"]) for e in lost] == [("b", "a")], host
    # both sites agree, and the site that issued it does not take it in a second time
    assert [r["node_id"] for r in lab.call("b-1", "revocations")] == [victim]
    assert not any(r["action"] == "revoke-adopted" and r["site"] == "b" for r in lab.call("b-1", "audit"))


def epochs(lab, hosts) -> set:
    return {lab.call(h, "document", brief=True)["epoch"] for h in hosts}


def test_sites_that_compacted_their_replicas_apart_converge_on_one_epoch(two_sites):
    """Both sites compact while cut off (each into its own epoch) and keep changing things;
    after the link returns every member holds the same records on one epoch, with nothing
    either side did lost and no workload moved."""
    lab = two_sites
    hosts = ["a-1", "a-2", "b-1", "b-2"]
    deploy(lab, "a-1", "shared", 1, ["a", "b"])
    deploy(lab, "b-1", "home-b", 1, ["b"])
    wait_for(lambda: processes(lab, hosts) == 3, 40, what="three workloads")
    wait_for(lambda: converged(lab, hosts), CONVERGE_TIMEOUT, what="agreement before the cut")
    assert epochs(lab, hosts) == {"0/000000000000"}

    lab.isolate_site("b")
    wait_for(lambda: not (sites_row(lab, "a-1", "b") or {}).get("connected"), 20, what="a noticing the cut")
    a_edit = deploy(lab, "a-2", "shared", 2, ["a", "b"])
    time.sleep(0.05)
    b_edit = deploy(lab, "b-2", "shared", 3, ["a", "b"])
    compacted_a = lab.call("a-1", "document", compact=True)
    compacted_b = lab.call("b-1", "document", compact=True)
    assert compacted_a["epoch"].startswith("1/") and compacted_b["epoch"].startswith("1/")
    assert compacted_a["epoch"] != compacted_b["epoch"] and compacted_a["invalid"] == 0
    # each site's followers take their leader's epoch
    wait_for(lambda: epochs(lab, ["a-1", "a-2"]) == {compacted_a["epoch"]}, 20, what="a-2 on a's epoch")
    wait_for(lambda: epochs(lab, ["b-1", "b-2"]) == {compacted_b["epoch"]}, 20, what="b-2 on b's epoch")
    deploy(lab, "b-1", "cut-b", 1, ["b"])  # written in b's new epoch while still cut off

    lab.reconnect_site("b")
    wait_for(lambda: len(epochs(lab, hosts)) == 1, CONVERGE_TIMEOUT, what="one epoch everywhere")
    # the higher of the two (same generation: the higher id; hex keeps the bytes' order)
    assert epochs(lab, hosts) == {max(compacted_a["epoch"], compacted_b["epoch"])}
    wait_for(lambda: converged(lab, hosts), CONVERGE_TIMEOUT, what="convergence after heal")
    (conflict,) = [c for c in conflicts(lab, "a-1") if c[0] == "shared"]
    assert conflict[1] == b_edit["edit_id"] and conflict[2] == a_edit["edit_id"]
    wait_for(lambda: running_here(lab, "a-1", "shared") == 3 and running_here(lab, "b-1", "cut-b") == 1, 30,
             what="the winner and b's cut-time deploy running")
    views = [lab.call(h, "document") for h in hosts]
    assert len({tuple(sorted(v["records"].items())) for v in views}) == 1 and views[0]["invalid"] == 0
    assert views[0]["records"]["app_edits"] >= 4 and views[0]["audit_dropped"] == {}  # nothing is 30 days old
    assert any(e["message"].startswith("mesh document adopted") for h in hosts for e in lab.call(h, "events"))


def rollout_spec(command: str, waves: str, abort: int = 30) -> str:
    """`det` across a, b and c in waves; a version whose `command` is run by sh."""
    return (f'[app]\nname = "det"\nreplicas = 1\ncommand = ["sh", "-c", {json.dumps(command)}]\n'
            f'sites = ["a", "b", "c"]\n'
            f'[app.update]\nmin_healthy_s = 1\nhealthy_deadline_s = 3\nprogress_deadline_s = 6\n'
            f'[app.rollout]\nwaves = {waves}\nabort_failed_percent = {abort}\n')


def rollout_row(lab, host: str, edit_id: str) -> dict:
    """The row of `deployments det` that shows edit `edit_id`'s rollout, as `host` sees it."""
    return next((r for r in lab.call(host, "deployments", app="det") if r.get("edit_id") == edit_id
                 and "rollout" in r), {})


def rollout_states(lab, hosts, edit_id: str) -> list:
    """(the rollout's state, each site's state) as each host sees it."""
    out = []
    for host in hosts:
        row = rollout_row(lab, host, edit_id)
        out.append((row.get("state"), tuple(sorted((s, p["state"]) for s, p in (row.get("sites") or {}).items()))))
    return out


def test_a_rollout_in_waves_goes_on_in_a_cut_site_and_a_failing_version_stops_and_returns(three_sites):
    lab = three_sites
    hosts = ["a-1", "b-1", "c-1"]
    wait_for(lambda: all((sites_row(lab, h, s) or {}).get("reachable") for h in hosts for s in "abc"), 30,
             what="every site reachable from every site")
    waves = '[{ sites = ["a"] }, { sites = ["b"] }, { sites = ["c"] }]'
    # `deploy --wait` follows the rollout wave by wave and returns once it succeeded.
    done = lab.meshctl("b-1", "deploy", "--wait", "--timeout", "90", "-", "--json", timeout=100,
                       input_text=rollout_spec("exec sleep 3601", waves))
    assert done.returncode == 0, done.stderr
    v1 = json.loads(done.stdout)
    assert v1["deployment"] == "succeeded" and v1.get("held")  # b is in the second wave: it held it first
    wait_for(lambda: {s for s, _ in rollout_states(lab, hosts, v1["edit_id"])} == {"succeeded"}, 30,
             what="v1 through its three waves, seen by every site")

    # v2: wave b is cut off while it runs its part; c waits for b's word.
    v2 = lab.call("a-1", "deploy", spec_toml=rollout_spec("exec sleep 3602", waves), wait=False, timeout=30)
    wait_for(lambda: dict(rollout_states(lab, ["b-1"], v2["edit_id"])[0][1]).get("b") not in (None, "pending"),
             60, what="v2's wave reaching b")
    lab.isolate_site("b")
    wait_for(lambda: rollout_row(lab, "b-1", v2["edit_id"])["sites"]["b"]["state"] == "succeeded", 30,
             what="b finishing its wave while cut off")
    time.sleep(3)
    seen_from_a = rollout_row(lab, "a-1", v2["edit_id"])
    assert seen_from_a["state"] == "running" and seen_from_a["sites"]["b"]["state"] in ("pending", "running")
    assert seen_from_a["sites"]["c"]["state"] == "pending" and not seen_from_a["sites"]["c"]["reached"]
    lab.reconnect_site("b")
    wait_for(lambda: {s for s, _ in rollout_states(lab, hosts, v2["edit_id"])} == {"succeeded"}, 60,
             what="every site agreeing v2 succeeded after the heal")
    views = rollout_states(lab, hosts, v2["edit_id"])
    assert all(v == views[0] for v in views), views

    # v3 fails in b only (b's replica exits); a and b are in its first wave, c in the second.
    failing = 'test "$MESHD_SITE" = b && exit 1; exec sleep 3603'
    failed = lab.meshctl("c-1", "deploy", "--wait", "--timeout", "60", "-", timeout=70,
                         input_text=rollout_spec(failing, '[{ sites = ["a", "b"] }, { sites = ["c"] }]'))
    assert failed.returncode != 0 and "rollout was reverted: 1 of 3 sites failed (b)" in failed.stderr, failed.stderr
    assert "Traceback" not in failed.stderr and "wave(s) open" in failed.stderr
    v3 = next(r for r in lab.call("c-1", "deployments", app="det") if "rollout" in r)["rollout"]
    returned = ("reverted", (("a", "reverted"), ("b", "reverted"), ("c", "pending")))
    wait_for(lambda: rollout_states(lab, hosts, v3["edit_id"]) == [returned] * 3, 60,
             what="v3's rollout stopped at the threshold, a returned from it, seen by every site")
    for host in hosts:  # every site runs v2's spec again: the reached ones returned, c never left it
        current = next(r for r in lab.call(host, "history", app="det") if r.get("current"))
        v2_digest = next(r for r in lab.call("c-1", "history", app="det") if r.get("current"))["spec_digest"]
        assert current["spec_digest"] == v2_digest, host
        wait_for(lambda: running_here(lab, host, "det") == 1, 30, what=f"{host} running det")
