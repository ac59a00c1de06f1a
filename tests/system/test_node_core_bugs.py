"""Real daemons on loopback, for the two node-core decisions that only show with real
processes: a revocation (secret rotation, Raft restarted on every member, a leader change)
never stops a healthy workload, and devices powered on together all join.

The rules themselves are checked in transcripts (tests/harness/testdata/); these tests keep
one run of each against real pysyncobj, real mDNS and real processes.
"""

from __future__ import annotations

import time

import pytest

from meshd import exitcodes
from meshd.io.localsite import sleeper_app, wait_for
from meshd.io.ports import free_port

pytestmark = pytest.mark.system


def _healthy(site, app: str, replicas: int, via) -> bool:
    rows = [a for a in (via.try_call("allocs", app=app, node=None) or [])
            if a["desired"] == "run" and a["state"] == "running"]
    return len(rows) == replicas


def test_revoking_a_member_during_a_drain_leaves_every_app_at_its_replica_count(three):
    leader = three.leader()
    leader.call("deploy", spec_toml=sleeper_app("svc", 3), wait=True, timeout=30)
    followers = [n for n in three.nodes if n is not leader]
    # as an operator tried it: drain and undrain two nodes, then revoke one while the other drains
    for node in followers:
        leader.call("drain", node=node.name)
        wait_for(lambda: _healthy(three, "svc", 3, leader), 20, what=f"svc back at 3 after draining {node.name}")
        leader.call("undrain", node=node.name)
    victim, draining = followers
    leader.call("drain", node=draining.name)
    leader.call("revoke", node=victim.name, reason="stolen")
    assert victim.proc.wait(timeout=20) == exitcodes.EXIT_REVOKED
    leader.call("undrain", node=draining.name)
    started = time.monotonic()
    wait_for(lambda: _healthy(three, "svc", 3, leader), 5, what="svc at 3 replicas within 5 s of the undrain")
    # and it stays there: no replica meshd stopped itself is left counting as one
    deadline = started + 8
    while time.monotonic() < deadline:
        via = three.leader() or leader
        rows = via.try_call("allocs", app="svc", node=None) or []
        stopped_by_meshd = [a for a in rows if a["desired"] == "run" and a["state"] in ("stopped", "failed")]
        assert not stopped_by_meshd, stopped_by_meshd
        time.sleep(0.2)


def test_ten_daemons_started_within_one_second_all_become_ready(make_site):
    site = make_site("cj")
    founder = site.found()
    tokens = [site.token(via=founder) for _ in range(9)]
    joiners = [site.add_node() for _ in tokens]
    for node, token in zip(joiners, tokens):  # powered on together: all within one second
        node.start(join=token)
        time.sleep(0.1)
    for node in joiners:
        site.wait_ready(node, timeout=90)
    rows = founder.call("nodes")
    assert sorted(r["state"] for r in rows) == ["ready"] * 10
    assert sum(1 for r in rows if r["role"] in ("leader", "follower")) == 5


def test_a_joiner_that_reaches_nobody_says_so_in_its_log_and_its_status(site_root):
    """Every failed attempt is logged with the address and the reason, and `status` says what
    the joiner waits for (it used to say nothing for 60 s, even at debug level)."""
    import json

    from meshd import tokens
    from meshd.io.localsite import LocalNode

    closed = free_port()  # a port nobody listens on
    node = LocalNode("lonely", site_root / "lonely", site="lab",
                     extra_args=("--no-mdns", "--peer", f"127.0.0.1:{closed}"))
    node.start(join=tokens.format_token("lab", "0123456789abcdef", b"\x07" * 32))
    try:
        def logged():
            for line in node.log_text().splitlines():
                entry = json.loads(line) if line.startswith("{") else {}
                if entry.get("msg") == "join attempt failed" and entry.get("peer") == f"127.0.0.1:{closed}":
                    return entry
            return None
        entry = wait_for(logged, 10, what="the failed attempt in the log")
        assert entry["reason"] and entry["outcome"] == "unreachable"
        status = wait_for(lambda: node.try_call("status"), 10, what="status while joining")
        assert status["role"] == "joining"
        assert f"127.0.0.1:{closed}" in status["joining"]["waiting_for"]
        assert status["joining"]["attempts"][0]["outcome"] == "unreachable"
    finally:
        node.terminate()
