"""The Prometheus exposition of real daemons (meshd.io.metrics), read over HTTP the way a
Prometheus server does and parsed with the reference parser: its figures move when the things
they count happen on a real site; `meshctl metrics` gives the same text; a metrics port that
cannot be had stops a start that asked for it, with one line."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshd.exitcodes import EXIT_PORT_IN_USE
from meshd.io.localsite import wait_for

pytestmark = pytest.mark.system

# Exits at once, so it is restarted (backoff from 0.1 s); a health check that passes.
FLAKY = ('[app]\nname = "flaky"\nreplicas = 1\ncommand = ["sh", "-c", "sleep 0.2; exit 3"]\n'
         '[app.restart]\npolicy = "always"\n')
CHECKED = ('[app]\nname = "checked"\nreplicas = 3\ncommand = ["sleep", "3600"]\n'
           '[app.health]\nkind = "exec"\ncommand = ["true"]\ninterval_s = 0.5\ntimeout_s = 0.5\n')


def scrape(node) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, from the node's HTTP endpoint."""
    address = node.call("status")["metrics"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as answer:
        assert answer.status == 200
        text = answer.read().decode()
    return samples(text)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def get(figures, name: str, **labels) -> float:
    return figures.get((name, tuple(sorted(labels.items()))), 0.0)


def total(figures, name: str, **labels) -> float:
    return sum(v for (n, ls), v in figures.items() if n == name and all(dict(ls).get(k) == w for k, w in labels.items()))


def test_the_figures_of_a_real_site_move_with_what_happens(make_site):
    three = make_site()
    three.start(3)
    leader = three.leader()
    figures = {node.name: scrape(node) for node in three.nodes}
    assert sum(get(f, "meshd_raft_role", role="leader") for f in figures.values()) == 1
    assert get(figures[leader.name], "meshd_raft_role", role="leader") == 1
    assert sum(total(f, "meshd_joins_total", outcome="admitted") for f in figures.values()) == 2
    assert get(figures[leader.name], "meshd_site_nodes", state="ready") == 3
    assert all(get(f, "meshd_raft_term") >= 1 and get(f, "meshd_raft_has_quorum") == 1 for f in figures.values())
    follower = next(n for n in three.nodes if n is not leader)
    assert get(figures[follower.name], "meshd_raft_leader_last_contact_seconds") < 1.0

    leader.call("deploy", spec_toml=CHECKED, wait=True, timeout=30)
    leader.call("deploy", spec_toml=FLAKY, wait=False)

    def moved():
        now = {node.name: scrape(node) for node in three.nodes}
        restarts = sum(get(f, "meshd_workload_restarts_total") for f in now.values())
        checks = sum(get(f, "meshd_health_checks_total", result="passed") for f in now.values())
        running = sum(get(f, "meshd_allocations", state="running") for f in now.values())
        return now if restarts >= 2 and checks >= 6 and running >= 3 else None

    now = wait_for(moved, 30, interval=0.5, what="restarts, health checks and running allocations counted")
    assert get(now[leader.name], "meshd_site_deployments", state="succeeded") + \
        get(now[leader.name], "meshd_site_deployments", state="running") == 2
    # the document syncs between the members: bytes both ways
    assert all(total(f, "meshd_sync_sent_bytes_total") > 0 and total(f, "meshd_sync_received_bytes_total") > 0
               for f in now.values())

    before_down = get(now[leader.name], "meshd_liveness_transitions_total", to="down")
    follower.kill()
    wait_for(lambda: get(scrape(leader), "meshd_liveness_transitions_total", to="down") == before_down + 1, 20,
             interval=0.2, what="the leader counting the member it marked down")
    assert get(scrape(leader), "meshd_site_nodes", state="down") == 1

    # meshctl metrics: the same exposition over the admin socket, as text
    survivor = next(n for n in three.nodes if n is not follower)
    shown = subprocess.run([sys.executable, "-m", "meshd.cli.meshctl", "--socket", survivor.socket,
                            "metrics"], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    assert get(samples(shown.stdout), "meshd_build_info", node=survivor.name, site="lab", version=__import__(
        "meshd").__version__) == 1


def test_a_metrics_port_asked_for_and_taken_stops_the_start_with_one_line(make_site):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        site = make_site()
        node = site.add_node(extra_args=("--metrics", f"127.0.0.1:{port}"))
        node.start()
        wait_for(lambda: not node.alive, 20, what="the daemon refusing to start")
        said = node.log_text()
        assert node.proc.returncode == EXIT_PORT_IN_USE, said[-2000:]
        errors = [line for line in said.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0] and "metrics" in errors[0], errors
        assert "Traceback" not in said


def test_the_default_port_taken_leaves_the_daemon_running_without_it(tmp_path):
    from meshd.config import DEFAULT_METRICS
    from meshd.io.adminclient import admin_call_sync

    host, _, port = DEFAULT_METRICS.rpartition(":")
    with socket.socket() as taken:
        try:
            taken.bind((host, int(port)))
            taken.listen()
        except OSError:
            pass  # something on this host has it already: the same case
        sock = str(tmp_path / "admin.sock")
        args = [sys.executable, "-m", "meshd.cli.meshd_main", "run", "--data-dir", str(tmp_path / "d"), "--site",
                "alone", "--name", "alone", "--listen", "127.0.0.1:0", "--no-mdns", "--admin-socket", sock]
        with open(tmp_path / "log", "wb") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        try:
            call = lambda cmd: admin_call_sync(sock, cmd, {}, timeout=10)  # noqa: E731
            wait_for(lambda: _try(lambda: call("status")["role"] == "leader"), 30, what="the daemon leading")
            assert call("status")["metrics"] is None
            said = (tmp_path / "log").read_text()
            assert f"metrics endpoint off: {DEFAULT_METRICS} is taken" in said
            assert "meshd_build_info" in call("metrics")
        finally:
            proc.terminate()
            proc.wait(15)


def _try(check):
    try:
        return check()
    except Exception:
        return False
