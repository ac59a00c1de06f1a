"""Other programs on the lab's hosts: a stock mDNS client (avahi) sees meshd nodes, and the Serf
agents the lab benchmark measures meshd against really form a cluster and notice a kill.

The Serf test checks the baseline itself: a comparison is only worth what its reference is.
"""

from __future__ import annotations

import time

import pytest

from tests.lab.avahi import AvahiObserver
from tests.lab.lab import require_lab
from tests.lab.serf import SerfAgent

pytestmark = pytest.mark.system


def test_avahi_browse_resolves_every_meshd_node_with_address_port_and_txt(make_lab):
    require_lab("avahi-daemon", "avahi-browse", "dbus-daemon")
    lab = make_lab({"lab": 3})
    observer = AvahiObserver(lab, "lab-3", lab.root / "observer").start()
    site = lab.sites["lab"]
    site.found()
    site.join()
    for host in ("lab-1", "lab-2"):
        status = lab.call(host, "status")
        seen = observer.wait_resolved(status["node_id"], timeout=20)
        assert seen.interface == "eth0"
        assert seen.service_type == "_meshd._tcp"
        assert f"{seen.address}:{seen.port}" == status["address"]
        assert seen.address == lab.hosts[host].address
        assert seen.txt["site"] == "lab"
        assert seen.txt["id"] == status["node_id"]
        assert seen.txt["v"] == status["version"]


def test_serf_agents_find_each_other_by_mdns_and_report_a_killed_agent_failed(make_lab):
    require_lab("serf")
    lab = make_lab({"lab": 3})
    agents = {h: SerfAgent(lab, h) for h in ("lab-1", "lab-2", "lab-3")}
    started: list[str] = []
    for host, agent in agents.items():  # one by one: Serf polls mDNS once at start, then every minute
        agent.start()
        agent.wait_event("join", host, after=0.0, timeout=20)
        started.append(host)
        for other in started:
            agent.wait_event("join", other, after=0.0, timeout=20)
            agents[other].wait_event("join", host, after=0.0, timeout=20)
    assert agents["lab-1"].members() == {h: "alive" for h in agents}
    killed_at = time.monotonic()
    agents["lab-3"].kill()
    for host in ("lab-1", "lab-2"):
        assert agents[host].wait_event("failed", "lab-3", after=killed_at, timeout=30) > killed_at
    assert agents["lab-2"].members()["lab-3"] == "failed"
