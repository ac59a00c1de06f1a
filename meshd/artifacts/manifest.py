"""Artifact manifests: what a signed artifact is, and whether one may be used.

A manifest is a signed document (attestation.signed, kind "artifact") whose body says
    {"mesh": mesh id, "digest": "sha256:<hex>", "size": bytes, "name": file name,
     "piece_size": bytes, "pieces": "sha256:<hex>", "pushed_by": who, "pushed_at": unix time,
     "signer": hex Ed25519 public key}
`pieces` is the sha256 of the piece list: the concatenated raw sha256 digests of the
content's consecutive `piece_size` pieces (meshd.artifacts.pieces). The manifest is small
whatever the artifact's size; the piece list travels beside it and is checked against it,
so every piece is verified on arrival, before the whole is.

Invariants:
- Pure: no I/O, no clock.
- `open_manifest` returns a Manifest only when the document is well formed, signed by a key
  in `trusted` (the mesh root, or a release key the root-signed policy names), made for this
  mesh, and (when asked) for the digest the caller wanted; every other outcome is a
  ManifestError whose message is the reason an operator sees.
- A manifest's numbers are bounded (MAX_ARTIFACT_BYTES): it travels in the Raft log and the
  CRDT document, where ints must stay below 2**63.
- The piece size follows from the size alone (`piece_size_for`), so two pushes of the same
  bytes describe the same pieces.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from attestation.signed import AttestationError, open_document, sign_document

MANIFEST_KIND = "artifact"
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
DIGEST_RULE = 'sha256:<64 lowercase hex digits>'
# 64 GiB: larger than any model or image an edge device stores; with MAX_PIECES it keeps a
# piece (which a fetching node holds in memory to verify before writing) at most 16 MiB.
MAX_ARTIFACT_BYTES = 64 << 30
# Pieces of 1 MiB: a piece crosses a thin link in well under a minute, a lost one costs
# little to fetch again, and hashing one takes about a millisecond.
MIN_PIECE_SIZE = 1 << 20
# An artifact has at most this many pieces (the piece size doubles until it fits): the piece
# list stays at most 128 KiB (32 bytes a piece) whatever the artifact's size.
MAX_PIECES = 4096
# File names as a directory listing shows them: no path, nothing a terminal interprets.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
NAME_RULE = "1-128 of A-Z a-z 0-9 . _ + - (not starting with . _ + -)"
MAX_PUSHED_BY_CHARS = 128  # an operator name or node name, as the audit shows it


class ManifestError(ValueError):
    """A manifest refused; the message is the reason an operator sees."""


@dataclass(frozen=True)
class Manifest:
    mesh: str
    digest: str
    size: int
    name: str
    piece_size: int
    pieces: str
    pushed_by: str
    pushed_at: float
    signer: str
    document: Mapping[str, Any]  # the signed document, as it travels

    @property
    def piece_count(self) -> int:
        return piece_count(self.size, self.piece_size)


def piece_size_for(size: int) -> int:
    """The piece size of an artifact of `size` bytes: MIN_PIECE_SIZE, doubled until at most
    MAX_PIECES pieces cover it."""
    piece = MIN_PIECE_SIZE
    while piece * MAX_PIECES < size:
        piece *= 2
    return piece


def piece_count(size: int, piece_size: int) -> int:
    return max(1, -(-size // piece_size)) if size else 0


def public_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def digest_problem(value: object) -> str | None:
    if isinstance(value, str) and DIGEST_RE.fullmatch(value):
        return None
    return f"{str(value)[:80]!r} is not a digest ({DIGEST_RULE})"


def name_problem(value: object) -> str | None:
    if isinstance(value, str) and NAME_RE.fullmatch(value):
        return None
    return f"{str(value)[:80]!r} is not an artifact name ({NAME_RULE})"


def sign_manifest(key: Ed25519PrivateKey, *, mesh: str, digest: str, size: int, name: str, pieces: str,
                  pushed_by: str, pushed_at: float) -> dict:
    """The signed document for these bytes; ManifestError if any field is out of bounds."""
    body = {"mesh": mesh, "digest": digest, "size": size, "name": name, "piece_size": piece_size_for(size),
            "pieces": pieces, "pushed_by": pushed_by[:MAX_PUSHED_BY_CHARS], "pushed_at": float(pushed_at),
            "signer": public_hex(key)}
    _check_body(body)
    return sign_document(key, MANIFEST_KIND, body)


def open_manifest(document: object, *, mesh: str, trusted: Mapping[str, str],
                  digest: str | None = None) -> Manifest:
    """The manifest `document` states, when a key of `trusted` (hex public key -> what it is)
    signed it for this mesh (and for `digest`, when given); else ManifestError."""
    if not isinstance(document, Mapping) or not isinstance(document.get("body"), Mapping):
        raise ManifestError("manifest: not a signed document")
    signer = document["body"].get("signer")
    if not isinstance(signer, str) or signer not in trusted:
        raise ManifestError(f"manifest: signed by {str(signer)[:16]!r}..., a key this mesh does not trust "
                            "(the mesh root or a release key of its policy)")
    try:
        body = open_document(dict(document), MANIFEST_KIND, bytes.fromhex(signer))
    except (AttestationError, ValueError) as e:
        raise ManifestError(f"manifest: {e}") from None
    _check_body(body)
    if body["mesh"] != mesh:
        raise ManifestError(f"manifest: made for another mesh ({str(body['mesh'])[:16]}...)")
    if digest is not None and body["digest"] != digest:
        raise ManifestError(f"manifest: describes {body['digest']}, not {digest}")
    return Manifest(mesh=body["mesh"], digest=body["digest"], size=body["size"], name=body["name"],
                    piece_size=body["piece_size"], pieces=body["pieces"], pushed_by=body["pushed_by"],
                    pushed_at=body["pushed_at"], signer=signer, document=dict(document))


_FIELDS = {"mesh": str, "digest": str, "size": int, "name": str, "piece_size": int, "pieces": str,
           "pushed_by": str, "pushed_at": float, "signer": str}


def _check_body(body: Mapping[str, Any]) -> None:
    if set(body) != set(_FIELDS):
        missing, extra = sorted(set(_FIELDS) - set(body)), sorted(set(body) - set(_FIELDS))
        raise ManifestError(f"manifest: fields differ (missing {missing}, unknown {extra})")
    for key, kind in _FIELDS.items():
        value = body[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ManifestError(f"manifest: {key} must be a {kind.__name__}")
    for key in ("digest", "pieces"):
        problem = digest_problem(body[key])
        if problem:
            raise ManifestError(f"manifest: {key}: {problem}")
    problem = name_problem(body["name"])
    if problem:
        raise ManifestError(f"manifest: name: {problem}")
    if not 0 <= body["size"] <= MAX_ARTIFACT_BYTES:
        raise ManifestError(f"manifest: size {body['size']} is outside 0..{MAX_ARTIFACT_BYTES}")
    if body["piece_size"] != piece_size_for(body["size"]):
        raise ManifestError(f"manifest: piece size {body['piece_size']} is not the one for {body['size']} bytes")
    if not body["mesh"] or len(body["mesh"]) > 128 or len(body["pushed_by"]) > MAX_PUSHED_BY_CHARS:
        raise ManifestError("manifest: mesh or pushed_by out of bounds")
    if not 0 <= body["pushed_at"] < 2**40:
        raise ManifestError("manifest: pushed_at is not a time")


def pieces_digest(piece_list: bytes) -> str:
    return "sha256:" + hashlib.sha256(piece_list).hexdigest()
