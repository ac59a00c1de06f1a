"""Membership certificates and revocation lists (attestation.certs, attestation.revocation)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from attestation.certs import (MEMBER_CERT_LIFETIME, VALIDITY_TOLERANCE, cert_from_pem, cert_to_pem, check_member_cert,
                               issue_member_cert, make_root)
from attestation.revocation import (Revocation, RevocationList, open_revocation, open_revocations, sign_revocation,
                                   sign_revocations, supersedes)
from attestation.signed import AttestationError, sign_document

from tests.unit.attestation_world import NOW, Node, raw_public

ROOT_KEY = Ed25519PrivateKey.generate()
ROOT = make_root(ROOT_KEY, "mesh1", NOW)
NODE = Node()


def member(now=NOW, root_key=ROOT_KEY, root=ROOT, mesh="mesh1", **kw):
    return issue_member_cert(root_key, root, NODE.public, mesh, "s1", NODE.node_id, now, serial=42, **kw)


def test_a_fresh_member_certificate_checks_out_and_survives_pem():
    check = check_member_cert(cert_from_pem(cert_to_pem(member())), ROOT, "mesh1", NOW + 10)
    assert check.ok and (check.node_id, check.site) == (NODE.node_id, "s1")


def test_a_certificate_is_taken_within_the_stated_clock_tolerance():
    # a checker an hour ahead of the issuer: just expired on its clock, taken all the same
    assert check_member_cert(member(), ROOT, "mesh1", NOW + MEMBER_CERT_LIFETIME + 3600).ok
    # an hour behind: not valid yet on its clock, taken all the same
    assert check_member_cert(member(), ROOT, "mesh1", NOW - 3600).ok


FOREIGN_KEY = Ed25519PrivateKey.generate()
FOREIGN_ROOT = make_root(FOREIGN_KEY, "mesh1", NOW)  # same name, other key


@pytest.mark.parametrize("cert,now,revocations,reason", [
    (member(root_key=FOREIGN_KEY, root=FOREIGN_ROOT), NOW, None, "foreign root"),
    (member(root_key=FOREIGN_KEY, root=make_root(FOREIGN_KEY, "evil", NOW)), NOW, None, "foreign root"),
    (member(), NOW + MEMBER_CERT_LIFETIME + VALIDITY_TOLERANCE + 1, None, "expired"),
    (member(), NOW - VALIDITY_TOLERANCE - 3600, None, "not valid yet"),
    (member(mesh="mesh2"), NOW, None, "not a member certificate of this mesh"),
    (member(), NOW, RevocationList("mesh1", 1).with_revoked(NODE.node_id, NOW, "op", "lost"), "revoked"),
    (ROOT, NOW, None, "not a member certificate"),
])
def test_refused_certificates(cert, now, revocations, reason):
    check = check_member_cert(cert, ROOT, "mesh1", now, revocations)
    assert not check.ok and reason in check.reason


# --- revocation lists ---------------------------------------------------------------------
def test_revocation_list_round_trip_and_monotonic_numbers():
    first = RevocationList("mesh1", 0).with_revoked(NODE.node_id, NOW, "op", "stolen")
    opened = open_revocations(sign_revocations(ROOT_KEY, first), raw_public(ROOT_KEY))
    assert opened == first and opened.number == 1 and opened.is_revoked(NODE.node_id)
    second = opened.with_revoked("cd" * 16, NOW, "op", "decommissioned")
    assert supersedes(second, opened)
    assert not supersedes(opened, second), "an older list is never adopted again"
    assert not supersedes(RevocationList("mesh1", 9), second), "a list that forgets a revoked node is refused"
    assert not supersedes(RevocationList("other", 9, second.entries), second)
    assert second.with_revoked(NODE.node_id, NOW + 5, "x", "y").entries[NODE.node_id].reason == "stolen"


@pytest.mark.parametrize("body,reason", [
    ({"mesh_id": "", "number": 1, "entries": []}, "mesh_id"),
    ({"mesh_id": "m", "number": -1, "entries": []}, "number"),
    ({"mesh_id": "m", "number": 1, "entries": {}}, "entries must be a list"),
    ({"mesh_id": "m", "number": 1, "entries": [{"node_id": "x"}]}, "needs node_id"),
    ({"mesh_id": "m", "number": 1, "entries": [{"node_id": "nothex", "at": 1, "by": "a", "reason": ""}]}, "node id"),
])
def test_malformed_revocation_lists(body, reason):
    with pytest.raises(AttestationError, match=reason):
        open_revocations(sign_document(ROOT_KEY, "revocations", body), raw_public(ROOT_KEY))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["aa", "bb", "cc", "dd"]), max_size=12))
def test_revocation_only_grows(ids):
    lists = [RevocationList("mesh1", 0)]
    for short in ids:
        lists.append(lists[-1].with_revoked(short * 16, NOW, "op", ""))
    for older, newer_list in zip(lists, lists[1:]):
        assert supersedes(newer_list, older)
        assert set(older.entries) <= set(newer_list.entries)


def test_a_revocation_entry_travels_alone_signed_by_the_root():
    entry = RevocationList("mesh1", 0).with_revoked(NODE.node_id, NOW, "op", "stolen").entries[NODE.node_id]
    signed = sign_revocation(ROOT_KEY, "mesh1", entry)
    assert open_revocation(signed, raw_public(ROOT_KEY), "mesh1") == entry
    with pytest.raises(AttestationError, match="another mesh"):
        open_revocation(signed, raw_public(ROOT_KEY), "mesh2")
    with pytest.raises(AttestationError):
        open_revocation(sign_revocation(Ed25519PrivateKey.generate(), "mesh1", entry), raw_public(ROOT_KEY), "mesh1")
    with pytest.raises(AttestationError):  # a whole list is not an entry, nor the other way round
        open_revocation(sign_revocations(ROOT_KEY, RevocationList("mesh1", 1)), raw_public(ROOT_KEY), "mesh1")
    tampered = dict(signed, body=dict(signed["body"], reason="none"))
    with pytest.raises(AttestationError):
        open_revocation(tampered, raw_public(ROOT_KEY), "mesh1")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sets(st.sampled_from(["aa", "bb", "cc", "dd", "ee"])), min_size=1, max_size=4))
def test_lists_merged_from_entries_in_any_order_name_the_same_nodes(batches):
    """Sites adding each other's entries end with the same nodes, whatever the order."""
    def entries(ids):
        return [Revocation(short * 16, NOW, "op", "") for short in sorted(ids)]
    forward, backward = RevocationList("mesh1", 0), RevocationList("mesh1", 0)
    for batch in batches:
        forward = forward.with_entries(entries(batch))
    for batch in reversed(batches):
        backward = backward.with_entries(entries(batch))
    assert set(forward.entries) == set(backward.entries) == {s * 16 for b in batches for s in b}
    assert forward.number == len(batches)
