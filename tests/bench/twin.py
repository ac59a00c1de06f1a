"""The twin at fleet size: simulated seconds per wall second, by node count, with a failure
and (for many sites) one site lost and rejoining.

    python3 -m tests.bench.twin [--runs 3] [--sizes 50,500,2000,5000] [--sites 100x50]
                                [--json bench-results/twin.json]

Every figure is of `meshd sim`'s engine (meshd.twin) on one core, formation excluded (timed
apart as `form_s`):
- one site of N nodes (each size of `--sizes`): an app of min(N, 1000) replicas deployed at
  10 s, a member killed at 2 min, 5 simulated minutes in all; `sim_per_wall` is simulated
  seconds per wall second over the run (target >= 10), and `busy_sim_per_wall` the same over
  the 3 s after the kill, when every tick is stepped (no strides);
- the mesh of `--sites` (sites x nodes, every site linked to the first, 20 ms, 10 Mbit/s):
  an app across all sites deployed at 10 s, site 2 cut off at 1 min for 2 min, 5 minutes in
  all; `converge_s` is simulated time from the heal until both replicas of the document
  hold the same, and `converge_bytes` what the link carried meanwhile.
Prints a table of medians per size and writes every sample to JSON.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time

from meshd.twin.run import Twin
from meshd.twin.scenario import parse
from tests.bench.report import report

SIM_SECONDS = 300.0


def one_site(nodes: int) -> str:
    return textwrap.dedent(f"""\
        [sim]
        name = "one site of {nodes}"
        duration = "{SIM_SECONDS:g}s"
        [[site]]
        name = "big"
        [[site.node]]
        name = "n"
        count = {nodes}
        cpu = 8
        memory_mb = 8192
        [[app]]
        name = "web"
        replicas = {min(nodes, 1000)}
        command = ["web"]
        [app.resources]
        cpu = 0.5
        [[event]]
        at = "10s"
        do = "deploy"
        app = "web"
        [[event]]
        at = "2m"
        do = "kill"
        node = "n-2"
        """)


def mesh(sites: int, nodes: int) -> str:
    return textwrap.dedent(f"""\
        [sim]
        name = "{sites} sites of {nodes}"
        duration = "{SIM_SECONDS:g}s"
        [[site]]
        name = "hub"
        [[site.node]]
        name = "hub"
        count = 3
        [[site]]
        name = "s"
        count = {sites - 1}
        [[site.node]]
        name = "n"
        count = {nodes}
        [[link]]
        between = ["hub", "s"]
        delay = "20ms"
        bandwidth = "10mbit"
        [[app]]
        name = "web"
        replicas = 3
        command = ["web"]
        sites = ["s"]
        [[event]]
        at = "10s"
        do = "deploy"
        app = "web"
        via = "hub"
        [[event]]
        at = "1m"
        do = "cut"
        between = ["hub", "s-1"]
        for = "2m"
        """)


def measure(text: str, busy_from: float | None = None) -> dict[str, float]:
    twin = Twin(parse(text))
    started = time.perf_counter()
    twin.form()
    formed = time.perf_counter()
    twin.form = lambda: None  # formed already: run() goes straight to the loop
    marks: list[tuple[float, float]] = []
    twin.run(progress=lambda now: marks.append((now, time.perf_counter())))
    ended = time.perf_counter()
    out = {"form_s": formed - started, "sim_per_wall": SIM_SECONDS / (ended - formed), "steps": float(twin.steps)}
    if busy_from is not None:
        window = [(t, w) for t, w in marks if busy_from <= t <= busy_from + 3.0]
        if len(window) >= 2:
            out["busy_sim_per_wall"] = (window[-1][0] - window[0][0]) / (window[-1][1] - window[0][1])
    summary = twin.summary()
    for cut in summary["cuts"]:
        if cut["converged_after_s"] is not None:
            out["converge_s"] = cut["converged_after_s"]
            out["converge_bytes"] = float(cut["bytes_to_converge"])
    out["nodes"] = float(sum(len(s.nodes) for s in twin.sites.values()))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sizes", default="50,500,2000,5000")
    parser.add_argument("--sites", default="100x50", help="SITESxNODES for the mesh run, or none")
    parser.add_argument("--json", default="bench-results/twin.json")
    args = parser.parse_args(argv)
    cases = [(f"site_{n}", one_site(n), 120.0) for n in (int(x) for x in args.sizes.split(",") if x)]
    if args.sites != "none":
        sites, nodes = (int(x) for x in args.sites.split("x"))
        cases.append((f"mesh_{sites}x{nodes}", mesh(sites, nodes), None))
    samples: dict[str, list[float]] = {}
    targets: dict[str, tuple[float | None, str]] = {}
    for run in range(args.runs):
        for name, text, busy in cases:
            got = measure(text, busy)
            print(f"run {run + 1} {name}: " + ", ".join(f"{k} {v:,.2f}" for k, v in got.items()), flush=True)
            for metric, value in got.items():
                samples.setdefault(f"{name}.{metric}", []).append(value)
    for name, _, _ in cases:
        for metric, unit in (("nodes", "nodes"), ("form_s", "s"), ("sim_per_wall", "sim s/wall s"),
                             ("busy_sim_per_wall", "sim s/wall s"), ("steps", "steps"), ("converge_s", "sim s"),
                             ("converge_bytes", "bytes")):
            if f"{name}.{metric}" in samples:
                targets[f"{name}.{metric}"] = (None, unit)
    report("twin", args.json, args.runs, samples, targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
