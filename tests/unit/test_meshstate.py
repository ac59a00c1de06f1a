"""Between the mesh document and a site's Raft state (meshd.meshstate), and the deploy/stop
commands that carry mesh edits (meshd.sitestate): what the leader takes in and publishes."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from attestation.policy import Policy, open_policy, sign_policy
from attestation.policy import rank as policy_rank
from attestation.revocation import RevocationList, sign_revocation
from crdt.document import MeshDocument
from crdt.schema import AppEdit, SignedRecord
from meshd import meshstate, sitestate
from meshd.state import DESIRED_STOP, SiteState

from tests.unit.test_sitestate import T0, cmd, founded

SPEC = {"app": {"name": "web", "replicas": 2, "command": ["sleep", "100"]}}


def edit(n: int, *, app: str = "web", version: int = 1, site: str = "s1", targets=("s1",), stopped=False,
         base: str = "", ts: float = T0, replicas: int = 2) -> AppEdit:
    return AppEdit(edit_id=f"e{n}", app=app, version=version, base=base, site=site, actor="op", ts=ts,
                   spec="" if stopped else f'[app]\nname = "{app}"\nreplicas = {replicas}\ncommand = ["sleep", "100"]\n',
                   targets=tuple(targets), replicas=0 if stopped else replicas, stopped=stopped)


def deploy(state: SiteState, e: AppEdit, spec: dict = SPEC, ts: float = T0) -> dict:
    return sitestate.apply(state, cmd("submit_app", ts=ts, spec=spec, edit=e.to_plain(), actor="op"))


def stop(state: SiteState, e: AppEdit) -> dict:
    return sitestate.apply(state, cmd("stop_app", app=e.app, edit=e.to_plain(), actor="op"))


def document(*edits: AppEdit) -> MeshDocument:
    doc = MeshDocument(client_id=7)
    if edits:
        doc.put_many(list(edits))
    return doc


# --- sitestate: deploys and stops that carry an edit --------------------------------------

def test_a_deploy_for_this_site_runs_here_and_remembers_its_edit():
    state = founded()
    result = deploy(state, edit(1, version=3))
    assert result.ok and result["here"] and result["version"] == 3 and result["site_version"] == 3
    record = state.apps["web"]
    assert (record.edit_id, record.mesh_version, record.version) == ("e1", 3, 3)
    assert state.mesh_edits["web"]["edit_id"] == "e1"


def test_a_deploy_for_other_sites_only_is_remembered_but_not_run_here():
    state = founded()
    result = deploy(state, edit(1, targets=("far",)))
    assert result.ok and not result["here"]
    assert "web" not in state.apps and state.mesh_edits["web"]["edit_id"] == "e1"
    assert state.audit[-1].action == "deploy" and "to far" in state.audit[-1].target


def test_an_app_moved_to_other_sites_stops_here():
    state = founded()
    deploy(state, edit(1))
    sitestate.apply(state, cmd("apply_plan", plan={"app": "web", "version": 1, "placements": [
        {"alloc_id": "a1", "replica": 0, "node_id": f"{1:032x}"}], "stops": []}))
    result = deploy(state, edit(2, version=2, base="e1", targets=("far",)))
    assert result.ok and result["allocs"] == ["a1"]
    assert state.allocs["a1"].desired == DESIRED_STOP and state.apps["web"].status == "stopped"


def test_an_older_edit_is_refused_and_changes_nothing():
    state = founded()
    deploy(state, edit(2, version=5))
    before = copy.deepcopy(state.apps), copy.deepcopy(state.mesh_edits)
    result = deploy(state, edit(1, version=4, ts=T0 + 100))
    assert not result.ok and "newer change" in result.text
    assert (state.apps, state.mesh_edits) == before


def test_site_version_never_goes_backwards_even_when_the_mesh_version_does_not_grow():
    state = founded()
    deploy(state, edit(1, version=3))
    # a conflicting edit with the same mesh version (made elsewhere, later) wins and replaces the spec
    spec2 = {"app": {**SPEC["app"], "replicas": 3}}
    result = deploy(state, edit(2, version=3, ts=T0 + 1, site="s2", replicas=3), spec=spec2)
    assert result.ok and result["version"] == 3 and result["site_version"] == 4
    assert state.apps["web"].version == 4 and state.apps["web"].edit_id == "e2"


@pytest.mark.parametrize("bad, reason", [
    ({"edit_id": "x"}, "edit:"),
    (edit(1, app="other").to_plain(), "is not a deploy of web"),
    (edit(1, stopped=True).to_plain(), "is not a deploy of web"),
])
def test_malformed_or_mismatched_edits_are_refused(bad, reason):
    state = founded()
    result = sitestate.apply(state, cmd("submit_app", spec=SPEC, edit=bad))
    assert not result.ok and reason in result.text
    assert not state.apps and not state.mesh_edits


def test_a_stop_with_an_edit_stops_here_and_is_remembered_even_for_an_app_not_run_here():
    state = founded()
    deploy(state, edit(1))
    assert stop(state, edit(2, version=2, base="e1", stopped=True)).ok
    assert state.apps["web"].status == "stopped" and state.apps["web"].edit_id == "e2"
    other = founded()
    assert stop(other, edit(3, app="db", stopped=True, targets=("far",))).ok
    assert other.mesh_edits["db"]["stopped"] is True and "db" not in other.apps


def test_audit_records_are_numbered():
    state = founded()
    deploy(state, edit(1))
    seqs = [a.seq for a in state.audit]
    assert seqs == list(range(1, len(seqs) + 1)) and state.audit_seq == seqs[-1]


# --- meshstate: taking in ------------------------------------------------------------------

@pytest.mark.parametrize("taken, in_document, wanted", [
    ([], [edit(1)], ["e1"]),                                       # new app for this site
    ([], [edit(1, targets=("far",))], []),                         # never concerned this site
    ([edit(1)], [edit(1)], []),                                    # up to date
    ([edit(1)], [edit(1), edit(2, version=2, base="e1")], ["e2"]),  # a newer edit
    ([edit(2, version=2)], [edit(1)], []),                         # ours newer, not published yet
    ([edit(1)], [edit(1), edit(2, version=2, base="e1", targets=("far",))], ["e2"]),  # moved away: stop here
    ([edit(1)], [edit(1), edit(2, version=2, base="e1", stopped=True)], ["e2"]),    # stopped elsewhere
    ([], [edit(1), edit(2, version=2, base="e1", stopped=True)], []),  # a stop of what does not run here
])
def test_edits_to_take_in(taken, in_document, wanted):
    state = founded()
    for e in taken:
        assert deploy(state, e).ok
    got = meshstate.edits_to_take_in(state, document(*in_document).apps())
    assert [e.edit_id for e in got] == wanted


def test_conflicting_edits_are_taken_in_as_the_document_decides():
    state = founded()
    deploy(state, edit(1, version=2, site="s1", ts=T0))
    doc = document(edit(1, version=2, site="s1", ts=T0), edit(2, version=2, site="s2", ts=T0 + 5))
    (winner,) = meshstate.edits_to_take_in(state, doc.apps())
    assert winner.edit_id == "e2"
    assert deploy(state, winner).ok
    assert meshstate.edits_to_take_in(state, doc.apps()) == []


# --- meshstate: publishing -----------------------------------------------------------------

def test_edits_to_publish_are_those_the_document_lacks():
    state = founded()
    deploy(state, edit(1))
    stop(state, edit(2, app="db", stopped=True, targets=("far",)))
    assert [e.edit_id for e in meshstate.edits_to_publish(state, lambda _: False)] == ["e2", "e1"]
    assert meshstate.edits_to_publish(state, lambda edit_id: edit_id in {"e1", "e2"}) == []


def test_audit_to_publish_scans_back_to_the_first_published():
    state = founded(2)
    deploy(state, edit(1))
    keys = [meshstate.audit_key("s1", a.seq) for a in state.audit]
    all_missing = meshstate.audit_to_publish(state, lambda _: False)
    assert [r.audit_id for r in all_missing] == keys
    some = meshstate.audit_to_publish(state, lambda key: key in keys[:2])
    assert [r.audit_id for r in some] == keys[2:]
    assert meshstate.audit_to_publish(state, lambda _: True) == []
    assert all(r.site == "s1" for r in all_missing)


def three_members_running_web_on(*nodes: int) -> SiteState:
    """Three members; web deployed, replica i placed on member nodes[i]."""
    state = founded(3)
    deploy(state, edit(1))
    placements = [{"alloc_id": f"a{i + 1}", "replica": i, "node_id": f"{n:032x}"} for i, n in enumerate(nodes)]
    assert sitestate.apply(state, cmd("apply_plan", plan={"app": "web", "version": 1, "placements": placements,
                                                          "stops": []})).ok
    return state


def test_site_summary_and_app_status_count_ready_members_and_running_replicas():
    state = three_members_running_web_on(1, 2)
    sitestate.apply(state, cmd("heartbeat", node_id=f"{1:032x}", seq=5,
                               reports=[{"alloc_id": "a1", "state": "running", "restarts": 0}]))
    sitestate.apply(state, cmd("set_liveness", node_id=f"{3:032x}", liveness="down"))
    summary = meshstate.site_summary(state, meshstate.SiteFacts("n1", ("198.18.0.1:7700",)), T0)
    assert (summary.site, summary.nodes, summary.ready, summary.leader) == ("s1", 3, 2, "n1")
    (status,) = meshstate.app_statuses(state, T0)
    assert (status.key, status.edit_id, status.desired, status.running) == ("web@s1", "e1", 2, 1)
    assert meshstate.same_summary(summary, meshstate.site_summary(state, meshstate.SiteFacts("n1", ("198.18.0.1:7700",)),
                                                                  T0 + 30))
    assert not meshstate.same_summary(summary, meshstate.site_summary(state, meshstate.SiteFacts("n2", ()), T0))


def test_node_summaries_name_every_member_with_role_state_and_allocations():
    state = three_members_running_web_on(1, 1)
    sitestate.apply(state, cmd("set_liveness", node_id=f"{3:032x}", liveness="down"))
    facts = meshstate.SiteFacts("n1", ())
    summaries = {s.name: s for s in meshstate.node_summaries(state, facts, T0)}
    assert {n: (s.site, s.state, s.role, s.allocs) for n, s in summaries.items()} == {
        "n1": ("s1", "ready", "leader", 2), "n2": ("s1", "ready", "follower", 0), "n3": ("s1", "down", "follower", 0)}
    for summary in summaries.values():
        assert summary.to_plain()  # every one is a valid document record
        assert meshstate.same_node(summary, dataclasses.replace(summary, ts=T0 + 60)), "only the time moved"
    assert not meshstate.same_node(summaries["n1"], dataclasses.replace(summaries["n1"], allocs=1))
    assert not meshstate.same_node(None, summaries["n1"])


# --- revocations between the site's list and the document ----------------------------------

ROOT_KEY = Ed25519PrivateKey.generate()
ROOT_PUBLIC = ROOT_KEY.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def revoked(*ids: str) -> RevocationList:
    listed = RevocationList("m1", 0)
    for node_id in ids:
        listed = listed.with_revoked(node_id, T0, "op", f"lost {node_id[:2]}")
    return listed


def records_for(listed: RevocationList, site: str, key=ROOT_KEY, mesh_id="m1") -> list:
    return [meshstate.revocation_record(sign_revocation(key, mesh_id, entry), listed.number, site, T0)
            for entry in listed.entries.values()]


def test_revocations_to_publish_are_the_entries_the_document_lacks():
    listed = revoked("aa" * 16, "bb" * 16)
    assert [e.node_id for e in meshstate.revocations_to_publish(listed, lambda key: False)] == ["aa" * 16, "bb" * 16]
    has = {meshstate.revocation_key("aa" * 16)}
    assert [e.node_id for e in meshstate.revocations_to_publish(listed, has.__contains__)] == ["bb" * 16]
    record = records_for(listed, "s1")[0]
    assert record.key == meshstate.revocation_key(record.to_plain()["key"].split("/")[1])
    assert record.to_plain()["kind"] == "revocation"


def test_revocations_to_take_in_are_verified_entries_the_list_lacks():
    mine = revoked("aa" * 16)
    theirs = revoked("aa" * 16, "bb" * 16, "cc" * 16)
    records = records_for(theirs, "s2")
    incoming = meshstate.revocations_to_take_in(mine, records, ROOT_PUBLIC, "m1")
    assert [e.node_id for e in incoming.entries] == ["bb" * 16, "cc" * 16]
    assert incoming.sites == ("s2",) and incoming.refused == ()
    assert meshstate.revocations_to_take_in(theirs, records, ROOT_PUBLIC, "m1").entries == ()


@pytest.mark.parametrize("tamper,reason", [
    (lambda r: dataclasses.replace(r, body=json.dumps(sign_revocation(Ed25519PrivateKey.generate(), "m1",
                                                                       revoked("dd" * 16).entries["dd" * 16]))),
     "signature"),
    (lambda r: dataclasses.replace(r, body=json.dumps(sign_revocation(ROOT_KEY, "m2", revoked("dd" * 16).entries["dd" * 16]))),
     "another mesh"),
    (lambda r: dataclasses.replace(r, body="not json"), "not JSON"),
    (lambda r: dataclasses.replace(r, key=meshstate.revocation_key("ee" * 16)), "names " + "dd" * 16),
])
def test_revocation_records_that_do_not_verify_are_refused_with_a_reason(tamper, reason):
    (good,) = records_for(revoked("dd" * 16), "s2")
    incoming = meshstate.revocations_to_take_in(revoked(), [tamper(good)], ROOT_PUBLIC, "m1")
    assert incoming.entries == ()
    ((key, why),) = incoming.refused
    assert reason in why


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["aa", "bb", "cc", "dd"]), max_size=3), min_size=2, max_size=4))
def test_sites_exchanging_revocations_through_a_document_end_with_the_union(per_site):
    """Each site revoked some nodes while cut off; after each publishes and takes in (in any
    order), every site's list names every node any site revoked."""
    doc = MeshDocument(client_id=1)
    lists = [revoked(*(short * 16 for short in ids)) for ids in per_site]
    for _ in range(2):  # publish all, then take in all: twice is enough for any order
        for i, listed in enumerate(lists):
            missing = meshstate.revocations_to_publish(listed, lambda key: doc.get(SignedRecord, key) is not None)
            if missing:
                doc.put_many([meshstate.revocation_record(sign_revocation(ROOT_KEY, "m1", e), listed.number, f"s{i}", T0)
                              for e in missing])
        for i, listed in enumerate(lists):
            incoming = meshstate.revocations_to_take_in(listed, doc.records(SignedRecord), ROOT_PUBLIC, "m1")
            if incoming.entries:
                lists[i] = listed.with_entries(list(incoming.entries))
    everyone = {short * 16 for ids in per_site for short in ids}
    assert all(set(listed.entries) == everyone for listed in lists)


