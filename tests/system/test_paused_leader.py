"""A leader frozen for 20 s (SIGSTOP: what a GC or VM pause or a swap storm does) resumes
while the others have elected a new leader. Once marked both healthy members down on its
20-s-old contacts, and the new leader committed that: every workload of a healthy follower
was stopped and restarted. Now its stale view decides nothing, and the healthy members keep
their allocations."""

from __future__ import annotations

import time

from meshd.io.localsite import sleeper_app, wait_for

PAUSE_S = 20.0


def test_a_leader_paused_past_its_lease_marks_no_healthy_member_down(three):
    old = three.leader()
    old.call("deploy", spec_toml=sleeper_app("svc", 6), wait=True, timeout=30)
    others = [n for n in three.nodes if n is not old]
    kept = {a["alloc_id"] for a in three.running("svc") if a["node"] != old.name}
    assert kept
    started = time.time()
    old.pause()
    new = three.wait_leader(timeout=15, exclude=old)
    time.sleep(max(0.0, started + PAUSE_S - time.time()))
    old.resume()
    wait_for(lambda: (old.try_call("status") or {}).get("role") == "follower", 20, what="the old leader following")
    time.sleep(3.0)  # what a stale pass would have committed by now
    downs = [e for e in new.call("events", follow=False, since=started)
             if e["kind"] == "node" and e.get("state") == "down"]
    assert {e.get("node") for e in downs} <= {old.name}, downs
    assert all(three.node_state(n.name, via=new) == "ready" for n in others)
    running = {a["alloc_id"] for a in three.running("svc", via=new)}
    assert kept <= running, "a healthy member's allocations were stopped"
    assert old.alive and "wedged" not in old.log_text()
