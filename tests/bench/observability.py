"""What watching a site costs: three real daemons on loopback, each with its Prometheus
endpoint on, running workloads in their cgroups (as root; without, unconfined).

    python3 -m tests.bench.observability [--runs 3] [--json bench-results/observability.json]

Each run builds a fresh site with metrics on, then one with `--metrics off` (the baseline of
the same run), deploys 3 replicas to each, and measures:
- idle CPU (% of a core) and RSS of each daemon over an idle window, on and off;
- scrape: one `GET /metrics` of the leader, as Prometheus makes it (median of SCRAPES), and
  the exposition's size;
- top: `meshctl top` on the leader across the three nodes (the others asked over the peer
  port), median of TOPS;
- the floor: a bare interpreter that imports meshd's required libraries (prometheus_client
  among them) and does nothing.
Prints a table of medians and writes every sample to JSON; medians, these machines are noisy.
"""

from __future__ import annotations

import statistics
import sys
import time
import urllib.request

from meshd.io.localsite import LocalSite, sleeper_app, wait_for
from tests.bench.one_site import measure_dependency_floor, measure_idle
from tests.bench.report import run_site_benchmark

TARGETS = {  # metric -> (target, unit); lower is better for all
    "idle_cpu_pct_metrics_on": (1.0, "% of a core"),
    "idle_cpu_pct_metrics_off": (None, "% of a core"),
    "idle_rss_mb_metrics_on": (45.0, "MB"),
    "idle_rss_mb_metrics_off": (None, "MB"),
    "scrape_ms": (None, "ms"),
    "exposition_kb": (None, "KB"),
    "top_3_nodes_ms": (None, "ms"),
    "deps_only_rss_mb": (None, "MB"),
}
SCRAPES = 20
TOPS = 10


def settle(site: LocalSite) -> None:
    site.found()
    site.join()
    site.join()
    leader = site.leader()
    leader.call("deploy", spec_toml=sleeper_app("watched", 3), wait=True, timeout=30)
    wait_for(lambda: len(site.running("watched")) == 3, 30, what="3 replicas running")


def one_run(site: LocalSite, samples: dict[str, list[float]]) -> None:
    settle(site)
    rss, cpu, _ = measure_idle(site)
    samples["idle_cpu_pct_metrics_on"].extend(cpu)
    samples["idle_rss_mb_metrics_on"].extend(rss)
    leader = site.leader()
    address = leader.call("status")["metrics"]
    times, size = [], 0
    for _ in range(SCRAPES):
        t0 = time.perf_counter()
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as answer:
            size = len(answer.read())
        times.append((time.perf_counter() - t0) * 1000)
    samples["scrape_ms"].append(statistics.median(times))
    samples["exposition_kb"].append(size / 1024)
    tops = []
    for _ in range(TOPS):
        t0 = time.perf_counter()
        rows = leader.call("top")
        tops.append((time.perf_counter() - t0) * 1000)
        assert len({r["node"] for r in rows}) == 3, rows
    samples["top_3_nodes_ms"].append(statistics.median(tops))
    samples["deps_only_rss_mb"].append(measure_dependency_floor())
    baseline = LocalSite(site.root.parent / f"{site.root.name}-off", site="bench-off",
                         prefix=f"{site.prefix}o", extra_args=("--metrics", "off"))
    try:
        settle(baseline)
        rss, cpu, _ = measure_idle(baseline)
        samples["idle_cpu_pct_metrics_off"].extend(cpu)
        samples["idle_rss_mb_metrics_off"].extend(rss)
    finally:
        baseline.close()


def main(argv: list[str] | None = None) -> int:
    return run_site_benchmark("observability", __doc__, one_run, TARGETS, argv)


if __name__ == "__main__":
    sys.exit(main())