# --- the policy bundle between the site and the document -----------------------------------

def bundle(serial: int, issued_at: float, key=ROOT_KEY, mesh_id: str = "m1", **changes) -> dict:
    return sign_policy(key, Policy(mesh_id=mesh_id, serial=serial, min_version="0.1.0", allowed_digests={},
                                   issued_at=issued_at, **changes))


def found_in(*placed: tuple[dict, str]) -> meshstate.PoliciesIn:
    records = [meshstate.policy_record(signed, site, T0) for signed, site in placed]
    return meshstate.policies_in_document(records, ROOT_PUBLIC, "m1")


def test_the_best_ranked_bundle_in_the_document_is_taken_in_when_it_outranks_the_sites():
    mine, theirs = bundle(4, T0), bundle(5, T0 - 50)
    found = found_in((mine, "s1"), (theirs, "s2"))
    best = meshstate.policy_to_take_in(policy_rank(mine, open_policy(mine, ROOT_PUBLIC)), found)
    assert best is not None and (best.signed, best.site) == (theirs, "s2")
    assert meshstate.policy_to_take_in(policy_rank(theirs, open_policy(theirs, ROOT_PUBLIC)), found) is None
    assert meshstate.policy_conflicts(found) == []


def test_bundles_of_one_serial_made_apart_have_one_winner_and_the_other_is_named():
    early, late = bundle(5, T0), bundle(5, T0 + 1, tpm_required_sites=frozenset({"s2"}))
    found = found_in((early, "s1"), (late, "s2"))
    ((winner, loser),) = meshstate.policy_conflicts(found)
    assert (winner.signed, winner.site, loser.signed, loser.site) == (late, "s2", early, "s1")
    best = meshstate.policy_to_take_in(policy_rank(early, open_policy(early, ROOT_PUBLIC)), found)
    assert best is not None and best.signed == late


