"""Workloads that cannot hurt their device, on a real daemon and this machine's real cgroups
(v1 here; meshd.io.cgroups): a memory hog is killed by its limit and reported `oom-killed`
while the daemon serves on; a fork bomb is held by its process limit; the node says what it
enforces."""

from __future__ import annotations

import os
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshd.io.localsite import wait_for

pytestmark = pytest.mark.system

HOG = f'''[app]
name = "hog"
replicas = 1
user = "root"  # (this interpreter lives under /root)
command = ["{sys.executable}", "-c", "x = bytearray(512 * 1024 * 1024)"]
[app.resources]
memory_mb = 48
[app.restart]
policy = "on-failure"
'''
# Forks for as long as it lives; every child sleeps; a refused fork is tried again.
BOMB = f'''[app]
name = "bomb"
replicas = 1
user = "root"
command = ["{sys.executable}", "-c", "import os, time\\nwhile True:\\n    try:\\n        if os.fork() == 0:\\n            time.sleep(120)\\n            os._exit(0)\\n    except OSError:\\n        time.sleep(0.01)"]
[app.resources]
pids = 32
'''


@pytest.fixture
def root_only():
    if os.geteuid() != 0:
        pytest.skip("cgroups need root here")


ENV = '''[app]
name = "env"
replicas = 1
command = ["sh", "-c", "echo uid=$(id -u); env; exec sleep 600"]
env = { MODE = "edge" }
'''


def test_a_memory_hog_and_a_fork_bomb_are_contained_and_the_daemon_serves_on(make_site, root_only):
    import pwd

    from meshd.io.supervisor import WORKLOAD_PATH

    site = make_site()
    node = site.add_node(extra_args=("--workload-user", "nobody"))  # as the package's unprivileged user would
    node.env = {"DAEMON_ONLY_SECRET": "s3cret"}  # in the daemon's environment, never a workload's
    node.start()
    site.wait_ready(node, 30)
    node.call("deploy", spec_toml=ENV, wait=True, timeout=30)
    [shown] = node.call("allocs", app="env")
    said = wait_for(lambda: (lambda text: text if "MODE=edge" in text else None)(
        node.call("logs", alloc=shown["alloc_id"], lines=100)["data"]), 10, what="the workload's env printed")
    assert "s3cret" not in said and f"PATH={WORKLOAD_PATH}" in said
    assert f"uid={pwd.getpwnam('nobody').pw_uid}" in said  # never root unless the spec says so
    assert f"HOME={node.data_dir / 'allocs' / shown['alloc_id']}" in said and f"MESHD_ALLOC_ID={shown['alloc_id']}" in said
    [row] = node.call("nodes")
    assert set(row["enforces"]) == {"cpu", "memory", "pids"} and row["cgroup"] in ("v1", "v2"), row
    node.call("deploy", spec_toml=HOG, wait=False)
    node.call("deploy", spec_toml=BOMB, wait=False)

    def hog_killed():
        rows = [a for a in node.call("allocs", app="hog") if "oom-killed" in (a.get("reason") or "")]
        return rows and rows[0]["restarts"] >= 1 and rows
    [hog] = wait_for(hog_killed, 40, interval=0.2, what="the hog oom-killed and restarted")
    assert "memory limit 48 MiB" in hog["reason"]
    events = [e["message"] for e in node.call("events")]
    assert any("oom-killed" in m for m in events), events[-10:]
    oom_kills = [s.value for f in text_string_to_metric_families(node.call("metrics")) for s in f.samples
                 if s.name == "meshd_workload_oom_kills_total"]
    assert oom_kills and oom_kills[0] >= 1

    bomb = wait_for(lambda: [a for a in node.call("allocs", app="bomb") if a["state"] == "running"], 20,
                    what="the bomb running")[0]
    time.sleep(2.0)  # it forks as fast as it can meanwhile
    held = [p for p in os.listdir("/proc") if p.isdigit() and _alloc_of(p) == bomb["alloc_id"]]
    assert 0 < len(held) <= 32
    # the daemon, beside both, serves on
    assert node.call("status")["role"] == "leader" and node.alive
    node.call("stop", app="bomb")
    wait_for(lambda: not [p for p in os.listdir("/proc") if p.isdigit() and _alloc_of(p) == bomb["alloc_id"]], 20,
             what="every process of the bomb gone")


