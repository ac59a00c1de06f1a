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
from meshd.commands import Envelope, TrimAudit, encode
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


# --- rollouts across sites: each site's leader runs its part from the document -------------
from crdt.schema import AppSiteStatus, RolloutControl, app_status_key, rollout_control_key  # noqa: E402
from meshd import commands as cmds  # noqa: E402

ROLLOUT_SITES = ("pilot", "north", "south")


def rollout_spec(command: str, waves: str = '[{ sites = ["pilot"], soak_s = 60 }, { sites = ["north"] }]',
                 abort: int = 0) -> str:
    return (f'[app]\nname = "det"\nreplicas = 1\ncommand = ["{command}"]\nsites = {json.dumps(list(ROLLOUT_SITES))}\n'
            f'\n[app.rollout]\nwaves = {waves}\nabort_failed_percent = {abort}\n')


class Fleet:
    """Sites, each a Raft state of its own, around their mesh documents (one each: a cut site's
    stops hearing the others'), each site's leader pass as meshd.io.mesh makes it."""

    def __init__(self) -> None:
        self.states = {}
        self.docs = {}
        for i, site in enumerate(ROLLOUT_SITES):
            state = SiteState()
            assert sitestate.apply(state, cmd("bootstrap", site=site, mesh_id="m1", node=node_of(i + 1, site))).ok
            self.states[site] = state
            self.docs[site] = MeshDocument(client_id=i + 1)
        self.plans = {site: meshstate.PlanCache() for site in ROLLOUT_SITES}
        self.cut: set[str] = set()

    def apply(self, site: str, command, ts: float):
        return sitestate.apply(self.states[site], cmds.encode(command, cmds.Envelope(ts)))

    def lookups(self, site: str):
        doc = self.docs[site]
        return (lambda app, s: doc.get(AppSiteStatus, app_status_key(app, s)),
                lambda edit_id, s: [c for a in ("pause", "cancel")
                                    if (c := doc.get(RolloutControl, rollout_control_key(edit_id, s, a)))])

    def deploy(self, site: str, n: int, spec_toml: str, ts: float) -> AppEdit:
        doc = self.docs[site]
        e = doc.new_app_edit(edit_id=f"e{n}", app="det", site=site, actor="op", ts=ts, spec=spec_toml,
                             targets=ROLLOUT_SITES, replicas=1)
        command = meshstate.hold_for_wave(self.states[site], meshstate.take_in_command(e), *self.lookups(site), ts)
        assert self.apply(site, command, ts).ok
        doc.put_many([e])
        return e

    def control(self, site: str, e: AppEdit, action: str, ts: float) -> None:
        self.docs[site].put_many([RolloutControl(app="det", edit_id=e.edit_id, site=site, action=action, ts=ts,
                                                 actor="op")])

    def sync(self) -> None:
        linked = [s for s in ROLLOUT_SITES if s not in self.cut]
        for a in linked:
            for b in linked:
                if a != b:
                    self.docs[b].apply(self.docs[a].delta_since(self.docs[b].state_vector()))

    def leader_pass(self, site: str, now: float) -> list:
        state, doc = self.states[site], self.docs[site]
        done = []
        for e in meshstate.edits_to_take_in(state, doc.apps()):
            command = meshstate.take_in_command(e)
            if isinstance(command, cmds.SubmitApp):
                command = meshstate.hold_for_wave(state, command, *self.lookups(site), now)
            assert self.apply(site, command, now).ok
            done.append(command)
        for command in meshstate.rollout_moves(state, self.plans[site], *self.lookups(site), now).commands:
            result = self.apply(site, command, now)
            assert result.ok, result
            done.append(command)
        doc.put_many(meshstate.app_statuses(state, now))
        return done

    def settle(self, now: float, rounds: int = 4) -> None:
        for _ in range(rounds):
            self.sync()
            for site in ROLLOUT_SITES:
                self.leader_pass(site, now)
        self.sync()

    def verdict(self, site: str, action: str, ts: float) -> None:
        """The site's own rollout core decides its deployment (meshd.rollout): here, by hand."""
        record = self.states[site].apps["det"]
        assert self.apply(site, cmds.Rollout(app="det", version=record.version, action=action, reason="by test",
                                             actor="leader"), ts).ok

    def view(self, site: str, now: float):
        doc = self.docs[site]
        winner = doc.app("det").winner
        plan = self.plans[site].plan(winner.edit_id, winner.spec, winner.stopped)
        return meshstate.rollout_view(winner, plan, *self.lookups(site), now)

    def runs(self, site: str) -> str | None:
        record = self.states[site].apps.get("det")
        return record.spec.command[0] if record is not None and record.status == "running" else None


def node_of(i: int, site: str) -> dict:
    from tests.unit.test_sitestate import node
    return node(i, site=site)


