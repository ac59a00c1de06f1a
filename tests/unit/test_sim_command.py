"""`meshd sim` as a user runs it: a real process, its files, its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "sim"


def _sim(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshd.cli.meshd_main", "sim", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_a_scenario_runs_and_writes_its_timeline_summary_and_picture(tmp_path):
    out = tmp_path / "out"
    done = _sim(str(EXAMPLES / "factory-leader-loss.toml"), "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "press-1 killed" in done.stdout and "recovered after" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["run.svg", "summary.json", "timeline.jsonl"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == 7 and summary["failures"][0]["target"] == "press-1"
    again = _sim(str(EXAMPLES / "factory-leader-loss.toml"), "--out", str(tmp_path / "again"), cwd=tmp_path)
    assert (tmp_path / "again" / "timeline.jsonl").read_bytes() == (out / "timeline.jsonl").read_bytes()
    assert again.returncode == 0
    other = _sim(str(EXAMPLES / "factory-leader-loss.toml"), "--seed", "8", "--json", "--out", str(tmp_path / "o"),
                 cwd=tmp_path)
    assert json.loads(other.stdout)["seed"] == 8


def test_a_bad_scenario_is_one_error_line_naming_key_and_line_and_nothing_runs(tmp_path):
    scenario = tmp_path / "bad.toml"
    scenario.write_text('[sim]\nduration = "1m"\n[[site]]\nname = "a"\n[[site.node]]\nname = "n"\n'
                        '[[event]]\nat = -3\ndo = "kill"\nnode = "n"\n')
    done = _sim(str(scenario), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 78
    assert done.stderr == f"error: {scenario}:8: event[0].at: must not be negative, got -3\n"
    assert not (tmp_path / "out").exists() and done.stdout == ""
    missing = _sim(str(tmp_path / "nope.toml"), cwd=tmp_path)
    assert missing.returncode == 1 and missing.stderr.startswith("error: cannot read") and "Traceback" not in missing.stderr
