"""Signing artifact manifests offline (the I/O around meshd.artifacts.manifest: key files,
the file's bytes, the clock), with a release key, where no daemon runs (a release
pipeline, an operator's laptop): `meshctl artifact keygen` and `meshctl artifact sign`.

The mesh trusts such a manifest once the root-signed policy names the key
(`meshctl policy release-key PUBLIC_KEY` on a voter); `meshctl artifact push FILE
--manifest FILE.manifest.json` then stores the file with it, and every node checks both.

Invariants:
- A key file is written once (never overwritten), 0600, as 64 hex digits of the raw
  Ed25519 private key; its public key is what the policy names.
- A signed manifest describes the bytes read: digest, size and piece list are computed
  from the file as it is signed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.artifacts.manifest import ManifestError, piece_size_for, pieces_digest, public_hex, sign_manifest

CHUNK = 1 << 20  # read a megabyte at a time: a large file never sits in memory


class OfflineError(Exception):
    """The key or file could not be used; the message says why."""


def keygen(path: str) -> dict:
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes_raw().hex()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise OfflineError(f"cannot create {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "w") as f:
        f.write(raw + "\n")
    return {"key_file": path, "public_key": public_hex(key)}


def load_key(path: str) -> Ed25519PrivateKey:
    try:
        text = Path(path).read_text().strip()
        return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(text))
    except OSError as e:
        raise OfflineError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError:
        raise OfflineError(f"{path} is not a release key (64 hex digits, from meshctl artifact keygen)") from None


def sign_file(path: str, key_path: str, mesh: str, name: str | None = None, out: str | None = None) -> dict:
    key = load_key(key_path)
    try:
        size = os.stat(path).st_size
        piece_size, whole, pieces = piece_size_for(size), hashlib.sha256(), []
        with open(path, "rb") as f:
            while piece := f.read(piece_size):
                whole.update(piece)
                pieces.append(hashlib.sha256(piece).digest())
    except OSError as e:
        raise OfflineError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        document = sign_manifest(key, mesh=mesh, digest="sha256:" + whole.hexdigest(), size=size,
                                 name=name or os.path.basename(path), pieces=pieces_digest(b"".join(pieces)),
                                 pushed_by=f"release key {public_hex(key)[:16]}", pushed_at=time.time())
    except ManifestError as e:
        raise OfflineError(str(e)) from None
    target = out or f"{path}.manifest.json"
    try:
        Path(target).write_text(json.dumps(document, indent=1) + "\n")
    except OSError as e:
        raise OfflineError(f"cannot write {target}: {e.strerror or e}") from None
    return {"manifest": target, "digest": document["body"]["digest"], "size": size,
            "signer": document["body"]["signer"]}
