"""Health checks with real daemons (meshd.health, meshd.io.healthcheck): a replica serving
HTTP on its node's loopback is shown `healthy` in `allocs`; one failing its check is
restarted by its restart policy, and `allocs` and `events` say why."""

from __future__ import annotations

import json
import sys

import pytest

from meshd.io.localsite import wait_for
from meshd.io.ports import free_port

pytestmark = pytest.mark.system

VERDICT_TIMEOUT = 30  # a deploy, a start and a few 0.2 s checks; generous for a loaded machine


def http_app(name: str, port: int, path: str) -> str:
    command = json.dumps([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"])
    return (f'[app]\nname = "{name}"\nreplicas = 1\ncommand = {command}\n'
            f'[app.health]\nkind = "http"\nport = {port}\npath = "{path}"\ninterval_s = 0.3\ntimeout_s = 0.3\n'
            f'failures = 2\n')


def the_alloc(node, app: str) -> dict | None:
    rows = node.try_call("allocs", app=app, node=None) or []
    return rows[0] if rows else None


def test_a_replica_answering_its_http_check_is_healthy_and_one_failing_it_is_restarted(three):
    leader = three.leader()
    good, bad = free_port(), free_port()
    assert leader.call("deploy", spec_toml=http_app("served", good, "/"), wait=False, timeout=None)["accepted"]
    wait_for(lambda: (the_alloc(leader, "served") or {}).get("health") == "healthy", VERDICT_TIMEOUT,
             what="the served replica healthy")

    assert leader.call("deploy", spec_toml=http_app("broken", bad, "/missing"), wait=False, timeout=None)["accepted"]
    restarted = wait_for(lambda: (a := the_alloc(leader, "broken")) and a["restarts"] >= 1 and a, VERDICT_TIMEOUT,
                         what="the broken replica restarted")
    events = leader.call("events", follow=False)
    said = [e["message"] for e in events if e.get("app") == "broken"]
    assert any("unhealthy: 2 consecutive http checks failed, the last: http /missing: status 404" in m
               for m in said), said
    assert restarted["health"] in ("none", "checking", "unhealthy")  # never healthy
    assert (the_alloc(leader, "served") or {}).get("health") == "healthy"  # the other one is untouched
