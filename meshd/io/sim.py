"""`meshd sim SCENARIO.toml [--seed N] [--out DIR]`: read the scenario, run the twin
(meshd.twin.run), print its timeline and summary, write `timeline.jsonl`, `summary.json`
and `run.svg` into DIR.

Invariants:
- A scenario that does not parse is one `error: FILE:LINE: key: reason` line and exit 78
  (EXIT_CONFIG); nothing runs and nothing is written.
- The files are written whole (a temporary name, then a rename): a run cut short by Ctrl-C
  leaves the previous run's files or none, never half of one.
- Progress (simulated time reached, speed) goes to stderr once a second of wall time, only
  when stderr is a terminal; what is written does not depend on the wall clock.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from meshd.exitcodes import EXIT_CONFIG, EXIT_ERROR, EXIT_OK
from meshd.twin import report
from meshd.twin.run import Twin
from meshd.twin.scenario import ScenarioError, parse


def load(path: Path):
    """The scenario at `path`; ScenarioError (its key and line) or OSError."""
    text = path.read_text(encoding="utf-8")
    base = path.parent

    def read(name: str) -> str:
        if not isinstance(name, str) or not name:
            raise TypeError("file must be a path")
        return (base / name).read_text(encoding="utf-8")
    return parse(text, read)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def run_sim(scenario_path: str, seed: int | None, out: str | None, quiet: bool, as_json: bool) -> int:
    path = Path(scenario_path)
    try:
        scenario = load(path)
    except ScenarioError as e:
        where = f"{path}:{e.line}" if e.line else str(path)
        print(f"error: {where}: {e.key}: {e.reason}", file=sys.stderr)
        return EXIT_CONFIG
    except (OSError, UnicodeDecodeError) as e:
        print(f"error: cannot read {path}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return EXIT_ERROR
    if seed is not None and not 0 <= seed < 2**63:
        print("error: --seed must be a whole number from 0", file=sys.stderr)
        return EXIT_CONFIG
    directory = Path(out) if out else Path(f"{path.stem}-sim")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: cannot create {directory}: {e.strerror or e}", file=sys.stderr)
        return EXIT_ERROR
    twin = Twin(scenario, seed)
    started = time.monotonic()
    progress = sys.stderr.isatty() and not quiet
    shown = [started]

    def tell(now: float) -> None:
        at = time.monotonic()
        if progress and at - shown[0] >= 1.0:
            shown[0] = at
            print(f"\rsimulated {now:,.0f} of {scenario.duration:,.0f} s ({now / (at - started):,.0f} s per wall s)",
                  end="", file=sys.stderr, flush=True)
    try:
        twin.run(progress=tell)
    except KeyboardInterrupt:
        print("\nerror: interrupted; nothing written", file=sys.stderr)
        return EXIT_ERROR
    wall = time.monotonic() - started
    if progress:
        print("\r" + " " * 70 + "\r", end="", file=sys.stderr)
    summary_text = report.summary_json(twin)
    try:
        _write(directory / "timeline.jsonl", report.timeline_jsonl(twin))
        _write(directory / "summary.json", summary_text)
        _write(directory / "run.svg", report.picture(twin))
    except OSError as e:
        print(f"error: cannot write into {directory}: {e.strerror or e}", file=sys.stderr)
        return EXIT_ERROR
    if as_json:
        print(summary_text, end="")
    else:
        if not quiet:
            print(report.timeline_text(twin), end="")
            print()
        print(report.summary_text(twin.summary()), end="")
        print(f"wrote {directory}/timeline.jsonl, summary.json, run.svg")
    print(f"{scenario.duration:,.0f} simulated s in {wall:.1f} wall s "
          f"({scenario.duration / max(wall, 1e-9):,.0f} x), {twin.steps} steps", file=sys.stderr)
    return EXIT_OK
