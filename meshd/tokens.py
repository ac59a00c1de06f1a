"""Join tokens and the cryptography of the join handshake (pure: randomness is passed in).

A token is `mtk1_` + base64url(JSON {"s": site, "i": token_id, "k": secret}). The secret never
crosses the network: the joiner proves it holds it with an HMAC over the handshake
transcript, and the member's answer (which carries the site's Raft secret) is sealed with a
key derived from both an X25519 exchange and the token secret, so neither an eavesdropper
nor a peer without the token can read it.

Invariants:
- Every check returns a reason (or raises TokenError with one); nothing here does I/O.
- Transcripts are canonical (sorted-key compact JSON), so both sides hash the same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

TOKEN_PREFIX = "mtk1_"
# 16 bytes of token id are enough to never collide; 32 bytes of secret resist guessing.
TOKEN_ID_BYTES = 8
TOKEN_SECRET_BYTES = 32
# A token string longer than this is not one of ours (keeps junk out of the decoder).
MAX_TOKEN_LEN = 512
# Default and bounds of a token's lifetime: long enough to walk to the device, short
# enough that a leaked token soon stops working.
DEFAULT_TOKEN_TTL = 3600
MAX_TOKEN_TTL = 30 * 86_400


class TokenError(ValueError):
    pass


@dataclass(frozen=True)
class ParsedToken:
    site: str
    token_id: str
    secret: bytes


def node_id_for(public_key: bytes) -> str:
    """A node's id: the first 16 bytes of SHA-256 of its raw Ed25519 public key, in hex."""
    return hashlib.sha256(public_key).hexdigest()[:32]


def format_token(site: str, token_id: str, secret: bytes) -> str:
    body = json.dumps({"s": site, "i": token_id, "k": secret.hex()}, separators=(",", ":"), sort_keys=True)
    return TOKEN_PREFIX + base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def parse_token(text: str) -> ParsedToken:
    if not isinstance(text, str) or len(text) > MAX_TOKEN_LEN or not text.startswith(TOKEN_PREFIX):
        raise TokenError("not a meshd join token (expected mtk1_...)")
    raw = text[len(TOKEN_PREFIX):]
    try:
        body = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        site, token_id, secret = body["s"], body["i"], bytes.fromhex(body["k"])
    except (ValueError, KeyError, TypeError) as e:
        raise TokenError(f"join token is damaged ({type(e).__name__})") from None
    if not (isinstance(site, str) and site and isinstance(token_id, str) and token_id
            and len(secret) == TOKEN_SECRET_BYTES):
        raise TokenError("join token is damaged (bad fields)")
    return ParsedToken(site=site, token_id=token_id, secret=secret)


def canonical(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def join_transcript(nonce: bytes, joiner_eph: bytes, member_eph: bytes, token_id: str, node: dict) -> bytes:
    """What both sides hash: binds the nonce, both ephemeral keys, the token and the node."""
    return hashlib.sha256(b"meshd-join-v1\0" + canonical({
        "nonce": nonce.hex(), "joiner_eph": joiner_eph.hex(), "member_eph": member_eph.hex(),
        "token_id": token_id, "node": node,
    })).digest()


def token_proof(secret: bytes, transcript: bytes) -> str:
    return hmac.new(secret, b"proof\0" + transcript, hashlib.sha256).hexdigest()


def proof_matches(secret: bytes, transcript: bytes, proof: object) -> bool:
    return isinstance(proof, str) and hmac.compare_digest(token_proof(secret, transcript), proof)


def sign(private_key: Ed25519PrivateKey, transcript: bytes) -> str:
    return private_key.sign(transcript).hex()


def signature_matches(public_key: bytes, transcript: bytes, signature: object) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(bytes.fromhex(signature), transcript)  # type: ignore[arg-type]
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


def session_key(own_eph: X25519PrivateKey, peer_eph: bytes, token_secret: bytes, transcript: bytes) -> bytes:
    """AES-256 key for the welcome message: needs both the ECDH secret and the token secret."""
    shared = own_eph.exchange(X25519PublicKey.from_public_bytes(peer_eph))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=transcript, info=b"meshd-join-welcome-v1").derive(
        shared + token_secret)


def seal(key: bytes, nonce12: bytes, payload: dict) -> str:
    return (nonce12 + AESGCM(key).encrypt(nonce12, canonical(payload), b"meshd-welcome")).hex()


def unseal(key: bytes, sealed: str) -> dict:
    try:
        raw = bytes.fromhex(sealed)
        return json.loads(AESGCM(key).decrypt(raw[:12], raw[12:], b"meshd-welcome"))
    except (InvalidTag, ValueError, TypeError):
        raise TokenError("welcome message does not decrypt: the member does not know this token") from None
