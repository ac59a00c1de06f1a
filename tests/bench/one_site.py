"""One-site benchmark: three real daemons on loopback.

    python3 -m tests.bench.one_site [--runs 5] [--json bench-results/one_site.json]

Each run builds a fresh three-node site (separate `meshd run` processes, joins by mDNS) and
measures:
- join: `meshd run --join` process start -> the node is `ready` in the leader's `nodes`
  (two samples a run: the 2nd and 3rd node);
- idle RSS and CPU of each daemon over an idle window with no workloads;
- deploy: `deploy` of 10 replicas -> all 10 `running` (as `deploy --wait` reports it);
- node failover: SIGKILL of a non-leader -> the app has 10 running replicas again, none on it
  (the victim is then restarted on its data dir);
- leader failover: SIGKILL of the leader -> the next deploy is accepted by a survivor.
Prints a table of medians and writes every sample to JSON. Numbers on a shared 2-core
machine are noisy; read medians.
"""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from meshd.io.localsite import LocalSite, sleeper_app, wait_for
from tests.bench.report import run_site_benchmark

TARGETS = {  # metric -> (target, unit); lower is better for all
    "join_s": (1.0, "s"),
    "deploy_10_s": (0.5, "s"),
    "node_failover_s": (2.0, "s"),
    "leader_failover_s": (1.5, "s"),
    "idle_rss_mb": (45.0, "MB"),
    "idle_cpu_pct": (1.0, "% of a core"),
    # Context for the RSS figure, no target: memory private to one daemon (USS; RSS also
    # counts shared library pages), and the baseline of the same run: a bare interpreter
    # that only imports meshd's required libraries and does nothing.
    "idle_uss_mb": (None, "MB"),
    "deps_only_rss_mb": (None, "MB"),
}

# What `pip install meshd` requires at run time; importing them is the floor of any daemon.
REQUIRED_LIBRARIES = ("trio", "cryptography.hazmat.primitives.asymmetric.ed25519", "cryptography.fernet",
                      "pysyncobj", "zeroconf", "psutil", "prometheus_client")

IDLE_WINDOW_S = 10.0  # long enough to cover many heartbeat and Raft periods
POLL_S = 0.02  # status polling interval while timing; small next to the targets


def measure_join(site: LocalSite, extra_args: tuple[str, ...] = ()) -> float:
    token = site.token()
    leader = site.leader() or site.any_alive()
    node = site.add_node(extra_args)
    t0 = time.monotonic()
    node.start(join=token)

    def ready():
        rows = leader.try_call("nodes", site=None) or []
        return any(r["name"] == node.name and r["state"] == "ready" for r in rows)
    wait_for(ready, 30, interval=POLL_S, what=f"{node.name} ready")
    return time.monotonic() - t0


def measure_dependency_floor() -> float:
    code = ("import " + ", ".join(REQUIRED_LIBRARIES) + "\nimport psutil\n"
            "print(psutil.Process().memory_info().rss)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return int(out) / 1e6


def measure_idle(site: LocalSite) -> tuple[list[float], list[float], list[float]]:
    procs = [psutil.Process(n.proc.pid) for n in site.nodes if n.alive]
    time.sleep(2.0)  # let start-up work (joins, first heartbeats) settle
    before = [p.cpu_times() for p in procs]
    time.sleep(IDLE_WINDOW_S)
    after = [p.cpu_times() for p in procs]
    cpu = [100.0 * ((a.user + a.system) - (b.user + b.system)) / IDLE_WINDOW_S for a, b in zip(after, before)]
    rss = [p.memory_info().rss / 1e6 for p in procs]
    uss = [p.memory_full_info().uss / 1e6 for p in procs]
    return rss, cpu, uss


def measure_deploy(site: LocalSite, name: str) -> float:
    leader = site.leader()
    t0 = time.monotonic()
    result = leader.call("deploy", spec_toml=sleeper_app(name, 10), wait=True, timeout=30)
    elapsed = time.monotonic() - t0
    assert result["running"] == 10, result
    return elapsed


def measure_node_failover(site: LocalSite, name: str, samples: dict[str, list[float]]):
    leader = site.leader()
    victim = next(n for n in site.nodes if n.alive and n is not leader)
    t0 = time.monotonic()
    victim.kill()

    def replaced():
        running = [a for a in (leader.try_call("allocs", app=name, node=None) or [])
                   if a["state"] == "running" and a["desired"] == "run"]
        return len(running) == 10 and all(a["node"] != victim.name for a in running)
    wait_for(replaced, 30, interval=POLL_S, what="replacements running")
    samples["node_failover_s"].append(time.monotonic() - t0)
    return victim


def measure_leader_failover(site: LocalSite) -> float:
    leader = site.leader()
    survivor = next(n for n in site.nodes if n.alive and n is not leader)
    t0 = time.monotonic()
    leader.kill()
    deadline = t0 + 30
    while True:
        try:
            result = survivor.call("deploy", spec_toml=sleeper_app("after-failover", 1), wait=False, timeout=None)
            if result.get("accepted"):
                return time.monotonic() - t0
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(POLL_S)


def one_run(site: LocalSite, samples: dict[str, list[float]]) -> None:
    site.found()
    samples["join_s"].append(measure_join(site))
    samples["join_s"].append(measure_join(site))
    rss, cpu, uss = measure_idle(site)
    samples["idle_rss_mb"].extend(rss)
    samples["idle_cpu_pct"].extend(cpu)
    samples["idle_uss_mb"].extend(uss)
    samples["deps_only_rss_mb"].append(measure_dependency_floor())
    samples["deploy_10_s"].append(measure_deploy(site, "bench"))
    victim = measure_node_failover(site, "bench", samples)
    # bring the victim back (same data dir), so the leader failover starts from three voters
    victim.start()
    site.wait_ready(victim)
    samples["leader_failover_s"].append(measure_leader_failover(site))


def main(argv: list[str] | None = None) -> int:
    return run_site_benchmark("one_site", __doc__, one_run, TARGETS, argv)


if __name__ == "__main__":
    sys.exit(main())
