"""Non-voters keep their lease with beats on the peer port, not with Raft commits
(meshd.io.services.beats and the `beat_hello` conversation of meshd.io.peer): six real
daemons on loopback, the sixth a non-voter."""

from __future__ import annotations

import time

import pytest

from meshd.io.localsite import wait_for

pytestmark = pytest.mark.system

# At rest a site commits only news: a report when free memory moves a step, a full resend
# the site lacks. Non-voters that renewed their lease by commits made 4 a second each.
IDLE_WINDOW_S = 4.0
MAX_IDLE_COMMITS = 4


def test_a_non_voter_stays_ready_without_commits_and_is_marked_down_when_it_stops_beating(make_site):
    site = make_site()
    site.start(6, timeout=60)
    leader = site.wait_leader()
    nonvoter = next(n for n in site.nodes if n.call("status")["role"] == "nonvoter")
    wait_for(lambda: site.node_state(nonvoter.name, via=leader) == "ready", 20, what="non-voter ready")

    before = leader.call("status")["raft_applied"]
    time.sleep(IDLE_WINDOW_S)  # over four leases: a non-voter without beats would be down by now
    assert site.node_state(nonvoter.name, via=leader) == "ready"
    assert leader.call("status")["raft_applied"] - before <= MAX_IDLE_COMMITS

    nonvoter.pause()  # SIGSTOP: no beats, no reports
    try:
        wait_for(lambda: site.node_state(nonvoter.name, via=leader) == "down", 10, what="silent non-voter down")
    finally:
        nonvoter.resume()
    wait_for(lambda: site.node_state(nonvoter.name, via=leader) == "ready", 30, what="non-voter ready again")
