"""Building the .deb for the tests (packaging/build-deb.sh), once per test session and
architecture: the unit checks of its contents and the system test that installs it share it.

Where dpkg-deb is missing the package tests skip (Debian's dpkg provides it, CI has it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGING = ROOT / "packaging"
BUILD_SCRIPT = PACKAGING / "build-deb.sh"
LOCK = PACKAGING / "requirements.lock"
# Collecting the locked wheels may download them from the package index (tens of MiB).
BUILD_TIMEOUT_S = 900


def project_version() -> str:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


def native_arch() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()


def build(out: Path, arch: str | None = None) -> Path:
    """Run the build script as the README says; the package's path."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed (Debian's dpkg package provides it)")
    before = {p.name for p in ROOT.iterdir()}
    args = ["bash", str(BUILD_SCRIPT), *(["--arch", arch] if arch else []), str(out)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
                            env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr[-4000:]
    created = {p.name for p in ROOT.iterdir()} - before
    assert not {n for n in created if n == "build" or n.endswith(".egg-info")}, "build output left in the tree"
    deb = out / f"meshd_{project_version()}_{arch or native_arch()}.deb"
    assert result.stdout.strip() == str(deb)
    assert deb.is_file()
    return deb


def dpkg_deb(*args: str) -> str:
    return subprocess.run(["dpkg-deb", *args], capture_output=True, text=True, check=True, timeout=120).stdout


def locked() -> dict[str, str]:
    """packaging/requirements.lock: normalized name -> exact version."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"not pinned exactly: {line}"
            pins[normalize(name)] = version.strip()
    return pins


def normalize(name: str) -> str:
    """PEP 503 name normalization."""
    return "-".join(filter(None, name.lower().replace("_", "-").replace(".", "-").split("-")))
