"""Idle site benchmark: CPU of every daemon of an idle 12-member site (5 voters, 7 non-voters),
target <= 1 % of a core per daemon.

    python3 -m tests.bench.idle_site [--members 12] [--window 20] [--windows 1] [--settle 5]
        [--json bench-results/idle_site.json]
    python3 -m tests.bench.idle_site --members 3,5,8,12   # the growth curve, in one run

One site of real `meshd run` processes on loopback (joins by mDNS, no workloads) grows to each
size of `--members` in turn (a member joins only once the previous one is `ready`). At each
size, once every member is ready and a settling pause has passed, each daemon's CPU is
measured from psutil cpu_times deltas (user + system, the daemon process only) over an idle
window of `--window` seconds, with its RSS at the end; `--windows K` measures K windows in a
row, and the medians are then over every daemon of a role and every window (one noisy window
on a shared machine moves them less). Rows per size (`m<N>_...`):
- `leader_cpu_pct`: the Raft leader; `voter_cpu_pct`: the other voters (followers);
  `nonvoter_cpu_pct`: the non-voters (members past the fifth replicate without voting);
  `cpu_pct`: every daemon; `worst_cpu_pct`: the busiest daemon (the 1 % target is per daemon,
  so this row is the one that says whether the site meets it);
- `rss_mb`: every daemon; `machine_busy_pct`: the whole machine's busy share during the
  window (other load on a shared machine inflates every CPU figure).
`daemons_exited` (target 0) counts daemons not alive at the end; the logs are scanned for a
wedged loop, tracebacks and error lines after the site is stopped. Table of medians (with
min/max) + JSON of every sample, the roles seen at each size, and any problems.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import psutil

from meshd.io.localsite import LocalSite
from tests.bench.report import report
from tests.bench.site_scale import MachineBusy, Problems, check_alive, scan_logs, stop_site

CPU_TARGET = 1.0  # % of one core per daemon, at every size (the 12-member goal, per daemon)
# Long enough to cover many heartbeat, report and Raft periods (a non-voter reports every
# lease / NONVOTER_REPORTS_PER_LEASE); psutil's tick resolution (10 ms) is 0.05 % of it.
DEFAULT_WINDOW_S = 20.0
# After the last join: its admission, first reports and Raft catch-up are start-up work, not
# idling; a few report periods let them finish before the window opens.
SETTLE_S = 5.0
JOIN_TIMEOUT_S = 60.0  # one join takes about 0.6 s (one_site); generous for a loaded 2-core box
STOP_TIMEOUT_S = 30.0  # SIGTERM -> exit of a daemon with no workloads


def log(msg: str) -> None:
    print(f"[idle_site {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def targets_for(sizes: list[int]) -> dict[str, tuple[float | None, str]]:
    targets: dict[str, tuple[float | None, str]] = {}
    for n in sizes:
        targets[f"m{n}_leader_cpu_pct"] = (CPU_TARGET, "% of a core")
        targets[f"m{n}_voter_cpu_pct"] = (CPU_TARGET, "% of a core")
        targets[f"m{n}_nonvoter_cpu_pct"] = (CPU_TARGET, "% of a core")
        targets[f"m{n}_cpu_pct"] = (CPU_TARGET, "% of a core")
        targets[f"m{n}_worst_cpu_pct"] = (CPU_TARGET, "% of a core")  # the busiest daemon: the target is per daemon
        targets[f"m{n}_rss_mb"] = (None, "MB")
        # Context: the whole machine's busy share during the window (other load inflates CPU figures)
        targets[f"m{n}_machine_busy_pct"] = (None, "% machine")
    targets["daemons_exited"] = (0.0, "count")
    targets["log_wedged_lines"] = (None, "count")
    targets["log_tracebacks"] = (None, "count")
    return targets


def roles(site: LocalSite) -> dict[str, str]:
    """Each live node's role as its own `status` says (leader/follower/nonvoter/...)."""
    out = {}
    for node in site.nodes:
        status = node.try_call("status") if node.alive else None
        out[node.name] = (status or {}).get("role", "no answer")
    return out


