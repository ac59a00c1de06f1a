"""Signed documents: the one envelope for evidence, policy bundles and revocation lists.

A document is `{"kind": K, "body": {...}, "sig": hex}`; the signature is Ed25519 over
"meshd-<K>-v1\\0" + canonical JSON of the body (sorted keys, no spaces). The kind is part of
what is signed, so a signature made for one kind of document never verifies as another.

Invariants:
- Pure: no I/O, no clock.
- `open_document` returns the body only when the kind and the signature check out; every
  failure is an `AttestationError` whose message says why.
- Documents are bounded: MAX_DOCUMENT_BYTES of canonical JSON.
"""

from __future__ import annotations

import json
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

# A policy with a few hundred allowed digests, or a revocation list of a few thousand nodes,
# fits easily; anything bigger is not something we made.
MAX_DOCUMENT_BYTES = 256 * 1024
ED25519_SIGNATURE_HEX = 128


class AttestationError(ValueError):
    """A document or claim was refused; the message is the reason an operator sees."""


def canonical(body: Any) -> bytes:
    try:
        return json.dumps(body, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise AttestationError(f"not a canonical JSON document ({e})") from None


def signed_bytes(kind: str, body: Any) -> bytes:
    return f"meshd-{kind}-v1\0".encode() + canonical(body)


def sign_document(private_key: Ed25519PrivateKey, kind: str, body: dict) -> dict:
    return {"kind": kind, "body": body, "sig": private_key.sign(signed_bytes(kind, body)).hex()}


def open_document(document: Any, kind: str, public_key: bytes) -> dict:
    """The body of a document of this kind signed by this key, or AttestationError."""
    if not isinstance(document, dict) or set(document) != {"kind", "body", "sig"}:
        raise AttestationError(f"{kind}: not a signed document (need exactly kind, body, sig)")
    if document["kind"] != kind:
        raise AttestationError(f"{kind}: document is a {str(document['kind'])[:40]!r}, not a {kind!r}")
    body, sig = document["body"], document["sig"]
    if not isinstance(body, dict):
        raise AttestationError(f"{kind}: body must be a mapping")
    data = signed_bytes(kind, body)
    if len(data) > MAX_DOCUMENT_BYTES:
        raise AttestationError(f"{kind}: document is larger than {MAX_DOCUMENT_BYTES} bytes")
    if not isinstance(sig, str) or len(sig) != ED25519_SIGNATURE_HEX:
        raise AttestationError(f"{kind}: signature is not an Ed25519 signature")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(bytes.fromhex(sig), data)
    except (InvalidSignature, ValueError):
        raise AttestationError(f"{kind}: signature does not verify (forged or tampered)") from None
    return body
