"""Fixtures that start real `meshd run` processes on loopback (mDNS on the loopback interface)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from meshd.io.localsite import LocalSite


@pytest.fixture
def site_root():
    # A short path: admin socket paths must fit in 107 bytes.
    with tempfile.TemporaryDirectory(prefix="mt-", dir="/tmp") as root:
        yield Path(root)


@pytest.fixture
def make_site(site_root, request):
    sites: list[LocalSite] = []

    def make(name: str = "t", **kwargs) -> LocalSite:
        site = LocalSite(site_root / name, site=kwargs.pop("site", "lab"), prefix=name, **kwargs)
        sites.append(site)
        return site

    yield make
    failed = getattr(request.node, "rep_call", None)
    for site in sites:
        if failed is not None and failed.failed:
            print(site.dump_logs())
        site.close()


@pytest.fixture
def make_lab(request):
    """Labs of network-namespace hosts (tests.lab); a failed test keeps every host's log
    under test-logs/<test name>/."""
    from tests.lab.lab import Lab, require_lab
    require_lab()
    labs: list[Lab] = []
    root = tempfile.mkdtemp(prefix="ml-", dir="/tmp")  # short: admin socket paths

    def make(sites: dict[str, int], **kwargs) -> Lab:
        lab = Lab(Path(root) / f"lab{len(labs)}", sites, **kwargs)
        labs.append(lab)
        return lab.build()

    yield make
    failed = getattr(request.node, "rep_call", None)
    for lab in labs:
        if failed is not None and failed.failed:
            kept = lab.keep_logs(Path("test-logs") / request.node.name)
            print(f"lab logs kept in {kept}")
            for site in lab.sites.values():
                print(site.dump_logs())
        lab.close()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def three(make_site) -> LocalSite:
    site = make_site()
    site.start(3)
    return site


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
