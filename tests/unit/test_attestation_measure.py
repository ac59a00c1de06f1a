"""attestation.measure: the package digest algorithm every reader of a build shares."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from attestation.measure import MEASURED_NAMES, digest_of, measured_file

ROOT = Path(__file__).resolve().parents[2]


def test_digest_depends_on_files_not_on_their_order() -> None:
    files = [("meshd", ("a.py",), b"x = 1\n"), ("crdt", ("b.py",), b""), ("attestation", ("c", "d.py"), b"y")]
    assert digest_of(files) == digest_of(list(reversed(files)))
    assert digest_of(files) != digest_of(files[:2])
    assert digest_of(files) != digest_of([("meshd", ("a.py",), b"x = 2\n"), *files[1:]])


def test_moving_bytes_between_a_name_and_its_contents_changes_the_digest() -> None:
    assert digest_of([("meshd", ("ab.py",), b"c")]) != digest_of([("meshd", ("a",), b"b.pyc")])
    assert digest_of([("meshd", ("a.py",), b"")]) != digest_of([("meshd", ("a.py",), b"\x00")])


def test_only_python_sources_outside_caches_are_measured() -> None:
    assert measured_file(("io", "peer.py"))
    assert not measured_file(("__pycache__", "peer.cpython-311.pyc"))
    assert not measured_file(("__pycache__", "x.py"))
    assert not measured_file(("data.json",)) and not measured_file(())


def test_needs_nothing_but_the_standard_library() -> None:
    """The package build runs it beside another architecture's compiled dependencies."""
    code = ("import sys\nfor name in ('cryptography', 'trio', 'psutil', 'pycrdt', 'zeroconf', 'pysyncobj'):\n"
            "    sys.modules[name] = None\n"
            "from meshd.io.builddigest import digest_build\nprint(digest_build('.').digest)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    from meshd.io.builddigest import measure_files
    assert result.stdout.strip() == measure_files([ROOT / name for name in MEASURED_NAMES])
