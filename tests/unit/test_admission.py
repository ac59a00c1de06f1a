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

from meshd import admission, sitestate, tokens
from meshd.state import SiteState

NOW = 1_700_000_000.0
SECRET = bytes(range(32))


def raw(pub) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def site_with_token(expires: float = NOW + 60) -> SiteState:
    state = SiteState()
    founder = {"node_id": "f" * 32, "name": "founder", "site": "s1", "address": "198.18.0.1:7700",
               "raft_address": "198.18.0.1:7701", "public_key": "00" * 32, "arch": "x86_64", "labels": {}}
    assert sitestate.apply(state, {"op": "bootstrap", "ts": NOW - 10, "site": "s1", "mesh_id": "m", "node": founder})["ok"]
    assert sitestate.apply(state, {"op": "create_token", "ts": NOW - 5, "token_id": "tok", "site": "s1",
                                   "secret": SECRET.hex(), "expires_at": expires})["ok"]
    return state


def joiner(key: Ed25519PrivateKey | None = None, **overrides):
    key = key or Ed25519PrivateKey.generate()
    pub = raw(key.public_key())
    node = {"node_id": tokens.node_id_for(pub), "name": "edge-2", "site": "s1", "address": "198.18.0.2:7700",
            "raft_address": "198.18.0.2:7701", "public_key": pub.hex(), "arch": "aarch64", "labels": {}}
    node.update(overrides)
    return key, node


def handshake(node, key, *, secret=SECRET, token_id="tok", challenge=None, sign_with=None):
    challenge = challenge or admission.Challenge(nonce=os.urandom(32), member_eph=raw(X25519PrivateKey.generate().public_key()),
                                                 issued_at=NOW)
    eph = raw(X25519PrivateKey.generate().public_key())
    transcript = tokens.join_transcript(challenge.nonce, eph, challenge.member_eph, token_id, node)
    request = admission.JoinRequest(token_id=token_id, node=node, joiner_eph=eph,
                                    proof=tokens.token_proof(secret, transcript),
                                    signature=tokens.sign(sign_with or key, transcript))
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
