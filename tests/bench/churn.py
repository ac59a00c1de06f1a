"""Churn benchmark: does a site stay the same size while it deploys and stops all day?

    python3 -m tests.bench.churn [--minutes 60] [--warmup-minutes 10] [--rate 1]
        [--retention 300] [--json bench-results/churn.json]

A fresh three-node site on loopback (real `meshd run` processes) takes one deploy of a new
app (one replica of `sleep 3600`) and one stop of the app deployed `--keep` deploys earlier,
`--rate` times a second, through the admin socket as `meshctl deploy` / `stop` do. The
daemons run with `--stopped-app-retention` and `--document-retention` of `--retention`
seconds, so a stopped app is forgotten by the site and its edits compacted out of the mesh
document once that long has passed: the state can reach a steady size within the run (with
the defaults, a day and 30 days, it grows for that long, by design).

After `--warmup-minutes` (longer than the retention, so the first forgotten apps are behind
it) every daemon's RSS is sampled once a minute until `--minutes`; the figure is each
daemon's growth from the first sample after warm-up to the last (target: within 2 MB), with
the slope per hour and the site's allocation count and document size at the end for
context. Each compaction of the document (one a retention) makes a sawtooth of several MB,
so two more figures look past it: the least-squares trend through every sample, and the
growth from the median of the first five samples to that of the last five. Prints a table and writes every sample to JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

from meshd.io.localsite import LocalSite
from tests.bench.report import report

TARGETS = {
    "rss_growth_mb": (2.0, "MB"),  # each daemon: last sample - first sample after warm-up
    "rss_slope_mb_per_h": (None, "MB/h"),
    # the least-squares line through every sample after warm-up: the trend under the sawtooth
    # of compactions (one a retention), which the first and last sample alone can miss or inflate
    "rss_trend_mb_per_h": (None, "MB/h"),
    # median of the last WINDOW samples minus median of the first WINDOW: growth across whole
    # sawtooth periods at the default retention (300 s, 5 samples)
    "rss_window_growth_mb": (None, "MB"),
    "rss_mb": (None, "MB"),
    "site_allocs": (None, "count"),  # at the end, the leader's view
    "site_apps": (None, "count"),
    "ops_per_s": (None, "1/s"),  # deploys + stops done per second (the pace held)
    "failed_ops": (None, "count"),
}

SITE_SIZE = 3
SAMPLE_PERIOD_S = 60.0  # RSS moves slowly; a minute keeps the sampling itself out of the figure
# Stops trail deploys by this many apps: that many run at any time.
DEFAULT_KEEP = 20
WINDOW = 5  # samples per window of rss_window_growth_mb
REQUEST_TIMEOUT_S = 30.0  # one admin request; a slow one is counted, not waited for forever


def trend(points: list[tuple[float, float]]) -> float:
    """The least-squares slope of (t, value) points, per second (0 for fewer than two)."""
    if len(points) < 2:
        return 0.0
    mt = statistics.fmean(t for t, _ in points)
    mv = statistics.fmean(v for _, v in points)
    spread = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (v - mv) for t, v in points) / spread if spread else 0.0


def app_toml(name: str) -> str:
    return f'[app]\nname = "{name}"\nreplicas = 1\ncommand = ["sleep", "3600"]\n'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--warmup-minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=1.0, help="deploys (and stops) per second")
    parser.add_argument("--keep", type=int, default=DEFAULT_KEEP)
    parser.add_argument("--retention", type=float, default=300.0)
    parser.add_argument("--json", default="bench-results/churn.json")
    args = parser.parse_args(argv)
    if args.warmup_minutes * 60 <= args.retention:
        parser.error("the warm-up must be longer than the retention (nothing is forgotten before it)")
    samples: dict[str, list[float]] = {k: [] for k in TARGETS}
    extra = ("--stopped-app-retention", str(args.retention), "--document-retention", str(args.retention))
    rss: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="mc-", dir="/tmp") as root:
        site = LocalSite(Path(root) / "churn", site="churn", prefix="c", extra_args=extra)
        try:
            site.start(SITE_SIZE)
            started = time.monotonic()
            end = started + args.minutes * 60
            warm = started + args.warmup_minutes * 60
            next_sample = warm
            period = 1.0 / args.rate
            n = failed = 0
            while time.monotonic() < end:
                tick = time.monotonic()
                via = site.nodes[n % SITE_SIZE]
                try:
                    via.call("deploy", timeout=REQUEST_TIMEOUT_S, spec_toml=app_toml(f"c{n}"), wait=False)
                    if n >= args.keep:
                        via.call("stop", timeout=REQUEST_TIMEOUT_S, app=f"c{n - args.keep}")
                except Exception as e:  # counted: the run goes on, as an operator's script would
                    failed += 1
                    print(f"op {n} failed: {e}", file=sys.stderr)
                n += 1
                if time.monotonic() >= next_sample:
                    for node in site.nodes:
                        if node.alive:
                            rss.setdefault(node.name, []).append(
                                (time.monotonic() - started, psutil.Process(node.proc.pid).memory_info().rss / 2**20))
                    next_sample += SAMPLE_PERIOD_S
                    print(f"{(time.monotonic() - started) / 60:.1f} min: ops {n}, failed {failed}, rss "
                          + ", ".join(f"{k} {v[-1][1]:.1f}" for k, v in rss.items()), file=sys.stderr, flush=True)
                time.sleep(max(0.0, period - (time.monotonic() - tick)))
            samples["ops_per_s"].append(2 * n / (args.minutes * 60))
            samples["failed_ops"].append(float(failed))
            for points in rss.values():
                (t0, first), (t1, last) = points[0], points[-1]
                samples["rss_growth_mb"].append(last - first)
                samples["rss_slope_mb_per_h"].append((last - first) / max(t1 - t0, 1) * 3600)
                samples["rss_trend_mb_per_h"].append(trend(points) * 3600)
                values = [v for _, v in points]
                samples["rss_window_growth_mb"].append(statistics.median(values[-WINDOW:])
                                                       - statistics.median(values[:WINDOW]))
                samples["rss_mb"].append(last)
            leader = site.wait_leader()
            samples["site_allocs"].append(float(len(leader.call("allocs", timeout=REQUEST_TIMEOUT_S))))
            samples["site_apps"].append(float(len(leader.call("apps", timeout=REQUEST_TIMEOUT_S))))
        except Exception:
            print(site.dump_logs(), file=sys.stderr)
            raise
        finally:
            site.close()
    report("churn", args.json, 1, samples, TARGETS, rss=rss, args=vars(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
