"""The verifier against every evidence attack the pure core can see (attestation.verifier),
plus the claims and policy parsers it relies on (attestation.evidence, attestation.policy)."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attestation.evidence import MEASURED_CONFIG, MEASURED_PACKAGE, make_evidence, parse_claims
from attestation.policy import newer, open_policy, sign_policy
from attestation.revocation import RevocationList
from attestation.signed import AttestationError
from attestation.verifier import NONCE_TTL, verify
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.unit.attestation_world import CONFIG_DIGEST, GOOD_DIGEST, NOW, Node, challenge, policy, raw_public

NODE = Node()
OTHER = Node()
NONCE = "ab" * 16


def check(evidence, chal=None, key=None, pol=None, site="s1", now=NOW, revocations=None):
    return verify(evidence, chal or challenge(NODE, NONCE), key or NODE.public, pol or policy(), site, now,
                  revocations)


def test_good_evidence_verifies():
    verdict = check(NODE.evidence(NONCE))
    assert verdict.ok and verdict.reasons == () and verdict.claims.node_id == NODE.node_id
    assert verdict.tpm_backed is False  # software evidence is self-reported


def tampered():
    doc = NODE.evidence(NONCE)
    doc["body"]["measurements"][MEASURED_PACKAGE] = GOOD_DIGEST[::-1]
    return doc


ATTACKS = [
    # (id, verdict inputs, a fragment of the reason)
    ("replayed evidence (an older challenge's nonce)", dict(evidence=NODE.evidence("cd" * 16)), "another challenge"),
    ("another node's nonce", dict(evidence=NODE.evidence(NONCE), chal=challenge(OTHER, NONCE)),
     "the challenge was for"),
    ("stale nonce", dict(evidence=NODE.evidence(NONCE), now=NOW + NONCE_TTL + 5), "stale nonce"),
    ("forged signature (another key)", dict(evidence=make_evidence(OTHER.key, NODE.claims(NONCE))), "forged"),
    ("tampered claim", dict(evidence=tampered()), "tampered"),
    ("wrong software digest", dict(evidence=NODE.evidence(NONCE, measurements={
        MEASURED_PACKAGE: "1" * 64, MEASURED_CONFIG: CONFIG_DIGEST})), "not a reference value"),
    ("version below the minimum", dict(evidence=NODE.evidence(NONCE, version="0.1.9"),
                                       pol=policy(allowed_digests={"0.1.9": frozenset({GOOD_DIGEST})})),
     "older than the policy minimum"),
    ("a version the policy does not know", dict(evidence=NODE.evidence(NONCE, version="0.3.0")),
     "not a reference value"),
    ("revoked node", dict(evidence=NODE.evidence(NONCE),
                          revocations=RevocationList("mesh1", 1).with_revoked(NODE.node_id, NOW, "op", "stolen")),
     "revoked (stolen, by op)"),
    ("a challenge older than the policy's evidence_max_age", dict(evidence=NODE.evidence(NONCE), now=NOW + 25,
                                                                 pol=policy(evidence_max_age=20.0)), "stale nonce"),
    ("software evidence where TPM is required", dict(evidence=NODE.evidence(NONCE),
                                                     pol=policy(tpm_required_sites=frozenset({"s1"}))),
     "requires TPM-backed evidence"),
    ("not evidence at all", dict(evidence=b"\x80\x04pickle"), "not a signed document"),
    ("a policy document offered as evidence", dict(evidence=sign_policy(NODE.key, policy())), "not a 'evidence'"),
]


@pytest.mark.parametrize("inputs,reason", [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS])
def test_attacks_are_refused_with_a_reason(inputs, reason):
    verdict = check(**inputs)
    assert not verdict.ok
    assert reason in verdict.reason


UNKNOWN_BUILD = dict(evidence=NODE.evidence(NONCE, measurements={MEASURED_PACKAGE: "1" * 64,
                                                                 MEASURED_CONFIG: CONFIG_DIGEST}))


@pytest.mark.parametrize("inputs, unknown", [
    (UNKNOWN_BUILD, True),  # an upgrade not allowed yet: authentic, only the software is new
    (dict(evidence=NODE.evidence(NONCE, version="0.3.0")), True),
    (dict(evidence=NODE.evidence(NONCE, version="0.1.9"), pol=policy(allowed_digests={"0.1.9": frozenset({GOOD_DIGEST})})),
     True),
    (dict(evidence=NODE.evidence(NONCE)), False),  # it verifies
    (dict(UNKNOWN_BUILD, chal=challenge(OTHER, NONCE)), False),  # and for another node: no upgrade
    (dict(UNKNOWN_BUILD, now=NOW + NONCE_TTL + 5), False),  # and stale
    (dict(evidence=make_evidence(OTHER.key, NODE.claims(NONCE))), False),  # forged
    (dict(evidence=tampered()), False),
    (dict(UNKNOWN_BUILD, revocations=RevocationList("mesh1", 1).with_revoked(NODE.node_id, NOW, "op", "stolen")),
     False),
    (dict(UNKNOWN_BUILD, pol=policy(tpm_required_sites=frozenset({"s1"}))), False),
])
def test_unknown_software_only_when_the_software_alone_failed(inputs, unknown):
    verdict = check(**inputs)
    assert verdict.unknown_software is unknown, verdict.reasons


def test_an_unknown_digest_is_named_whole():
    verdict = check(**UNKNOWN_BUILD)
    assert "1" * 64 in verdict.reason  # what `meshctl policy allow --digest` takes, as it stands


def test_every_failed_check_is_listed():
    verdict = check(NODE.evidence("cd" * 16, version="0.1.0"), now=NOW + NONCE_TTL + 5)
    assert len(verdict.reasons) >= 3


@pytest.mark.parametrize("change,reason", [
    (lambda b: b.update(eat_nonce="xyz"), "eat_nonce"),
    (lambda b: b.update(ueid=5), "ueid"),
    (lambda b: b.update(bootseed=""), "bootseed"),
    (lambda b: b.update(swversion="latest"), "swversion"),
    (lambda b: b.update(swname="other"), "swname"),
    (lambda b: b["measurements"].pop(MEASURED_CONFIG), "measurements"),
    (lambda b: b["measurements"].update(config="nothex"), "measurement config"),
    (lambda b: b.update(iat=True), "iat"),
    (lambda b: b.update(root=True), "unknown claim 'root'"),
])
def test_malformed_claims_are_named(change, reason):
    body = NODE.claims(NONCE).to_body()
    change(body)
    with pytest.raises(AttestationError, match=reason):
        parse_claims(body)
    verdict = check(make_evidence_body(body))
    assert not verdict.ok and reason.split()[0] in verdict.reason


def make_evidence_body(body):
    from attestation.signed import sign_document
    return sign_document(NODE.key, "evidence", body)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=8), st.data())
def test_flipping_any_signature_byte_is_caught(noise, data):
    doc = NODE.evidence(NONCE)
    sig = bytearray(bytes.fromhex(doc["sig"]))
    at = data.draw(st.integers(0, len(sig) - 1))
    sig[at] ^= noise[0] or 1
    doc = copy.deepcopy(doc)
    doc["sig"] = sig.hex()
    assert not check(doc).ok


# --- policy bundles --------------------------------------------------------------------------
ROOT = Ed25519PrivateKey.generate()


def test_policy_round_trip_and_serials():
    bundle = sign_policy(ROOT, policy())
    opened = open_policy(bundle, raw_public(ROOT))
    assert opened == policy()
    assert newer(policy(serial=4), opened) and not newer(policy(serial=3), opened)
    assert not newer(policy(serial=9, mesh_id="other"), opened), "a bundle of another mesh never replaces ours"


@pytest.mark.parametrize("change,reason", [
    (lambda b: b.pop("serial"), "missing serial"),
    (lambda b: b.update(serial=-1), "serial"),
    (lambda b: b.update(min_version="new"), "min_version"),
    (lambda b: b.update(allowed_digests={"0.2.0": ["short"]}), "allowed_digests"),
    (lambda b: b.update(tpm_required_sites="s1"), "tpm_required_sites"),
    (lambda b: b.update(evidence_max_age=0), "evidence_max_age"),
])
def test_malformed_policies_are_named(change, reason):
    from attestation.signed import sign_document
    body = policy().to_body()
    change(body)
    with pytest.raises(AttestationError, match=reason):
        open_policy(sign_document(ROOT, "policy", body), raw_public(ROOT))


def test_a_policy_signed_by_another_root_is_refused():
    with pytest.raises(AttestationError, match="does not verify"):
        open_policy(sign_policy(Ed25519PrivateKey.generate(), policy()), raw_public(ROOT))


@pytest.mark.parametrize("skew", [3600.0, -3600.0, 45.0, 0.0])
def test_a_skewed_attester_clock_is_reported_never_refused(skew):
    """A board without a real-time clock, an hour off after an offline reboot (or stepped by
    NTP): its evidence answers a fresh nonce, so it verifies; the skew is told."""
    verdict = check(NODE.evidence(NONCE, issued_at=NOW + skew))
    assert verdict.ok, verdict.reasons
    assert verdict.clock_skew == pytest.approx(skew)

