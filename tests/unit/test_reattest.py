"""Who must re-attest now (meshd.reattest), and the replicated record of it (sitestate)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd import sitestate
from meshd.reattest import due_for_attestation
from meshd.state import ADMIN_LEFT, ADMIN_REVOKED, LIVENESS_DOWN, LIVENESS_READY, NodeRecord, SiteState

PERIOD = 600.0
NOW = 1_800_000_000.0


def node(node_id, attested_at=NOW - 10, boot="b1", attested_boot="b1", liveness=LIVENESS_READY, **kw) -> NodeRecord:
    return NodeRecord(node_id=node_id, name=node_id, site="s", address="198.18.0.1:7700",
                      raft_address="198.18.0.1:7701", public_key="00", liveness=liveness,
                      boot_id=boot, attested_boot_id=attested_boot, attested_at=attested_at, **kw)


def site(*nodes) -> SiteState:
    return SiteState(site="s", nodes={n.node_id: n for n in nodes})


@pytest.mark.parametrize("nodes,due", [
    ([node("a")], []),
    ([node("a", attested_at=NOW - PERIOD)], ["a"]),  # exactly the period: due
    ([node("a", boot="b2")], ["a"]),  # rebooted since its evidence
    ([node("a", boot="")], []),  # has not reported a boot yet: nothing to compare
    ([node("a", attested_at=NOW - 9999, admin=ADMIN_REVOKED), node("b", attested_at=NOW - 9999, admin=ADMIN_LEFT)],
     []),
    ([node("a", attested_at=NOW - 9999, liveness=LIVENESS_DOWN)], []),  # cannot answer; asked once back
    ([node("old", attested_at=NOW - 5000), node("older", attested_at=NOW - 9000), node("reboot", boot="b9")],
     ["reboot", "older", "old"]),  # reboots first, then the longest unattested
    ([node("a", software="1" * 64, attested_software="2" * 64)], ["a"]),  # restarted into other software
    ([node("a", software="1" * 64, attested_software="")], []),  # proved no digest yet: nothing to compare
    ([node("a", software="1" * 64, attested_software="1" * 64)], []),
    # Quarantined: asked again even while down (it may have lost the Raft secret), after
    # changed software, before the merely old.
    ([node("q", liveness=LIVENESS_DOWN, quarantine="meshd 9"), node("old", attested_at=NOW - 5000),
      node("new", software="1" * 64, attested_software="2" * 64)], ["new", "q", "old"]),
    ([node("q", quarantine="meshd 9", admin=ADMIN_REVOKED)], []),
])
def test_due_for_attestation(nodes, due):
    assert due_for_attestation(site(*nodes), NOW, PERIOD) == due


@given(st.lists(st.tuples(st.floats(0, 2 * PERIOD), st.booleans()), max_size=8))
def test_a_node_attested_now_in_its_current_boot_is_never_due(nodes):
    state = site(*(node(f"n{i}", attested_at=NOW - age, boot="b2" if rebooted else "b1")
                   for i, (age, rebooted) in enumerate(nodes)))
    for node_id in list(state.nodes):
        assert sitestate.apply(state, {"op": "attested", "ts": NOW, "node_id": node_id,
                                       "boot_id": state.nodes[node_id].boot_id}).ok
    assert due_for_attestation(state, NOW, PERIOD) == []


def test_reports_carry_the_boot_and_attested_records_it():
    state = site(node("a"))
    assert sitestate.apply(state, {"op": "heartbeat", "ts": NOW, "node_id": "a", "seq": 5, "boot_id": "b7"}).ok
    assert state.nodes["a"].boot_id == "b7" and due_for_attestation(state, NOW, PERIOD) == ["a"]
    assert sitestate.apply(state, {"op": "attested", "ts": NOW + 1, "node_id": "a", "boot_id": "b7"}).ok
    assert (state.nodes["a"].attested_boot_id, state.nodes["a"].attested_at) == ("b7", NOW + 1)
    state.nodes["a"] = dataclasses.replace(state.nodes["a"], admin=ADMIN_REVOKED)
    refused = sitestate.apply(state, {"op": "attested", "ts": NOW, "node_id": "a", "boot_id": "b7"})
    assert not refused.ok and "not a member" in refused.text
