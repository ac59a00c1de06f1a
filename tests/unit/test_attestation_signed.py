"""Signed documents: kinds, tampering, forgery, shape (attestation.signed)."""

from __future__ import annotations

import copy

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from attestation.signed import MAX_DOCUMENT_BYTES, AttestationError, open_document, sign_document

from tests.unit.attestation_world import raw_public

KEY = Ed25519PrivateKey.generate()
PUB = raw_public(KEY)
DOC = sign_document(KEY, "policy", {"a": 1, "b": ["x", "y"]})


def test_round_trip():
    assert open_document(DOC, "policy", PUB) == {"a": 1, "b": ["x", "y"]}


def mutate(fn):
    doc = copy.deepcopy(DOC)
    fn(doc)
    return doc


@pytest.mark.parametrize("doc,kind,reason", [
    (DOC, "evidence", "not a 'evidence'"),  # a signature made for one kind never serves another
    (mutate(lambda d: d["body"].update(a=2)), "policy", "tampered"),
    (mutate(lambda d: d.update(sig="00" * 64)), "policy", "forged"),
    (mutate(lambda d: d.update(sig="zz")), "policy", "not an Ed25519 signature"),
    (mutate(lambda d: d.update(extra=1)), "policy", "exactly kind, body, sig"),
    (mutate(lambda d: d.update(body=[1])), "policy", "body must be a mapping"),
    (sign_document(Ed25519PrivateKey.generate(), "policy", {"a": 1}), "policy", "does not verify"),
    ("junk", "policy", "not a signed document"),
    (sign_document(KEY, "policy", {"x": "y" * MAX_DOCUMENT_BYTES}), "policy", "larger than"),
])
def test_refusals(doc, kind, reason):
    with pytest.raises(AttestationError, match=reason):
        open_document(doc, kind, PUB)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=10), min_size=1, max_size=5),
       st.data())
def test_any_change_to_a_signed_body_is_caught(body, data):
    doc = sign_document(KEY, "revocations", body)
    key = data.draw(st.sampled_from(sorted(body)))
    changed = copy.deepcopy(doc)
    changed["body"][key] = [changed["body"][key]]  # any different value
    with pytest.raises(AttestationError):
        open_document(changed, "revocations", PUB)
    assert open_document(doc, "revocations", PUB) == body
