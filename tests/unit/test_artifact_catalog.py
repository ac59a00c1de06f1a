"""meshd.artifacts.catalog and the catalog commands of the site state machine."""

import hashlib

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from attestation.policy import Policy, sign_policy
from meshd import sitestate
from meshd.artifacts import catalog
from meshd.artifacts.manifest import pieces_digest, public_hex, sign_manifest
from meshd.commands import CONFLICT, UNTRUSTED
from tests.unit.test_sitestate import T0, cmd, founded

ROOT = Ed25519PrivateKey.generate()


def site():
    state = founded(2)
    state.trust_root = public_hex(ROOT)
    return state


def manifest(data=b"model", key=ROOT, pushed_at=T0, mesh="m1", name="m.onnx"):
    return sign_manifest(key, mesh=mesh, digest="sha256:" + hashlib.sha256(data).hexdigest(), size=len(data),
                         name=name, pieces=pieces_digest(hashlib.sha256(data).digest()), pushed_by="op",
                         pushed_at=pushed_at)


def add(state, document):
    return sitestate.apply(state, cmd("add_artifact", manifest=document, actor="op"))


def test_a_root_signed_manifest_joins_and_is_listed_with_holders():
    state = site()
    doc = manifest()
    digest = doc["body"]["digest"]
    assert add(state, doc).ok
    assert sitestate.apply(state, cmd("heartbeat", node_id=f"{2:032x}", seq=2, artifacts=[digest])).ok
    [row] = catalog.listing(state)
    assert (row["digest"], row["name"], row["size"], row["holders"], row["pinned_by"]) == (
        digest, "m.onnx", 5, ["n2"], [])
    assert catalog.holder_ids(state, digest) == [f"{2:032x}"]
    assert state.audit[-1].action == "artifact-push"


def test_untrusted_or_foreign_manifests_are_refused_and_change_nothing():
    state = site()
    for doc, reason in ((manifest(key=Ed25519PrivateKey.generate()), "does not trust"),
                        (manifest(mesh="other"), "another mesh"), ({"kind": "artifact"}, "not a signed")):
        result = add(state, doc)
        assert not result.ok and result.code == UNTRUSTED and reason in result.text
    assert state.artifacts == {}


def test_a_release_key_in_the_policy_is_trusted_and_stops_being_when_taken_out():
    state = site()
    release = Ed25519PrivateKey.generate()
    policy = Policy(mesh_id="m1", serial=1, min_version="0.1.0", allowed_digests={},
                    release_keys=frozenset({public_hex(release)}))
    state.policy = sign_policy(ROOT, policy)
    assert add(state, manifest(key=release)).ok
    assert catalog.trusted_keys(state)[public_hex(release)] == "release key"
    state.policy = sign_policy(ROOT, Policy(mesh_id="m1", serial=2, min_version="0.1.0", allowed_digests={}))
    assert not add(state, manifest(b"other", key=release)).ok


def test_removal_is_refused_while_a_version_pins_it_and_an_old_manifest_cannot_bring_it_back():
    state = site()
    doc = manifest()
    digest = doc["body"]["digest"]
    assert add(state, doc).ok
    spec = {"app": {"name": "det", "command": ["run"], "artifact": [{"name": "model", "digest": digest}]}}
    assert sitestate.apply(state, cmd("submit_app", spec=spec, actor="op")).ok
    assert catalog.pins(state) == {digest: ["det@v1"]}
    refused = sitestate.apply(state, cmd("remove_artifact", digest=digest))
    assert not refused.ok and refused.code == CONFLICT and "det@v1" in refused.text
    state.apps.clear()
    assert sitestate.apply(state, cmd("remove_artifact", digest=digest)).ok
    assert digest not in state.artifacts
    replay = add(state, doc)
    assert not replay.ok and "replayed old manifest" in replay.text
    assert add(state, manifest(pushed_at=T0 + 5)).ok  # pushed again: a newer manifest
    assert sitestate.apply(state, cmd("remove_artifact", digest="sha256:" + "0" * 64))["removed"] is False


def test_heartbeat_artifacts_are_checked():
    state = site()
    bad = sitestate.apply(state, cmd("heartbeat", node_id=f"{2:032x}", seq=2, artifacts=["md5:x"]))
    assert not bad.ok and "artifacts" in bad.text


def test_the_catalog_and_its_removals_are_bounded(monkeypatch):
    monkeypatch.setattr(catalog, "MAX_CATALOG", 2)
    monkeypatch.setattr(catalog, "MAX_REMOVED", 1)
    state = site()
    first, second = manifest(b"a"), manifest(b"b")
    assert add(state, first).ok and add(state, second).ok
    full = add(state, manifest(b"c"))
    assert not full.ok and full.code == CONFLICT and "artifact rm" in full.text
    for doc in (first, second):
        assert sitestate.apply(state, cmd("remove_artifact", digest=doc["body"]["digest"])).ok
    assert len(state.artifacts_removed) == 1
