"""A small real filesystem to fill up: a tmpfs of a few MiB (mounting one needs root; the
tests that need it skip without). The `small_disk` fixture lives in tests/conftest.py."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

SIZE = "8m"  # room for a few journals and records, filled in well under a second


def mounted(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "a"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> None:
    """Write until the filesystem refuses: it is full."""
    with open(directory / "filler", "wb", buffering=0) as out:  # nothing left to flush at close
        try:
            while True:
                out.write(b"\0" * (1 << 20))
        except OSError as e:
            assert e.errno == errno.ENOSPC
