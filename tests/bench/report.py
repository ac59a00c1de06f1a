"""What every benchmark prints and writes: a table of medians and a JSON file of all samples.

A metric has a target (lower is better) or None for context figures (baselines, breakdowns).
"""

from __future__ import annotations

import contextlib
import json
import platform
import statistics
from pathlib import Path

import psutil


def summarize(samples: dict[str, list[float]], targets: dict[str, tuple[float | None, str]]) -> list[dict]:
    rows = []
    for metric, (target, unit) in targets.items():
        values = samples.get(metric, [])
        if not values:
            continue
        median = statistics.median(values)
        rows.append({"metric": metric, "unit": unit, "n": len(values), "median": median, "min": min(values),
                     "max": max(values), "target": target,
                     "meets_target": None if target is None else median <= target})
    return rows


def print_table(rows: list[dict]) -> None:
    header = f"{'metric':<24} {'n':>4} {'median':>10} {'min':>10} {'max':>10} {'target':>8}  unit          ok"
    print(header)
    print("-" * len(header))
    for r in rows:
        target = "-" if r["target"] is None else f"{r['target']:.2f}"
        ok = "-" if r["meets_target"] is None else ("yes" if r["meets_target"] else "NO")
        print(f"{r['metric']:<24} {r['n']:>4} {r['median']:>10.4f} {r['min']:>10.4f} {r['max']:>10.4f} "
              f"{target:>8}  {r['unit']:<12}  {ok}")


def report(name: str, path: str, runs: int, samples: dict[str, list[float]],
           targets: dict[str, tuple[float | None, str]], **extra: object) -> list[dict]:
    """Print the table and write `path`; returns the summary rows."""
    rows = summarize(samples, targets)
    print_table(rows)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": name, "runs": runs, **extra, "machine": {
        "cpus": psutil.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "summary": rows, "samples": samples}, indent=2))
    print(f"wrote {out}")
    return rows


def run_site_benchmark(name: str, doc: str, one_run, targets: dict[str, tuple[float | None, str]],
                       argv: list[str] | None = None) -> int:
    """The main of a benchmark that builds a fresh local site per run: `one_run(site, samples)`
    appends to `samples[metric]`; the site's logs are printed if a run fails."""
    import argparse
    import sys
    import tempfile

    from meshd.io.localsite import LocalSite

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", default=f"bench-results/{name}.json")
    args = parser.parse_args(argv)
    samples: dict[str, list[float]] = {k: [] for k in targets}
    # A short root: admin socket paths must fit in 107 bytes.
    with tempfile.TemporaryDirectory(prefix="mb-", dir="/tmp") as root:
        for i in range(args.runs):
            site = LocalSite(Path(root) / f"run{i}", site="bench", prefix=f"b{i}")
            try:
                one_run(site, samples)
            except Exception:
                print(site.dump_logs(), file=sys.stderr)
                raise
            finally:
                site.close()
            print(f"run {i + 1}/{args.runs} done", file=sys.stderr)
    report(name, args.json, args.runs, samples, targets)
    return 0


@contextlib.contextmanager
def showing_logs(lab):
    """One benchmark run on a lab (tests.lab.Lab): its sites' logs are printed if the run
    fails, and the lab is closed after it, whatever happened."""
    import sys
    try:
        yield lab
    except Exception:
        for site in lab.sites.values():
            print(site.dump_logs()[-20000:], file=sys.stderr)
        raise
    finally:
        lab.close()
