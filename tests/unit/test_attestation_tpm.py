"""TPM evidence (attestation.tpm, and the verifier's TPM checks) against a real software TPM.

The quotes, keys and credential activations here come from swtpm (libtpms, the TCG reference
TPM 2.0) through meshd.io.tpm; the appraisal is the pure code. Attacks: a quote over PCR
values the event log does not explain, a replayed quote, another node's quote, a signature by
another TPM, a quote over the wrong PCR, a downgrade to software evidence, a credential for
another TPM.
"""

from __future__ import annotations

import hashlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attestation import tpm
from attestation.evidence import MEASURED_PACKAGE, TpmClaims, parse_claims
from attestation.verifier import TpmBinding, verify
from tests.swtpm import SoftwareTpm, require_swtpm
from tests.unit.attestation_world import GOOD_DIGEST, NOW, Node, challenge, policy

NONCE = "cd" * 16
NODE = Node()


def test_replay_is_the_pcr_extend_chain():
    one = hashlib.sha256(b"one").digest()
    assert tpm.replay([]) == tpm.PCR_INITIAL
    assert tpm.replay([one]) == hashlib.sha256(bytes(32) + one).digest()
    assert tpm.replay([one, one]) == hashlib.sha256(tpm.replay([one]) + one).digest()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_parsers_reject_junk_with_a_reason(data):
    for parse in (tpm.parse_public, tpm.parse_quote):
        try:
            parse(data)
        except tpm.TpmError as e:
            assert str(e)


@pytest.mark.parametrize("data, reason", [
    (b"", "must be 2 to"),
    (b"\x00\x05abc", "truncated"),
    (b"\x00\x01ab", "trailing bytes"),
    (b"\x00\x04" + b"\x00\x01\x00\x04", "truncated"),  # an RSA key's header, cut before its attributes
    (b"\x00\x08" + b"\x00\x01\x00\x04" + bytes(4), "not SHA-256"),  # a SHA-1 name
])
def test_parse_public_reasons(data, reason):
    with pytest.raises(tpm.TpmError, match=reason):
        tpm.parse_public(data)


# --- with a real TPM -----------------------------------------------------------------------

class Attester:
    """One TPM-backed node: its swtpm, meshd's TPM device on it, its node key."""

    def __init__(self, root, name: str) -> None:
        from meshd.io.tpm import TpmDevice
        self.sim = SoftwareTpm(root / f"{name}-state").start()
        (root / name).mkdir()
        self.device = TpmDevice(self.sim.tcti, root / name)
        self.device.open()
        self.node = Node()
        self.events = self.device.measure(GOOD_DIGEST)

    def quote(self, nonce: str = NONCE, node_id: str | None = None) -> tuple[bytes, bytes]:
        return self.device.quote(tpm.quote_data(nonce, node_id or self.node.node_id))

    def evidence(self, nonce: str = NONCE, credential: bytes = b"", quote=None, events=None) -> dict:
        attest, signature = quote or self.quote(nonce)
        claims = TpmClaims(attest.hex(), signature.hex(), tuple(events or self.events), credential.hex())
        return self.node.evidence(nonce, tpm=claims)

    def close(self) -> None:
        self.device.close()
        self.sim.stop()


@pytest.fixture(scope="module")
def attesters(tmp_path_factory):
    require_swtpm()
    root = tmp_path_factory.mktemp("tpm")
    a, b = Attester(root, "a"), Attester(root, "b")
    yield a, b
    a.close()
    b.close()


def appraise(attester, quote=None, events=None, nonce=NONCE, node_id=None, ak=None, package=GOOD_DIGEST):
    attest, signature = quote or attester.quote(nonce, node_id)
    return tpm.appraise_quote(tpm.parse_public(ak or attester.device.ak_public), attest, signature,
                              list(events if events is not None else attester.events), nonce,
                              attester.node.node_id, package)


def test_keys_from_the_tpm_parse_and_qualify(attesters):
    a, _ = attesters
    ak, ek = tpm.parse_public(a.device.ak_public), tpm.parse_public(a.device.ek_public)
    assert tpm.check_attestation_key(ak) == [] and tpm.check_endorsement_key(ek) == []
    assert tpm.check_attestation_key(ek)  # an EK decrypts: never fit to sign quotes
    assert tpm.check_endorsement_key(ak)


def test_a_fresh_quote_verifies(attesters):
    a, _ = attesters
    assert appraise(a) == []


@pytest.mark.parametrize("attack, reason", [
    ("replayed", "not bound to this challenge"),
    ("other node", "not bound to this challenge"),
    ("other tpm", "signature does not verify"),
    ("log altered", "does not explain"),
    ("log empty", "event log is empty"),
    ("other package", "last measurement is not the package digest"),
    ("bit flipped", "signature does not verify"),
    ("truncated", "truncated"),
])
def test_quote_attacks(attesters, attack, reason):
    a, b = attesters
    attest, signature = a.quote()
    kwargs: dict = {}
    if attack == "replayed":
        kwargs["quote"] = a.quote("ef" * 16)  # an answer to an earlier challenge
    elif attack == "other node":
        kwargs["quote"] = a.quote(NONCE, Node().node_id)
    elif attack == "other tpm":
        kwargs["quote"] = b.quote(NONCE, a.node.node_id)
    elif attack == "log altered":
        kwargs["events"] = [hashlib.sha256(b"innocent").hexdigest()] + a.events
        kwargs["package"] = GOOD_DIGEST
    elif attack == "log empty":
        kwargs["events"] = []
    elif attack == "other package":
        kwargs["package"] = hashlib.sha256(b"modified").hexdigest()
    elif attack == "bit flipped":
        flipped = bytearray(attest)
        flipped[-5] ^= 1
        kwargs["quote"] = (bytes(flipped), signature)
    elif attack == "truncated":
        kwargs["quote"] = (attest[:-3], signature)
    assert any(reason in r for r in appraise(a, **kwargs)), appraise(a, **kwargs)