def measure(site: LocalSite, size: int, window: float, samples: dict[str, list[float]]) -> dict:
    nodes = [n for n in site.nodes if n.alive]
    procs = {n.name: psutil.Process(n.proc.pid) for n in nodes}
    before_roles = roles(site)
    before = {name: p.cpu_times() for name, p in procs.items()}
    busy = MachineBusy()
    time.sleep(window)
    samples[f"m{size}_machine_busy_pct"].append(busy.stop())
    after = {name: p.cpu_times() for name, p in procs.items() if p.is_running()}
    after_roles = roles(site)
    per_node = {}
    for name, a in after.items():
        b = before[name]
        cpu = 100.0 * ((a.user + a.system) - (b.user + b.system)) / window
        rss = procs[name].memory_info().rss / 1e6
        role = after_roles.get(name)
        per_node[name] = {"role": role, "cpu_pct": round(cpu, 3), "rss_mb": round(rss, 1)}
        kind = {"leader": "leader", "follower": "voter", "nonvoter": "nonvoter"}.get(role)
        if kind is not None:
            samples[f"m{size}_{kind}_cpu_pct"].append(cpu)
        samples[f"m{size}_cpu_pct"].append(cpu)
        samples[f"m{size}_rss_mb"].append(rss)
    if per_node:
        samples[f"m{size}_worst_cpu_pct"].append(max(v["cpu_pct"] for v in per_node.values()))
    counts: dict[str, int] = {}
    for role in after_roles.values():
        counts[role] = counts.get(role, 0) + 1
    return {"members": size, "roles": counts, "roles_changed_in_window": before_roles != after_roles,
            "per_node": per_node}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", default="12", help="a size or a comma list, e.g. 3,5,8,12 (grown in order)")
    parser.add_argument("--window", type=float, default=DEFAULT_WINDOW_S, help="idle CPU window per size, seconds")
    parser.add_argument("--windows", type=int, default=1, help="windows measured in a row at each size")
    parser.add_argument("--settle", type=float, default=SETTLE_S, help="pause after the last join, seconds")
    parser.add_argument("--json", default="bench-results/idle_site.json")
    args = parser.parse_args(argv)
    sizes = sorted({int(x) for x in args.members.split(",") if x.strip()})
    if not sizes or sizes[0] < 1:
        parser.error("--members needs sizes >= 1")
    targets = targets_for(sizes)
    samples: dict[str, list[float]] = {k: [] for k in targets}
    problems = Problems()
    steps: list[dict] = []
    # A short root: admin socket paths must fit in 107 bytes.
    with tempfile.TemporaryDirectory(prefix="mb-", dir="/tmp") as root:
        site = LocalSite(Path(root) / "idle", site="bench", prefix="i")
        try:
            for size in sizes:
                t0 = time.monotonic()
                site.grow(size, timeout=JOIN_TIMEOUT_S)
                log(f"{size} members ready ({time.monotonic() - t0:.1f} s of joins); settling {args.settle:g} s")
                time.sleep(args.settle)
                for _ in range(max(1, args.windows)):
                    if not check_alive(site, problems):
                        break
                    step = measure(site, size, args.window, samples)
                    steps.append(step)
                    log(f"{size} members: roles {step['roles']}, cpu % " +
                        ", ".join(f"{k}={v['cpu_pct']:.2f}" for k, v in step["per_node"].items()))
        except KeyboardInterrupt:  # Ctrl-C: stop the site, still report what was measured
            problems.add("interrupted")
        except Exception as exc:  # a site that would not form: report it rather than a bare traceback
            problems.add(f"run failed: {type(exc).__name__}: {exc}")
            print(site.dump_logs(), file=sys.stderr)
        finally:
            check_alive(site, problems)
            samples["daemons_exited"].append(float(sum(1 for n in site.nodes if n.proc is not None and not n.alive)))
            log("stopping the daemons")
            stop_site(site, problems, STOP_TIMEOUT_S)
            scan_logs(site, problems, samples)
    print(f"idle_site: sizes {sizes}, {max(1, args.windows)} window(s) of {args.window:g} s per size, "
          f"after {args.settle:g} s of settling")
    for step in steps:
        print(f"  {step['members']} members: roles {step['roles']}"
              + ("  (roles changed during the window)" if step["roles_changed_in_window"] else ""))
    report("idle_site", args.json, 1, samples, targets, sizes=sizes, window_s=args.window,
           windows=max(1, args.windows), settle_s=args.settle, steps=steps,
           problems=problems.items)
    if problems.items:
        print(f"\n{len(problems.items)} problem(s); the first lines of each (all in the JSON):")
        for p in problems.items:
            print("  - " + p.splitlines()[0][:300])
    return 0


if __name__ == "__main__":
    sys.exit(main())
