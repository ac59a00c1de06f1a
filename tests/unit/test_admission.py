"""The admission decision and the join handshake cryptography (meshd.admission, meshd.tokens)."""

from __future__ import annotations

import dataclasses
import os

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from attestation.certs import cert_to_pem, make_root
from attestation.evidence import make_evidence
from attestation.policy import sign_policy
from attestation.revocation import RevocationList, open_revocations, sign_revocations
from meshd import admission, sitestate, tokens
from meshd.state import SiteState

from tests.unit.attestation_world import GOOD_DIGEST, Node, policy

NOW = 1_700_000_000.0
SECRET = bytes(range(32))
ROOT = Ed25519PrivateKey.generate()


def raw(pub) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def trust(revoked: tuple[str, ...] = (), **policy_changes) -> dict:
    revocations = RevocationList("m", 0)
    for node_id in revoked:
        revocations = revocations.with_revoked(node_id, NOW - 20, "op", "stolen")
    return {"root": raw(ROOT.public_key()).hex(), "root_cert": cert_to_pem(make_root(ROOT, "m", NOW - 100)),
            "policy": sign_policy(ROOT, policy(mesh_id="m", **policy_changes)),
            "revocations": sign_revocations(ROOT, revocations)}


def site_with_token(expires: float = NOW + 60, **trust_changes) -> SiteState:
    state = SiteState()
    founder = {"node_id": "f" * 32, "name": "founder", "site": "s1", "address": "198.18.0.1:7700",
               "raft_address": "198.18.0.1:7701", "public_key": "00" * 32, "arch": "x86_64", "labels": {}}
    assert sitestate.apply(state, {"op": "bootstrap", "ts": NOW - 10, "site": "s1", "mesh_id": "m", "node": founder,
                                   "trust": trust(**trust_changes)}).ok
    assert sitestate.apply(state, {"op": "create_token", "ts": NOW - 5, "token_id": "tok", "site": "s1",
                                   "secret": SECRET.hex(), "expires_at": expires}).ok
    return state


def joiner(key: Ed25519PrivateKey | None = None, **overrides):
    key = key or Ed25519PrivateKey.generate()
    pub = raw(key.public_key())
    node = {"node_id": tokens.node_id_for(pub), "name": "edge-2", "site": "s1", "address": "198.18.0.2:7700",
            "raft_address": "198.18.0.2:7701", "public_key": pub.hex(), "arch": "aarch64", "labels": {}}
    node.update(overrides)
    return key, node


def evidence_for(key, nonce: bytes, **claims) -> dict:
    return make_evidence(key, Node(key).claims(nonce.hex(), issued_at=NOW, **claims))


def handshake(node, key, *, secret=SECRET, token_id="tok", challenge=None, sign_with=None, evidence=None):
    challenge = challenge or admission.Challenge(nonce=os.urandom(32), member_eph=raw(X25519PrivateKey.generate().public_key()),
                                                 issued_at=NOW)
    eph = raw(X25519PrivateKey.generate().public_key())
    transcript = tokens.join_transcript(challenge.nonce, eph, challenge.member_eph, token_id, node)
    request = admission.JoinRequest(token_id=token_id, node=node, joiner_eph=eph,
                                    proof=tokens.token_proof(secret, transcript),
                                    signature=tokens.sign(sign_with or key, transcript),
                                    evidence=evidence if evidence is not None else evidence_for(key, challenge.nonce))
    return challenge, request


def test_a_correct_join_is_admitted():
    key, node = joiner()
    challenge, request = handshake(node, key)
    verdict = admission.decide(site_with_token(), challenge, request, NOW + 1)
    assert verdict.admit, verdict.reason


def replay(challenge, request):
    """The same answer replayed to a new challenge (the verifier's nonce changed)."""
    return dataclasses.replace(challenge, nonce=os.urandom(32)), request