def rolled_out_v1(fleet: Fleet, t: float) -> float:
    """v1 (`one`) through every wave, stable everywhere; returns the time after it."""
    fleet.deploy("pilot", 1, rollout_spec("one"), t)
    fleet.settle(t)
    fleet.verdict("pilot", "succeed", t + 1)
    fleet.settle(t + 1)
    fleet.settle(t + 61)
    fleet.verdict("north", "succeed", t + 62)
    fleet.settle(t + 62)
    fleet.verdict("south", "succeed", t + 63)
    fleet.settle(t + 63)
    return t + 100


def test_a_rollout_goes_wave_by_wave_and_every_site_agrees_it_succeeded():
    fleet = Fleet()
    fleet.deploy("north", 1, rollout_spec("one"), T0)  # made in a site of a later wave: held there
    assert fleet.runs("north") is None and fleet.states["north"].mesh_edits["det"]["edit_id"] == "e1"
    fleet.settle(T0)
    assert (fleet.runs("pilot"), fleet.runs("north"), fleet.runs("south")) == ("one", None, None)
    fleet.verdict("pilot", "succeed", T0 + 1)
    fleet.settle(T0 + 30)
    assert fleet.runs("north") is None  # pilot soaks for 60 s
    assert fleet.view("north", T0 + 30).next_open_at == T0 + 61
    fleet.settle(T0 + 61)
    assert fleet.runs("north") == "one" and fleet.runs("south") is None  # south is in the implied last wave
    fleet.verdict("north", "succeed", T0 + 62)
    fleet.settle(T0 + 62)
    assert fleet.runs("south") == "one"
    fleet.verdict("south", "succeed", T0 + 63)
    fleet.settle(T0 + 63)
    seen = {site: fleet.view(site, T0 + 63) for site in ROLLOUT_SITES}
    assert {v.state for v in seen.values()} == {"succeeded"}
    assert {site: p.state for site, p in seen["south"].sites.items()} == dict.fromkeys(ROLLOUT_SITES, "succeeded")


def test_a_site_cut_off_in_its_wave_goes_on_there_and_all_agree_once_healed():
    fleet = Fleet()
    t = rolled_out_v1(fleet, T0)
    fleet.deploy("pilot", 2, rollout_spec("two", waves='[{ sites = ["pilot"] }, { sites = ["north"] }]'), t)
    fleet.settle(t)
    fleet.verdict("pilot", "succeed", t + 1)
    fleet.settle(t + 1)
    assert fleet.runs("north") == "two"
    fleet.cut.add("north")
    fleet.verdict("north", "succeed", t + 2)  # it finishes while cut off
    for site in ROLLOUT_SITES:
        fleet.leader_pass(site, t + 3)
    fleet.sync()
    pilot = fleet.view("pilot", t + 3)
    assert pilot.sites["north"].state == "running" and pilot.state == "running"  # last word, never failed
    assert fleet.runs("south") == "one"
    fleet.cut.clear()
    fleet.settle(t + 40)
    assert fleet.runs("south") == "two"
    fleet.verdict("south", "succeed", t + 41)
    fleet.settle(t + 41)
    assert {fleet.view(site, t + 41).state for site in ROLLOUT_SITES} == {"succeeded"}


def test_a_failing_version_stops_the_rollout_and_every_reached_site_returns():
    fleet = Fleet()
    t = rolled_out_v1(fleet, T0)
    # pilot and north in the first wave; north fails (reverts to one), pilot had succeeded.
    fleet.deploy("pilot", 2, rollout_spec("two", waves='[{ sites = ["pilot", "north"] }]', abort=30), t)
    fleet.settle(t)
    assert fleet.runs("pilot") == fleet.runs("north") == "two"
    fleet.verdict("pilot", "succeed", t + 1)
    fleet.verdict("north", "fail", t + 1)
    assert fleet.runs("north") == "one"  # its own auto-revert
    fleet.settle(t + 2)
    views = {site: fleet.view(site, t + 2) for site in ROLLOUT_SITES}
    assert {v.state for v in views.values()} == {"reverted"}
    assert fleet.runs("pilot") == "one" and fleet.runs("south") == "one"  # pilot returned; south never started
    assert {site: p.state for site, p in views["south"].sites.items()} == {
        "pilot": "reverted", "north": "reverted", "south": "pending"}
    record = fleet.states["pilot"].apps["det"]
    assert record.deployment.revert and "1 of 3 sites failed (north)" in record.deployment.reason
    before = [fleet.states[s].applied for s in ROLLOUT_SITES]
    fleet.settle(t + 100)  # nothing more to do: no move is made twice
    assert [fleet.states[s].applied for s in ROLLOUT_SITES] == before


