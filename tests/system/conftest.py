"""Fixtures that start real `meshd run` processes on loopback (mDNS on the loopback interface)."""

from __future__ import annotations

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
def three(make_site) -> LocalSite:
    site = make_site()
    site.start(3)
    return site


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
