"""`meshctl node remove`: a voter gone for good leaves the site and its Raft configuration,
not revoked; a non-voter takes its voter place, and the site keeps committing with five
voters (six real daemons on loopback: five voters and a non-voter)."""

from __future__ import annotations

import pytest

from meshd.io.admin import AdminError
from meshd.io.localsite import sleeper_app, wait_for

pytestmark = pytest.mark.system


def test_a_voter_gone_for_good_is_removed_and_a_non_voter_promoted(make_site):
    site = make_site("nr")
    site.start(6)
    leader = site.leader()
    nodes = {n["name"]: n for n in leader.call("nodes")}
    [non_voter] = [name for name, n in nodes.items() if n["role"] == "nonvoter"]
    gone = next(n for n in site.nodes if n is not leader and nodes[n.name]["role"] != "nonvoter")
    leader.call("deploy", spec_toml=sleeper_app("svc", 6), wait=True, timeout=30)

    with pytest.raises(AdminError, match=f"node {gone.name} is up \\(ready\\): stop its meshd first"):
        leader.call("node_remove", node=gone.name)
    gone.kill()
    wait_for(lambda: site.node_state(gone.name, via=leader) == "down", 20, what="the voter marked down")
    result = leader.call("node_remove", node=gone.name)
    assert result == {"node": gone.name, "node_id": nodes[gone.name]["node_id"], "removed": True,
                      "promoted": non_voter}

    promoted = next(n for n in site.nodes if n.name == non_voter)
    wait_for(lambda: promoted.call("status")["voter"] and promoted.call("status")["role"] in ("follower", "leader"),
             30, what="the non-voter restarted as a voter")
    events = [e["message"] for e in leader.call("events")]
    wait_for(lambda: any(f"{gone.name} removed from the Raft voters" in e["message"] for e in leader.call("events")),
             20, what="the removed node out of the Raft configuration")
    wait_for(lambda: any(f"{non_voter} added to the Raft voters" in e["message"] for e in leader.call("events")),
             20, what="the promoted node in the Raft configuration")
    assert site.node_state(gone.name, via=leader) == "left"
    assert leader.call("status")["members"] == 5
    assert not [r for r in leader.call("revocations") if r["name"] == gone.name], events  # not a revocation
    assert any(a["action"] == "node-remove" and a["target"] == gone.name for a in leader.call("audit"))
    # its replicas run elsewhere, and the site still commits
    wait_for(lambda: len(site.running("svc")) == 6 and all(a["node"] != gone.name for a in site.running("svc")),
             30, what="its replica replaced")
    leader.call("deploy", spec_toml=sleeper_app("svc", 5), wait=True, timeout=30)