def test_pause_holds_the_next_wave_and_cancel_returns_every_site():
    fleet = Fleet()
    t = rolled_out_v1(fleet, T0)
    e2 = fleet.deploy("pilot", 2, rollout_spec("two", waves='[{ sites = ["pilot"] }, { sites = ["north"] }]'), t)
    fleet.settle(t)
    fleet.control("south", e2, "pause", t + 1)
    fleet.settle(t + 1)
    assert fleet.states["pilot"].apps["det"].deployment.state == "paused"  # the site's own deployment follows
    fleet.verdict("pilot", "resume", t + 2)  # an operator resumed it locally: the rollout pauses it again
    fleet.settle(t + 2)
    assert fleet.states["pilot"].apps["det"].deployment.state == "paused"
    fleet.control("north", e2, "resume", t + 3)
    fleet.settle(t + 3)
    fleet.verdict("pilot", "succeed", t + 4)
    fleet.settle(t + 4)
    assert fleet.runs("north") == "two"
    fleet.control("north", e2, "cancel", t + 5)
    fleet.settle(t + 5)
    assert {fleet.view(site, t + 5).state for site in ROLLOUT_SITES} == {"cancelled"}
    assert [fleet.runs(s) for s in ROLLOUT_SITES] == ["one", "one", "one"]
    north = fleet.states["north"].apps["det"]
    assert [d.state for d in north.deployments[-2:]] == ["cancelled", "running"] and north.deployments[-1].revert


# --- meshstate: the site's audit, once published and old ------------------------------------

def _audited(n: int) -> SiteState:
    """A site whose audit holds `n` records more than founding left, one a second from T0."""
    state = founded()
    for i in range(n):
        assert sitestate.apply(state, cmd("drain" if i % 2 == 0 else "undrain", ts=T0 + i, node="n1", actor="op")).ok
    return state


def test_the_site_audit_is_trimmed_once_published_and_older_than_the_retention_never_the_newest():
    from meshd.meshstate import TRIM_AUDIT_BATCH
    state = _audited(3 * TRIM_AUDIT_BATCH)
    published = {meshstate.audit_key("s1", r.seq) for r in state.audit}
    now, retention = T0 + 3 * TRIM_AUDIT_BATCH + 1000, 1000.0 + TRIM_AUDIT_BATCH
    # only those older than the retention: the first hundred-odd of them
    trim = meshstate.audit_to_trim(state, now, retention, published.__contains__, 0)
    old = [r for r in state.audit if r.ts <= now - retention]
    assert trim is not None and trim.upto_seq == old[-1].seq and trim.retention == retention
    # nothing published: nothing trimmed; published up to a point: trimmed up to it
    assert meshstate.audit_to_trim(state, now, 0.0, lambda _: False, 0) is None
    upto = state.audit[150].seq
    part = {meshstate.audit_key("s1", r.seq) for r in state.audit if r.seq <= upto}
    assert meshstate.audit_to_trim(state, now, 0.0, part.__contains__, 0).upto_seq == upto
    # ... or summed up by the document's compaction (gone from it, counted in DroppedAudit)
    assert meshstate.audit_to_trim(state, now, 0.0, lambda _: False, upto).upto_seq == upto
    # fewer than a batch due: not worth a command yet
    assert meshstate.audit_to_trim(state, now, now - (T0 + TRIM_AUDIT_BATCH // 2), published.__contains__, 0) is None
    # everything due and published: all but the newest, from which publishing goes on
    everything = meshstate.audit_to_trim(state, now, 0.0, published.__contains__, 0)
    newest = state.audit[-1]
    assert everything.upto_seq == state.audit[-2].seq
    before = len(state.audit)
    assert sitestate.apply(state, encode(everything, Envelope(ts=now))).fields == {"trimmed": before - 1}
    assert state.audit == [newest]
    assert meshstate.audit_to_publish(state, published.__contains__) == []


def test_a_trim_takes_only_records_old_enough_by_its_own_clock():
    state = _audited(10)
    seqs = [r.seq for r in state.audit]
    # a proposer whose clock ran ahead names them all; the site's copy keeps the young ones
    trim = TrimAudit(upto_seq=seqs[-1], retention=5.0)
    result = sitestate.apply(state, encode(trim, Envelope(ts=T0 + 9.5)))
    assert [r.ts for r in state.audit] == [T0 + 5, T0 + 6, T0 + 7, T0 + 8, T0 + 9]
    assert result.fields["trimmed"] == len(seqs) - 5
    assert sitestate.apply(state, cmd("trim_audit", upto_seq=0, retention=1.0)).code == "malformed"
    assert sitestate.apply(state, cmd("trim_audit", upto_seq=5, retention=-1)).code == "malformed"
    assert len(state.audit) == 5  # a malformed trim changed nothing