@pytest.mark.parametrize("name, mutate, reason", [
    ("wrong token secret", lambda n, k: handshake(n, k, secret=b"x" * 32), "token proof does not match"),
    ("unknown token", lambda n, k: handshake(n, k, token_id="nope"), "unknown join token"),
    ("signed by another key", lambda n, k: handshake(n, k, sign_with=Ed25519PrivateKey.generate()), "signature"),
    ("replayed to a new nonce", lambda n, k: replay(*handshake(n, k)), "signature"),
    ("stale challenge", lambda n, k: handshake(n, k, challenge=admission.Challenge(
        nonce=b"n" * 32, member_eph=b"e" * 32, issued_at=NOW - 1000)), "challenge expired"),
])
def test_bad_joins_are_refused_with_reasons(name, mutate, reason):
    key, node = joiner()
    challenge, request = mutate(node, key)
    verdict = admission.decide(site_with_token(), challenge, request, NOW + 1)
    assert not verdict.admit
    assert reason in verdict.reason, verdict.reason


@pytest.mark.parametrize("name, mutate, reason", [
    ("no evidence", lambda k, c: {}, "not a signed document"),
    ("evidence for another nonce (replayed)", lambda k, c: evidence_for(k, b"r" * 32), "another challenge"),
    ("modified software", lambda k, c: evidence_for(k, c.nonce, measurements={
        "meshd-package": "2" * 64, "config": "3" * 64}), "not a reference value"),
    ("evidence signed by another key", lambda k, c: evidence_for(Ed25519PrivateKey.generate(), c.nonce),
     "does not verify"),
])
def test_evidence_gates_the_join(name, mutate, reason):
    key, node = joiner()
    challenge, request = handshake(node, key)
    request = dataclasses.replace(request, evidence=mutate(key, challenge))
    verdict = admission.decide(site_with_token(), challenge, request, NOW + 1)
    assert not verdict.admit and "attestation: " in verdict.reason and reason in verdict.reason, verdict.reason


def test_a_revoked_node_is_refused_by_the_revocation_list():
    key, node = joiner()
    challenge, request = handshake(node, key)
    verdict = admission.decide(site_with_token(revoked=(node["node_id"],)), challenge, request, NOW + 1)
    assert not verdict.admit and "revoked" in verdict.reason


def test_a_site_requiring_tpm_refuses_software_evidence():
    key, node = joiner()
    challenge, request = handshake(node, key)
    verdict = admission.decide(site_with_token(tpm_required_sites=frozenset({"s1"})), challenge, request, NOW + 1)
    assert not verdict.admit and "software-only" in verdict.reason


def test_bootstrap_refuses_trust_documents_not_signed_by_the_root():
    bad = trust()
    bad["policy"] = sign_policy(Ed25519PrivateKey.generate(), policy(mesh_id="m"))
    state = SiteState()
    founder = {"node_id": "f" * 32, "name": "founder", "site": "s1", "address": "198.18.0.1:7700",
               "raft_address": "198.18.0.1:7701", "public_key": "00" * 32, "arch": "x86_64", "labels": {}}
    result = sitestate.apply(state, {"op": "bootstrap", "ts": NOW, "site": "s1", "mesh_id": "m", "node": founder,
                                     "trust": bad})
    assert not result.ok and "does not verify" in result.text and state.site == ""


def test_policy_updates_need_the_root_and_a_higher_serial():
    state = site_with_token()
    newer_bundle = sign_policy(ROOT, policy(mesh_id="m", serial=4, allowed_digests={
        "0.2.0": frozenset({GOOD_DIGEST}), "0.3.0": frozenset({"4" * 64})}))
    assert sitestate.apply(state, {"op": "set_policy", "ts": NOW, "policy": newer_bundle}).ok
    again = sitestate.apply(state, {"op": "set_policy", "ts": NOW, "policy": newer_bundle})
    assert not again.ok and "not newer" in again.text
    forged = sitestate.apply(state, {"op": "set_policy", "ts": NOW, "policy": sign_policy(
        Ed25519PrivateKey.generate(), policy(mesh_id="m", serial=9))})
    assert not forged.ok and "does not verify" in forged.text and state.policy == newer_bundle


def test_node_id_must_derive_from_the_key():
    key, node = joiner(node_id="a" * 32)
    challenge, request = handshake(node, key)
    verdict = admission.decide(site_with_token(), challenge, request, NOW + 1)
    assert not verdict.admit and "does not derive" in verdict.reason


