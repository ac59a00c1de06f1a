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


@pytest.fixture
def real_cgroups():
    """This node's cgroup subtree on this machine's real cgroups (meshd.io.cgroups), opened,
    every limit enforceable; skips without root or controllers. Swept and removed after."""
    import os
    import uuid

    from meshd.io import cgroups
    if os.geteuid() != 0:
        pytest.skip("cgroups need root here")
    found = cgroups.Cgroups.found(f"test-{uuid.uuid4().hex[:8]}")
    found.open()
    if found.enforceable != frozenset(cgroups.CONTROLLERS):
        pytest.skip(f"this machine cannot enforce every limit: {found.problem}")
    yield found
    found.sweep()
    for _, directory in found.hierarchy.dirs:
        try:
            os.rmdir(found.base(directory))
        except OSError:
            pass
