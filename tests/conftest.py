"""Options and fixtures every test directory shares."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_addoption(parser):
    parser.addoption("--rewrite", action="store_true", default=False,
                     help="transcripts (tests/harness/testdata): write the actual output back into the files")


@pytest.fixture(scope="session")
def native_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package for this machine's architecture, built once per session."""
    from tests.debpkg import build
    return build(tmp_path_factory.mktemp("dist"))


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real tmpfs of a few MiB to fill up (tests.smalldisk); skips without root."""
    from tests.smalldisk import mounted
    yield from mounted(tmp_path)