def test_wrong_site_and_expired_and_used_token():
    key, node = joiner(site="other")
    challenge, request = handshake(node, key)
    assert "asks for site" in admission.decide(site_with_token(), challenge, request, NOW).reason
    key, node = joiner()
    challenge, request = handshake(node, key)
    assert "expired" in admission.decide(site_with_token(expires=NOW - 1), challenge, request, NOW).reason
    state = site_with_token()
    sitestate.apply(state, {"op": "admit_node", "ts": NOW, "token_id": "tok", "node": joiner()[1]})
    assert "already used" in admission.decide(state, challenge, request, NOW).reason


def test_welcome_is_sealed_to_the_token_holder_only():
    joiner_eph, member_eph = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    transcript = b"t" * 32
    member_key = tokens.session_key(member_eph, raw(joiner_eph.public_key()), SECRET, transcript)
    sealed = tokens.seal(member_key, os.urandom(12), {"site_secret": "s"})
    assert tokens.unseal(tokens.session_key(joiner_eph, raw(member_eph.public_key()), SECRET, transcript),
                         sealed) == {"site_secret": "s"}
    wrong = tokens.session_key(joiner_eph, raw(member_eph.public_key()), b"y" * 32, transcript)
    with pytest.raises(tokens.TokenError):
        tokens.unseal(wrong, sealed)


def test_token_format_round_trips():
    text = tokens.format_token("factory-a", "0123abcd", SECRET)
    parsed = tokens.parse_token(text)
    assert (parsed.site, parsed.token_id, parsed.secret) == ("factory-a", "0123abcd", SECRET)


@given(st.text(max_size=600))
def test_junk_tokens_raise_token_error_only(text):
    try:
        tokens.parse_token(text)
    except tokens.TokenError:
        pass


@pytest.mark.parametrize("text", ["", "mtk1_", "mtk1_!!!!", "mtk1_" + "A" * 600, "hello",
                                  "mtk1_eyJzIjoiYSJ9"])
def test_malformed_tokens_are_refused(text):
    with pytest.raises(tokens.TokenError):
        tokens.parse_token(text)


def test_revoking_needs_a_newer_root_signed_list_that_names_the_node():
    state = site_with_token()
    key, node = joiner()
    assert sitestate.apply(state, {"op": "admit_node", "ts": NOW, "token_id": "tok", "node": node}).ok
    node_id = node["node_id"]

    def revoke(doc):
        return sitestate.apply(state, {"op": "revoke_node", "ts": NOW, "node_id": node_id, "reason": "lost",
                                       "revocations": doc, "actor": "op"})

    names_other = sign_revocations(ROOT, RevocationList("m", 0).with_revoked("e" * 32, NOW, "op", ""))
    assert "does not name the node" in revoke(names_other).text
    forged = sign_revocations(Ed25519PrivateKey.generate(), RevocationList("m", 0).with_revoked(node_id, NOW, "x", ""))
    assert "does not verify" in revoke(forged).text
    assert state.nodes[node_id].admin == "active"
    stale = sign_revocations(ROOT, RevocationList("m", -1).with_revoked(node_id, NOW, "op", ""))  # number 0
    assert "does not supersede" in revoke(stale).text
    good = sign_revocations(ROOT, RevocationList("m", 0).with_revoked(node_id, NOW, "op", "lost"))
    assert revoke(good).ok and state.nodes[node_id].admin == "revoked"
    assert state.revocations == good and state.audit[-1].action == "revoke"
    assert revoke(good).ok, "a retried revocation is answered, not refused"
    challenge, request = handshake(node, key)
    state.tokens["tok"] = dataclasses.replace(state.tokens["tok"], used_by=None)
    assert "revoked" in admission.decide(state, challenge, request, NOW + 1).reason