@pytest.mark.parametrize("record,reason", [
    (meshstate.policy_record(bundle(9, T0, key=Ed25519PrivateKey.generate()), "s2", T0), "signature"),
    (meshstate.policy_record(bundle(9, T0, mesh_id="m2"), "s2", T0), "another mesh"),
    (dataclasses.replace(meshstate.policy_record(bundle(9, T0), "s2", T0), body="{"), "not JSON"),
])
def test_policy_records_that_do_not_verify_are_refused_with_a_reason(record, reason):
    found = meshstate.policies_in_document([record], ROOT_PUBLIC, "m1")
    assert found.bundles == ()
    ((key, why),) = found.refused
    assert key == record.key and reason in why


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(0, 3)), min_size=2, max_size=4))
def test_sites_exchanging_policies_through_a_document_end_with_the_same_bundle(made):
    """Each site holds some bundle (serial, issue time) made while apart; after each publishes
    and takes in (in any order), every site holds the same, best-ranked one."""
    doc = MeshDocument(client_id=1)
    held = [bundle(serial, T0 + t) for serial, t in made]
    for _ in range(2):
        for i, signed in enumerate(held):
            if doc.get(SignedRecord, meshstate.policy_key(signed)) is None:
                doc.put(meshstate.policy_record(signed, f"s{i}", T0))
        found = meshstate.policies_in_document(doc.records(SignedRecord), ROOT_PUBLIC, "m1")
        for i, signed in enumerate(held):
            best = meshstate.policy_to_take_in(policy_rank(signed, open_policy(signed, ROOT_PUBLIC)), found)
            if best is not None:
                held[i] = best.signed
    assert all(signed == held[0] for signed in held)
    assert open_policy(held[0], ROOT_PUBLIC).serial == max(serial for serial, _ in made)