def _alloc_of(pid: str) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(b"MESHD_ALLOC_ID="):
                    return item.split(b"=", 1)[1].decode()
    except OSError:
        return None
    return None


SPIN = f'''[app]
name = "spin"
replicas = 2
command = ["{sys.executable}", "-c", "x = bytearray(24 * 1024 * 1024)\\nwhile True: pass"]
[app.resources]
cpu = 0.2
memory_mb = 64
'''


def test_top_shows_what_every_nodes_workloads_use_against_their_limits(make_site, root_only):
    import json
    import subprocess

    site = make_site()
    site.start(2)
    first, second = site.nodes
    first.call("deploy", spec_toml=SPIN, wait=True, timeout=30)
    assert {a["node"] for a in first.call("allocs", app="spin")} == {first.name, second.name}  # spread
    time.sleep(3.0)
    first.call("top")  # a first reading: the next is measured between the two
    time.sleep(2.0)
    shown = subprocess.run([sys.executable, "-m", "meshd.cli.meshctl", "--socket", first.socket, "--json", "top"],
                           capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    rows = [r for r in json.loads(shown.stdout) if r.get("app") == "spin"]
    assert {r["node"] for r in rows} == {first.name, second.name}  # the other node asked over the peer port
    for row in rows:
        assert 10 <= row["cpu_percent"] <= 30, row  # held near its 0.2-core quota (20 %)
        assert 20 <= row["memory_mb"] <= 64 and row["memory_limit_mb"] == 64 and row["cpu_limit"] == 0.2, row
        assert row["restarts"] == 0 and row["state"] == "running"
    table = subprocess.run([sys.executable, "-m", "meshd.cli.meshctl", "--socket", first.socket, "top"],
                           capture_output=True, text=True, timeout=30).stdout
    assert table.splitlines()[0].split()[:3] == ["NODE", "ALLOC", "APP"] and "spin" in table
    second.kill()
    rows = wait_for(lambda: [r for r in first.call("top") if r["node"] == second.name and r.get("unreachable")], 20,
                    what="the dead node shown as not answering")
    assert rows


CORAL = '''[app]
name = "detector"
replicas = 2
command = ["sh", "-c", "echo holds=$MESHD_DEVICE_CORAL; exec sleep 600"]
[app.resources]
devices = { coral = 1 }
'''


def test_a_device_configured_on_one_node_attracts_the_app_only_there_and_is_never_shared(make_site):
    site = make_site()
    site.start(1)
    plain = site.nodes[0]
    accelerated = site.add_node(extra_args=("--device", "coral=/dev/null"))  # a stand-in device node
    accelerated.start(join=site.token())
    site.wait_ready(accelerated, 30)
    rows = {r["name"]: r for r in plain.call("nodes")}
    assert rows[accelerated.name]["devices"] == {"coral": 1} and not rows[plain.name]["devices"]
    plan = plain.call("plan", spec_toml=CORAL)
    assert [p["node"] for p in plan["placements"]] == [accelerated.name], plan  # one device: one replica
    assert "no coral device on this node" in str(plan["filtered"]) + str(plan["unplaced"]), plan
    plain.call("deploy", spec_toml=CORAL, wait=False)
    running = wait_for(lambda: [a for a in plain.call("allocs", app="detector") if a["state"] == "running"], 20,
                       what="one replica running")
    assert [a["node"] for a in running] == [accelerated.name]  # only where the device is, one at a time
    said = wait_for(lambda: (lambda t: t if "holds=" in t else None)(
        plain.call("logs", alloc=running[0]["alloc_id"], lines=10)["data"]), 10, what="the workload told")
    assert "holds=/dev/null" in said
    events = [e["message"] for e in plain.call("events", kinds=["placement"], app="detector")]
    assert any("cannot place 1 replica" in m and ("needs 1 coral, 0 free of 1" in m or "no coral device" in m)
               for m in events), events