def test_revocations_from_other_sites_are_adopted_only_as_a_superseding_root_signed_list():
    state = site_with_token(revoked=("a" * 32,))  # list number 1
    key, node = joiner()
    assert sitestate.apply(state, {"op": "admit_node", "ts": NOW, "token_id": "tok", "node": node}).ok
    member = node["node_id"]

    def adopt(doc, sites=("beta",)):
        before = (state.revocations, dict(state.nodes), len(state.audit))
        result = sitestate.apply(state, {"op": "adopt_revocations", "ts": NOW, "revocations": doc,
                                         "sites": list(sites), "actor": "site beta"})
        if not result.ok:
            assert (state.revocations, dict(state.nodes), len(state.audit)) == before, "a refusal changes nothing"
        return result

    elsewhere = RevocationList("m", 5).with_revoked("b" * 32, NOW, "ops@beta", "stolen")  # beta's own count
    assert "does not supersede" in adopt(sign_revocations(ROOT, elsewhere)).text, "it forgets a revoked node"
    current = open_revocations(state.revocations, raw(ROOT.public_key()))
    forged = current.with_entries([elsewhere.entries["b" * 32]])
    assert "does not verify" in adopt(sign_revocations(Ed25519PrivateKey.generate(), forged)).text
    assert "sites" in adopt(sign_revocations(ROOT, forged), sites=(7,)).text
    merged = forged.with_revoked(member, NOW, "ops@beta", "cloned disk")
    assert adopt(sign_revocations(ROOT, merged)).ok
    assert sitestate.revoked_by_list(state) == {"a" * 32, "b" * 32, member}
    assert state.nodes[member].admin == "revoked" and "beta" in state.nodes[member].reason
    assert [a.action for a in state.audit[-2:]] == ["revoke-adopted", "revoke-adopted"]
    assert "does not supersede" in adopt(sign_revocations(ROOT, merged)).text, "the same list twice"
    challenge, request = handshake(node, key)
    state.tokens["tok"] = dataclasses.replace(state.tokens["tok"], used_by=None)
    assert "revoked" in admission.decide(state, challenge, request, NOW + 1).reason


def test_a_policy_from_another_site_is_adopted_only_when_it_outranks_the_one_in_force():
    state = site_with_token()  # policy serial 3, issued NOW - 100

    def adopt(doc, site="beta"):
        before = (state.policy, len(state.events), len(state.audit))
        result = sitestate.apply(state, {"op": "adopt_policy", "ts": NOW, "policy": doc, "site": site,
                                         "actor": f"site {site}"})
        if not result.ok:
            assert (state.policy, len(state.events), len(state.audit)) == before, "a refusal changes nothing"
        return result

    older = sign_policy(ROOT, policy(mesh_id="m", serial=2, issued_at=NOW))
    assert "does not outrank" in adopt(older).text
    assert "does not outrank" in adopt(state.policy).text, "the one in force again"
    assert "another mesh" in adopt(sign_policy(ROOT, policy(mesh_id="other", serial=9))).text
    assert "verify" in adopt(sign_policy(Ed25519PrivateKey.generate(), policy(mesh_id="m", serial=9))).text
    assert "site must name" in adopt(sign_policy(ROOT, policy(mesh_id="m", serial=9)), site="").text
    newer = sign_policy(ROOT, policy(mesh_id="m", serial=4, issued_at=NOW))
    assert adopt(newer).ok and state.policy == newer
    assert state.events[-1].kind == "attestation" and state.audit[-1].action == "policy-adopted"
    # the same serial made apart: the later one wins, and the event says this site's is dropped
    rival = sign_policy(ROOT, policy(mesh_id="m", serial=4, issued_at=NOW + 1, tpm_required_sites=["s1"]))
    assert adopt(rival).ok and state.policy == rival
    assert state.events[-1].kind == "conflict" and "dropped" in state.events[-1].message
    assert "does not outrank" in adopt(newer).text


# --- founder tokens: a member of s1 lets a joiner found site "beta" of the same mesh -----------

FOUNDER_SECRET = bytes(range(32, 64))


def site_with_founder_token(expires: float = NOW + 60, site: str = "beta", **trust_changes) -> SiteState:
    state = site_with_token(**trust_changes)
    assert sitestate.apply(state, {"op": "create_token", "ts": NOW - 5, "token_id": "ftok", "site": site,
                                   "secret": FOUNDER_SECRET.hex(), "expires_at": expires}).ok
    return state


def founder_handshake(node, key, **kwargs):
    return handshake(node, key, secret=kwargs.pop("secret", FOUNDER_SECRET), token_id=kwargs.pop("token_id", "ftok"),
                     **kwargs)


