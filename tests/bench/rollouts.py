"""Rollout benchmark: a rolling update and an automatic revert on three real daemons.

    python3 -m tests.bench.rollouts [--runs 5] [--json bench-results/rollouts.json]

Each run builds a fresh three-node site (separate `meshd run` processes on loopback) and:
- deploys v1 of an app of 10 replicas (`[app.update]` max_parallel = 2, min_healthy_s = 1,
  an exec health check every 0.2 s), waits until it is stable;
- rolling update: deploys v2 (another command) -> every replica index runs a healthy v2
  replica and no v1 replica is left (`rolling_update_s`); meanwhile the healthy replicas are
  counted every 20 ms (`min_healthy_seen`; the contract's floor is replicas - max_parallel =
  8, so higher is better and the table's "target" is that floor);
- revert: deploys v3, whose health check always fails, with healthy_deadline_s = 3: from the
  first v3 replica shown `unhealthy` -> v2 is the app's version again, its 10 replicas
  healthy, no v3 replica left (`revert_s`; target healthy_deadline_s + 2 s = 5 s).
Prints a table of medians and writes every sample to JSON.
"""

from __future__ import annotations

import sys
import time

from meshd.io.localsite import LocalSite, wait_for
from tests.bench.one_site import measure_join
from tests.bench.report import run_site_benchmark

REPLICAS = 10
MAX_PARALLEL = 2
HEALTHY_DEADLINE_S = 3.0
TARGETS = {
    "rolling_update_s": (None, "s"),
    # Higher is better: the table's target column is the floor the contract promises.
    "min_healthy_seen": (None, "replicas"),
    "revert_s": (HEALTHY_DEADLINE_S + 2.0, "s"),
}
POLL_S = 0.02


def spec(command: str, check: str) -> str:
    return (f'[app]\nname = "roll"\nreplicas = {REPLICAS}\ncommand = ["sh", "-c", "{command}"]\n'
            f'[app.health]\nkind = "exec"\ncommand = ["sh", "-c", "{check}"]\ninterval_s = 0.2\ntimeout_s = 0.2\n'
            f'failures = 1\n'
            f'[app.update]\nmax_parallel = {MAX_PARALLEL}\nmin_healthy_s = 1\n'
            f'healthy_deadline_s = {HEALTHY_DEADLINE_S}\nprogress_deadline_s = 60\n')


def allocs(site: LocalSite) -> list[dict]:
    leader = site.leader() or site.any_alive()
    return [a for a in (leader.try_call("allocs", app="roll", node=None) or [])
            if a["desired"] == "run" and a["state"] in ("running", "pending")]


def current_version(site: LocalSite) -> int | None:
    leader = site.leader() or site.any_alive()
    rows = leader.try_call("history", app="roll") or []
    return next((r["version"] for r in rows if r.get("current")), None)


def all_healthy_of(live: list[dict], version: int) -> bool:
    """Every replica index runs a healthy replica of `version`, and no other version is left."""
    healthy = {a["replica"] for a in live if a["version"] == version and a["state"] == "running"
               and a["health"] == "healthy"}
    return len(healthy) >= REPLICAS and all(a["version"] == version for a in live)


def deploy(site: LocalSite, toml: str) -> int:
    leader = site.leader()
    return leader.call("deploy", spec_toml=toml, wait=False, timeout=None)["version"]


def one_run(site: LocalSite, samples: dict[str, list[float]]) -> None:
    site.found()
    measure_join(site)
    measure_join(site)
    v1 = deploy(site, spec("exec sleep 3601", "true"))
    wait_for(lambda: all_healthy_of(allocs(site), v1), 60, what="v1 healthy")
    time.sleep(1.5)  # v1 soaks its min_healthy_s: stable, the version a failure returns to

    v2 = deploy(site, spec("exec sleep 3602", "true"))
    t0 = time.monotonic()
    lowest = REPLICAS
    while True:
        live = allocs(site)
        lowest = min(lowest, sum(1 for a in live if a["state"] == "running" and a["health"] == "healthy"))
        if all_healthy_of(live, v2):
            break
        if time.monotonic() - t0 > 120:
            raise TimeoutError("the rolling update did not finish within 120 s")
        time.sleep(POLL_S)
    samples["rolling_update_s"].append(time.monotonic() - t0)
    samples["min_healthy_seen"].append(lowest)
    time.sleep(1.5)  # v2 becomes stable

    deploy(site, spec("exec sleep 3603", "false"))
    first_unhealthy = None
    t_deploy = time.monotonic()
    while True:
        live = allocs(site)
        if first_unhealthy is None and any(a["version"] != v2 and a["health"] == "unhealthy" for a in live):
            first_unhealthy = time.monotonic()
        if first_unhealthy is not None and current_version(site) == v2 and all_healthy_of(live, v2):
            break
        if time.monotonic() - t_deploy > 120:
            raise TimeoutError("the failing version was not reverted within 120 s")
        time.sleep(POLL_S)
    samples["revert_s"].append(time.monotonic() - first_unhealthy)


def main(argv: list[str] | None = None) -> int:
    return run_site_benchmark("rollouts", __doc__, one_run, TARGETS, argv)


if __name__ == "__main__":
    sys.exit(main())
