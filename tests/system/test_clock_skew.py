"""Members of a real site whose clocks are an hour off (libfaketime shifts the wall clock of
one daemon; its monotonic clock, which leases and timeouts use, is left alone): a board
without a real-time clock after an offline reboot, an unsynced NTP step.

- A member an hour ahead joins, stays, keeps its document-sync sessions, and is told it is
  skewed (`status`, `nodes`, an event, its metrics): never expelled for it.
- A leader an hour ahead expels nobody: the site keeps all its members and its one Raft
  secret (no rotation), and the members an hour behind it are told so.
"""

from __future__ import annotations

import glob
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshd.io.localsite import wait_for

pytestmark = pytest.mark.system

LIBFAKETIME = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
REATTEST = ("--reattest-interval", "1")  # re-attest every second, so the test sees several
# Re-attestations the site gets through before the test judges (one a second per member).
SETTLE = 8.0
# Every member re-attested at least once: two retry delays after a refused challenge.
SKEW_JUDGED_WITHIN = 25.0


def skewed(node, offset: str) -> None:
    """Run `node` with its wall clock shifted by `offset` ("+1h", "-1h")."""
    if not LIBFAKETIME:
        pytest.skip("libfaketime is not installed (Debian: faketime)")
    node.env = {"LD_PRELOAD": LIBFAKETIME[0], "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def members(via) -> dict[str, dict]:
    return {row["name"]: row for row in via.call("nodes")}


def test_a_member_an_hour_ahead_joins_stays_and_is_told(make_site):
    site = make_site(extra_args=REATTEST)
    site.start(2)
    leader = site.leader()
    ahead = site.add_node()
    skewed(ahead, "+1h")
    ahead.start(join=site.token())
    site.wait_ready(ahead, 30)
    wait_for(lambda: (ahead.call("status").get("clock_skew_s") or 0) > 3500, 20, what="the skew told")
    time.sleep(SETTLE)
    status = ahead.call("status")
    assert status["clock_skewed"] and 3500 < status["clock_skew_s"] < 3700
    # and in its metrics (meshd.io.metrics), read with the reference parser
    skew = [s.value for f in text_string_to_metric_families(ahead.call("metrics")) for s in f.samples
            if s.name == "meshd_node_clock_skew_seconds"]
    assert len(skew) == 1 and 3500 < skew[0] < 3700, skew
    rows = members(leader)
    assert {r["state"] for r in rows.values()} == {"ready"} and len(rows) == 3
    assert 3500 < rows[ahead.name]["clock_skew_s"] < 3700
    events = [e["message"] for e in leader.call("events")]
    assert any(f"the clock of {ahead.name} is 36" in m and "ahead" in m for m in events)
    assert not any("revoked" in m or "failed re-attestation" in m for m in events), events
    # its document-sync sessions hold (a certificate an hour old is within the tolerance)
    wait_for(lambda: any(s["synced"] for s in ahead.call("document", brief=True)["sessions"]), 20,
             what="a synced document session")
    assert ahead.call("status")["role"] == "follower"


def test_a_leader_an_hour_ahead_expels_nobody_and_the_site_keeps_one_secret(make_site):
    site = make_site(extra_args=REATTEST)
    founder = site.add_node()
    skewed(founder, "+1h")
    founder.start()
    wait_for(lambda: (founder.try_call("status") or {}).get("role") == "leader", 20, what="the founder leading")
    site.wait_ready(founder, 20)
    site.join()
    site.join()
    time.sleep(SETTLE)
    # A member challenged before it caught up with the site refuses the leader's call, which
    # is asked again after meshd.node.attesting.RETRY_DELAY: wait for every judgement.
    behind = lambda: all((members(founder).get(n.name) or {}).get("clock_skew_s", 0) < -3500  # noqa: E731
                         for n in site.nodes[1:])
    wait_for(behind, SKEW_JUDGED_WITHIN, what="both members judged an hour behind the leader")
    rows = members(founder)
    assert len(rows) == 3 and {r["state"] for r in rows.values()} == {"ready"}, rows
    for node in site.nodes[1:]:
        assert rows[node.name]["clock_skew_s"] < -3500  # an hour behind the leader's
        status = node.call("status")
        assert status["role"] == "follower" and status["leader"] == founder.name and status["clock_skewed"]
    events = [e["message"] for e in founder.call("events")]
    assert not any("revoked" in m or "rotation" in m or "failed re-attestation" in m for m in events), events
    assert founder.call("status")["term"] == 1  # no election: the site never split