def test_a_founder_token_admits_its_holder_to_found_its_site():
    key, node = joiner(site="beta")
    challenge, request = founder_handshake(node, key)
    state = site_with_founder_token()
    verdict = admission.decide(state, challenge, request, NOW + 1)
    assert verdict.admit and verdict.founds == "beta", verdict.reason
    # the commit that follows consumes the token and leaves s1's members as they were
    members = dict(state.nodes)
    result = sitestate.apply(state, {"op": "found_site", "ts": NOW + 1, "token_id": "ftok", "node": node})
    assert result.ok and state.nodes == members and state.tokens["ftok"].used_by == node["node_id"]
    other_key, other = joiner(site="beta")
    again = admission.decide(state, *founder_handshake(other, other_key), NOW + 2)
    assert not again.admit and again.reason == "join token was already used", again.reason


def test_a_token_for_this_site_goes_the_join_path():
    key, node = joiner()
    challenge, request = handshake(node, key)
    verdict = admission.decide(site_with_founder_token(), challenge, request, NOW + 1)
    assert verdict.admit and verdict.founds == "", verdict.reason


def _used(state: SiteState) -> SiteState:
    other = joiner(site="beta")[1]
    assert sitestate.apply(state, {"op": "found_site", "ts": NOW, "token_id": "ftok", "node": other}).ok
    return state


@pytest.mark.parametrize("name, state, site, kwargs, reason", [
    ("used by another founder", lambda: _used(site_with_founder_token()), "beta", {}, "already used"),
    ("expired", lambda: site_with_founder_token(expires=NOW), "beta", {}, "expired"),
    ("token for beta, asks for gamma", site_with_founder_token, "gamma", {}, "token is for site 'beta', not 'gamma'"),
    ("asks for this site with a beta token", site_with_founder_token, "s1", {},
     "token is for site 'beta', not 's1'"),
    ("wrong token secret", site_with_founder_token, "beta", {"secret": b"x" * 32}, "token proof does not match"),
    ("signed by another key", site_with_founder_token, "beta", {"sign_with": Ed25519PrivateKey.generate()},
     "signature"),
    ("beta requires TPM evidence", lambda: site_with_founder_token(tpm_required_sites=frozenset({"beta"})), "beta",
     {}, "software-only"),
])
def test_bad_founder_joins_are_refused_with_reasons(name, state, site, kwargs, reason):
    key, node = joiner(site=site)
    challenge, request = founder_handshake(node, key, **kwargs)
    verdict = admission.decide(state(), challenge, request, NOW + 1)
    assert not verdict.admit and verdict.founds == ""
    assert reason in verdict.reason, verdict.reason


def test_a_founder_named_by_the_revocation_list_is_refused_by_decide_and_by_the_commit():
    key, node = joiner(site="beta")
    state = site_with_founder_token(revoked=(node["node_id"],))
    verdict = admission.decide(state, *founder_handshake(node, key), NOW + 1)
    assert not verdict.admit and "revoked" in verdict.reason
    result = sitestate.apply(state, {"op": "found_site", "ts": NOW + 1, "token_id": "ftok", "node": node})
    assert not result.ok and "revoked" in result.text and state.tokens["ftok"].used_by is None


def test_the_founded_site_rules_of_the_policy_apply_not_this_sites():
    key, node = joiner(site="beta")
    state = site_with_founder_token(tpm_required_sites=frozenset({"s1"}))
    verdict = admission.decide(state, *founder_handshake(node, key), NOW + 1)
    assert verdict.admit and verdict.founds == "beta", verdict.reason


@pytest.mark.parametrize("keys, reason", [
    (None, "must be"),
    ({"ek": "00"}, "must be"),
    ({"ek": "zz", "ak": "00"}, "must be hex"),
    ({"ek": "0002abcd", "ak": "0002abcd"}, "endorsement key"),
])
def test_unfit_tpm_keys_get_a_reason(keys, reason):
    from attestation.tpm import TpmError
    with pytest.raises(TpmError, match=reason):
        admission.tpm_challenge(keys, bytes(32), bytes(32))