def test_a_quote_over_the_wrong_pcr_values_is_refused(tmp_path):
    """Something else extended the measurement PCR: the log no longer explains the quote."""
    require_swtpm()
    c = Attester(tmp_path, "c")
    try:
        c.device.close()
        c.sim.pcr_extend(tpm.MEASUREMENT_PCR, hashlib.sha256(b"rootkit").hexdigest())
        c.device.open()  # keeps its log: the PCR is not at its initial value
        reasons = appraise(c)
        assert any("does not explain" in r for r in reasons), reasons
    finally:
        c.close()


def test_a_quote_over_another_pcr_is_refused(attesters):
    a, _ = attesters
    with a.device._lock:  # a quote meshd never makes: over PCR 16 instead
        attest, signature = a.device._ctx.quote(a.device._ak, "sha256:16",
                                                tpm.quote_data(NONCE, a.node.node_id))
    reasons = appraise(a, quote=(attest.marshal(), signature.marshal()))
    assert any("does not cover exactly sha256 PCR 23" in r for r in reasons), reasons


def test_credential_activation_recovers_the_secret_only_in_that_tpm(attesters):
    a, b = attesters
    ek = tpm.parse_public(a.device.ek_public)
    ak_name = tpm.parse_public(a.device.ak_public).name
    secret = os.urandom(32)
    id_object, encrypted = tpm.make_credential(ek, ak_name, secret, os.urandom(32))
    assert a.device.activate_credential(id_object, encrypted) == secret
    from meshd.io.tpm import TpmUnavailable
    with pytest.raises(TpmUnavailable):  # another TPM holds neither key
        b.device.activate_credential(id_object, encrypted)
    # Made for another AK's name: a's TPM refuses to release it for its own AK.
    other = tpm.make_credential(ek, tpm.parse_public(b.device.ak_public).name, secret, os.urandom(32))
    with pytest.raises(TpmUnavailable):
        a.device.activate_credential(*other)


# --- the verifier with TPM evidence ---------------------------------------------------------

def check(attester, evidence, binding, site="s1", pol=None):
    return verify(evidence, challenge(attester.node, NONCE), attester.node.public, pol or policy(), site, NOW,
                  None, binding)


def test_tpm_evidence_verifies_and_is_tpm_backed(attesters):
    a, _ = attesters
    secret = os.urandom(32)
    verdict = check(a, a.evidence(credential=secret), TpmBinding(a.device.ak_public, secret))
    assert verdict.ok and verdict.tpm_backed, verdict.reasons
    assert parse_claims(a.evidence()["body"]).tpm is not None
    # Re-attestation: the key is bound already, no credential.
    assert check(a, a.evidence(), TpmBinding(a.device.ak_public)).ok


def test_tpm_required_site_accepts_tpm_evidence_refuses_software(attesters):
    a, _ = attesters
    required = policy(tpm_required_sites=frozenset({"s1"}))
    assert check(a, a.evidence(), TpmBinding(a.device.ak_public), pol=required).ok
    verdict = check(a, a.node.evidence(NONCE), None, pol=required)
    assert not verdict.ok and "requires TPM-backed evidence" in verdict.reason


@pytest.mark.parametrize("attack, reason", [
    ("downgrade", "carries no quote"),
    ("wrong credential", "credential activation failed"),
    ("other ak", "signature does not verify"),
])
def test_verifier_tpm_attacks(attesters, attack, reason):
    a, b = attesters
    secret = os.urandom(32)
    if attack == "downgrade":  # a bound node answering with software-only evidence
        verdict = check(a, a.node.evidence(NONCE), TpmBinding(a.device.ak_public))
    elif attack == "wrong credential":
        verdict = check(a, a.evidence(credential=os.urandom(32)), TpmBinding(a.device.ak_public, secret))
    else:  # evidence quoted by b's TPM for a's node, against a's bound key
        quote = b.quote(NONCE, a.node.node_id)
        verdict = check(a, a.evidence(quote=quote, events=b.events), TpmBinding(a.device.ak_public))
    assert not verdict.ok and not verdict.tpm_backed
    assert reason in verdict.reason, verdict.reason


@pytest.mark.parametrize("tpm_claim, reason", [
    ({"quote": "zz", "signature": "00", "events": []}, "tpm.quote"),
    ({"quote": "00", "signature": "00", "events": ["x"]}, "tpm.events"),
    ({"quote": "00", "signature": "00", "events": [], "credential": "00" * 33}, "tpm.credential"),
    ({"quote": "00", "signature": "00", "events": [], "extra": 1}, "tpm must hold"),
    ({"quote": "00", "signature": "00", "events": ["ab" * 32] * 1025}, "tpm.events"),
])
def test_malformed_tpm_claims_are_refused(tpm_claim, reason):
    body = NODE.claims(NONCE).to_body() | {"tpm": tpm_claim}
    with pytest.raises(Exception, match=reason):
        parse_claims(body)
    assert MEASURED_PACKAGE in body["measurements"]
