"""meshd.artifacts.manifest: signed manifests, accepted only from trusted keys for this mesh."""

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.artifacts.manifest import (MIN_PIECE_SIZE, MAX_PIECES, ManifestError, open_manifest, piece_count,
                                      piece_size_for, pieces_digest, public_hex, sign_manifest)

ROOT = Ed25519PrivateKey.generate()
TRUSTED = {public_hex(ROOT): "mesh root"}
DIGEST = "sha256:" + hashlib.sha256(b"model").hexdigest()
PIECES = pieces_digest(hashlib.sha256(b"model").digest())


def signed(key=ROOT, **changes):
    fields = dict(mesh="m1", digest=DIGEST, size=5, name="model.onnx", pieces=PIECES, pushed_by="alice",
                  pushed_at=1000.0)
    fields.update(changes)
    return sign_manifest(key, **fields)


def test_a_manifest_signed_by_the_root_opens():
    m = open_manifest(signed(), mesh="m1", trusted=TRUSTED, digest=DIGEST)
    assert (m.digest, m.size, m.name, m.pushed_by, m.piece_count) == (DIGEST, 5, "model.onnx", "alice", 1)
    assert m.document == signed() or m.document["body"] == signed()["body"]


def test_refusals_say_why():
    other = Ed25519PrivateKey.generate()
    with pytest.raises(ManifestError, match="does not trust"):
        open_manifest(signed(other), mesh="m1", trusted=TRUSTED)
    with pytest.raises(ManifestError, match="another mesh"):
        open_manifest(signed(), mesh="m2", trusted=TRUSTED)
    with pytest.raises(ManifestError, match="not sha256:"):
        open_manifest(signed(), mesh="m1", trusted=TRUSTED, digest="sha256:" + "0" * 64)
    forged = signed()
    forged["body"] = dict(forged["body"], size=6, piece_size=piece_size_for(6))
    with pytest.raises(ManifestError, match="forged or tampered"):
        open_manifest(forged, mesh="m1", trusted=TRUSTED)
    # the signer field is trusted, but someone else signed: the signature says so
    stolen = signed(other)
    stolen["body"] = dict(stolen["body"], signer=public_hex(ROOT))
    with pytest.raises(ManifestError, match="forged or tampered"):
        open_manifest(stolen, mesh="m1", trusted=TRUSTED)
    for junk in (None, [], {"body": 3}, {"kind": "artifact", "body": {}, "sig": ""}):
        with pytest.raises(ManifestError):
            open_manifest(junk, mesh="m1", trusted=TRUSTED)


@pytest.mark.parametrize("changes, reason", [
    ({"digest": "md5:abc"}, "digest"),
    ({"name": "../etc/passwd"}, "name"),
    ({"name": ""}, "name"),
    ({"size": -1}, "size"),
    ({"size": 2**37}, "size"),
    ({"pushed_at": -5.0}, "pushed_at"),
])
def test_out_of_bounds_fields_are_refused_when_signing(changes, reason):
    with pytest.raises(ManifestError, match=reason):
        signed(**changes)


def test_piece_sizes_keep_the_piece_list_small():
    assert piece_size_for(0) == MIN_PIECE_SIZE and piece_count(0, MIN_PIECE_SIZE) == 0
    assert piece_count(1, MIN_PIECE_SIZE) == 1
    assert piece_count(100 * 10**6, piece_size_for(100 * 10**6)) == 96
    for size in (MIN_PIECE_SIZE * MAX_PIECES, MIN_PIECE_SIZE * MAX_PIECES + 1, 64 << 30):
        piece = piece_size_for(size)
        assert piece_count(size, piece) <= MAX_PIECES
        assert piece == MIN_PIECE_SIZE or piece_count(size, piece // 2) > MAX_PIECES
