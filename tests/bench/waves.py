"""Waves benchmark: a rollout across three sites in three waves, one site cut off in its wave.

    python3 -m tests.bench.waves [--runs 5] [--cut-s 30] [--json bench-results/waves.json]

Each run builds a fresh lab (tests.lab, needs root): three one-host sites a, b and c of one
mesh, each host its own network namespace and `meshd run` process (sync every second). An
app of one replica per site is rolled out as v1 in waves a, b, c (min_healthy_s = 1) until
every site calls it succeeded; then v2 the same way, and as soon as v2's wave reaches b, b is
cut off at the router for --cut-s seconds. b runs its part alone; c waits for b's word.
Measured:
- after_heal_s: the router link back -> every site's `deployments` shows v2's rollout
  succeeded (c ran its wave in between: b's word had to arrive first);
- rollout_s: v2's whole rollout, deploy -> succeeded everywhere, cut included (context);
- uncut_rollout_s: v1's rollout, without a cut (the baseline of the same run).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from meshd.io.localsite import wait_for
from tests.bench.report import report, showing_logs
from tests.lab.lab import Lab, require_lab

TARGETS: dict[str, tuple[float | None, str]] = {
    "after_heal_s": (None, "s"),
    "rollout_s": (None, "s"),
    "uncut_rollout_s": (None, "s"),
}
FAST_SYNC = ("--sync-interval", "1")
HOSTS = ("a-1", "b-1", "c-1")
POLL_S = 0.05


def spec(command: str) -> str:
    return (f'[app]\nname = "det"\nreplicas = 1\ncommand = ["sh", "-c", {json.dumps(command)}]\n'
            f'sites = ["a", "b", "c"]\n[app.update]\nmin_healthy_s = 1\n'
            f'[app.rollout]\nwaves = [{{ sites = ["a"] }}, {{ sites = ["b"] }}, {{ sites = ["c"] }}]\n')


def row(lab: Lab, host: str, edit_id: str) -> dict:
    rows = lab.call(host, "deployments", app="det") or []
    return next((r for r in rows if r.get("edit_id") == edit_id and "rollout" in r), {})


def done_everywhere(lab: Lab, edit_id: str) -> bool:
    return all(row(lab, host, edit_id).get("state") == "succeeded" for host in HOSTS)


def start_three_sites(lab: Lab) -> Lab:
    lab.start_site("a")
    lab.start_site_in_mesh("b", via="a-1")
    lab.start_site_in_mesh("c", via="a-1")
    wait_for(lambda: all(any(r["site"] == s and r.get("reachable") for r in lab.call(h, "sites"))
                         for h in HOSTS for s in "abc"), 60, what="every site reachable from every site")
    return lab


def one_run(lab: Lab, cut_s: float, samples: dict[str, list[float]]) -> None:
    t0 = time.monotonic()
    v1 = lab.call("a-1", "deploy", spec_toml=spec("exec sleep 3601"), wait=False, timeout=30)
    wait_for(lambda: done_everywhere(lab, v1["edit_id"]), 120, interval=POLL_S, what="v1 rolled out")
    samples["uncut_rollout_s"].append(time.monotonic() - t0)

    t0 = time.monotonic()
    v2 = lab.call("a-1", "deploy", spec_toml=spec("exec sleep 3602"), wait=False, timeout=30)
    wait_for(lambda: (row(lab, "b-1", v2["edit_id"]).get("sites") or {}).get("b", {}).get("state")
             not in (None, "pending"), 120, interval=POLL_S, what="v2's wave reaching b")
    lab.isolate_site("b")
    time.sleep(cut_s)
    assert row(lab, "c-1", v2["edit_id"])["sites"]["c"]["state"] == "pending", "c must wait for b's word"
    healed = time.monotonic()
    lab.reconnect_site("b")
    wait_for(lambda: done_everywhere(lab, v2["edit_id"]), 120, interval=POLL_S, what="v2 rolled out after the heal")
    samples["after_heal_s"].append(time.monotonic() - healed)
    samples["rollout_s"].append(time.monotonic() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cut-s", type=float, default=30.0)
    parser.add_argument("--json", default="bench-results/waves.json")
    args = parser.parse_args(argv)
    require_lab()
    samples: dict[str, list[float]] = {k: [] for k in TARGETS}
    with tempfile.TemporaryDirectory(prefix="mb-", dir="/tmp") as root:  # short: admin socket paths
        for i in range(args.runs):
            with showing_logs(Lab(Path(root) / f"run{i}", {"a": 1, "b": 1, "c": 1}, meshd_args=FAST_SYNC,
                                  seed=i).build()) as lab:
                start_three_sites(lab)
                one_run(lab, args.cut_s, samples)
            print(f"run {i + 1}/{args.runs} done", file=sys.stderr)
    report("waves", args.json, args.runs, samples, TARGETS, cut_s=args.cut_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
