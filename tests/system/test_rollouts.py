"""Deployments with real daemons (meshd.rollout through the leader, real health checks, the
real meshctl): a version failing its HTTP check is reverted while the stable one keeps
serving untouched; a canary waits beside the old replicas until `meshctl promote`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from meshd.io.admin import AdminError
from meshd.io.localsite import sleeper_app, wait_for
from meshd.io.ports import free_port

pytestmark = pytest.mark.system

VERDICT_TIMEOUT = 40  # starts, a few 0.3 s checks, a soak of 1 s and a deadline of 3 s; a loaded machine


def http_app(port: int, path: str) -> str:
    command = json.dumps([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"])
    return (f'[app]\nname = "web"\nreplicas = 1\ncommand = {command}\n'
            f'[app.health]\nkind = "http"\nport = {port}\npath = "{path}"\ninterval_s = 0.3\ntimeout_s = 0.3\n'
            f'failures = 2\n'
            f'[app.update]\nmin_healthy_s = 1\nhealthy_deadline_s = 3\n')


def meshctl(node, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshd.cli.meshctl", "--socket", str(node.socket), *args],
                          input=stdin, capture_output=True, text=True, timeout=VERDICT_TIMEOUT + 10)


def deployment(node, app: str) -> dict:
    rows = node.call("deployments", app=app)
    return rows[0] if rows else {}


def test_a_version_failing_its_http_check_is_reverted_and_the_stable_one_keeps_serving(three):
    leader = three.leader()
    good, other = free_port(), free_port()
    first = leader.call("deploy", spec_toml=http_app(good, "/"), wait=False, timeout=None)
    assert first["accepted"] and first["version"] == 1
    wait_for(lambda: deployment(leader, "web").get("state") == "succeeded", VERDICT_TIMEOUT, what="v1 stable")
    (serving,) = [a for a in leader.call("allocs", app="web") if a["state"] == "running"]

    # v2 serves elsewhere and checks a path that answers 404: it never becomes healthy.
    failing = meshctl(leader, "deploy", "--wait", "--timeout", str(VERDICT_TIMEOUT), "-",
                      stdin=http_app(other, "/missing"))
    assert failing.returncode != 0
    assert "web v2 failed and was reverted to v1: replica 0 not healthy within 3s" in failing.stderr, failing.stderr
    assert "Traceback" not in failing.stderr

    history = {row["version"]: row for row in leader.call("history", app="web")}
    assert history[1]["state"] == "stable" and history[1]["current"]
    assert history[2]["state"] == "reverted" and "not healthy within 3s" in history[2]["reason"]
    allocs = {a["alloc_id"]: a for a in leader.call("allocs", app="web")}
    still = allocs[serving["alloc_id"]]
    assert still["state"] == "running" and still["restarts"] == 0 and still["health"] == "healthy"  # untouched
    assert all(a["desired"] == "stop" for a in allocs.values() if a["version"] == 2)
    wait_for(lambda: deployment(leader, "web").get("state") == "succeeded", VERDICT_TIMEOUT, what="the revert done")
    audit = leader.call("audit")
    assert any(r["action"] == "revert" and r["target"] == "web v2 -> v1" for r in audit), audit[-5:]


def test_a_canary_waits_beside_the_old_replicas_until_promoted(three):
    leader = three.leader()
    v1 = sleeper_app("svc", 2) + '[app.update]\nmin_healthy_s = 0.5\ncanary = 1\n'
    leader.call("deploy", spec_toml=v1, wait=True, timeout=VERDICT_TIMEOUT)
    wait_for(lambda: deployment(leader, "svc").get("state") == "succeeded", VERDICT_TIMEOUT, what="v1 stable")
    old = {a["alloc_id"] for a in leader.call("allocs", app="svc") if a["state"] == "running"}
    v2 = v1.replace('"3600"', '"3601"')
    assert leader.call("deploy", spec_toml=v2, wait=False, timeout=None)["version"] == 2
    waiting = wait_for(lambda: (d := deployment(leader, "svc")).get("state") == "awaiting-promotion" and d,
                       VERDICT_TIMEOUT, what="the canary healthy")
    assert waiting["sites"][three.site]["canaries"] == 1
    live = [a for a in leader.call("allocs", app="svc") if a["desired"] == "run"]
    assert {a["alloc_id"] for a in live if a["version"] == 1} == old  # both old replicas still serve
    (canary,) = [a for a in live if a["version"] == 2]
    assert canary["canary"] is True

    shown = meshctl(leader, "deployments", "svc")
    assert shown.returncode == 0 and "awaiting-promotion" in shown.stdout and "1 canary" in shown.stdout
    promoted = meshctl(leader, "--json", "promote", "svc")
    assert promoted.returncode == 0, promoted.stderr
    assert json.loads(promoted.stdout) == {"app": "svc", "version": 2, "state": "running", "promoted": True}
    again = meshctl(leader, "promote", "svc")
    assert again.returncode != 0 and again.stderr.startswith("error: ") and "no canaries waiting" in again.stderr

    wait_for(lambda: deployment(leader, "svc").get("state") == "succeeded", VERDICT_TIMEOUT, what="v2 rolled out")
    live = [a for a in leader.call("allocs", app="svc") if a["desired"] == "run"]
    assert sorted(a["version"] for a in live) == [2, 2] and canary["alloc_id"] in {a["alloc_id"] for a in live}
    history = {row["version"]: row["state"] for row in leader.call("history", app="svc")}
    assert history == {1: "superseded", 2: "stable"}
    with pytest.raises(AdminError, match=r"deployment has ended \(succeeded\); nothing to promote"):
        leader.call("promote", app="svc")