# --- meshstate: forgetting stopped apps ----------------------------------------------------

def test_stopped_apps_are_purged_after_their_retention_once_the_document_holds_their_stop():
    state = founded()
    assert deploy(state, edit(1)).ok
    assert sitestate.apply(state, cmd("stop_app", ts=T0 + 10, app="web", edit=edit(2, version=2, base="e1",
                                                                                   stopped=True).to_plain())).ok
    held = {"e2"}
    assert meshstate.apps_to_purge(state, T0 + 50, 60.0, held.__contains__) is None  # too young
    assert meshstate.apps_to_purge(state, T0 + 80, 60.0, set().__contains__) is None  # its stop unpublished
    command = meshstate.apps_to_purge(state, T0 + 80, 60.0, held.__contains__)
    assert command.apps == ("web",)
    result = sitestate.apply(state, cmd("purge_apps", ts=T0 + 80, **command.to_wire()))
    assert result.ok and result["purged"] == ["web"] and "web" not in state.apps and "web" not in state.mesh_edits
    # the document still says stopped: nothing to take in again, nothing to purge again
    doc = document(edit(1), edit(2, version=2, base="e1", stopped=True))
    assert meshstate.edits_to_take_in(state, doc.apps()) == []
    assert meshstate.apps_to_purge(state, T0 + 500, 60.0, held.__contains__) is None
