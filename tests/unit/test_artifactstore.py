"""meshd.io.artifactstore: blobs appear only complete and verified; quota and pins hold."""

import hashlib
import os
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.artifacts import pieces as P
from meshd.artifacts.manifest import open_manifest, piece_size_for, pieces_digest, public_hex, sign_manifest
from meshd.io.artifactstore import ArtifactStore, StoreError

KEY = Ed25519PrivateKey.generate()


def manifest_for(data: bytes, piece_list: bytes):
    doc = sign_manifest(KEY, mesh="m", digest="sha256:" + hashlib.sha256(data).hexdigest(), size=len(data),
                        name="f.bin", pieces=pieces_digest(piece_list), pushed_by="t", pushed_at=1.0)
    return open_manifest(doc, mesh="m", trusted={public_hex(KEY): "root"})


def push(store, tmp_path, data: bytes, name="in.bin"):
    path = tmp_path / name
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        got = store.ingest(fd)
    finally:
        os.close(fd)
    store.put_manifest(manifest_for(data, got.piece_list))
    return got


def test_a_pushed_file_is_stored_by_its_digest_read_only(tmp_path):
    store = ArtifactStore(tmp_path / "data")
    data = os.urandom(2 * (1 << 20) + 5)
    got = push(store, tmp_path, data)
    assert got.digest == "sha256:" + hashlib.sha256(data).hexdigest() and got.size == len(data)
    assert got.piece_list == P.piece_list_of(data, piece_size_for(len(data)))
    assert store.holds(got.digest) and store.held() == {got.digest}
    assert store.blob(got.digest).read_bytes() == data
    assert stat.S_IMODE(store.blob(got.digest).stat().st_mode) == 0o444
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o711
    assert not list((store.root / "incoming").iterdir())
    assert store.remove(got.digest) and not store.holds(got.digest) and not store.remove(got.digest)


def test_a_file_larger_than_the_quota_is_refused_before_a_byte_is_written(tmp_path):
    store = ArtifactStore(tmp_path / "data", quota=1000)
    with pytest.raises(StoreError, match="larger than the artifact quota"):
        push(store, tmp_path, b"x" * 2000)
    assert not store.held() and not list((store.root / "incoming").iterdir())


def test_room_is_made_from_unpinned_artifacts_only(tmp_path):
    pins: set[str] = set()
    store = ArtifactStore(tmp_path / "data", quota=3000, pinned=lambda: frozenset(pins))
    a = push(store, tmp_path, b"a" * 1000, "a")
    pins.add(a.digest)
    b = push(store, tmp_path, b"b" * 1000, "b")
    c = push(store, tmp_path, b"c" * 1500, "c")  # b goes, a is pinned
    assert store.held() == {a.digest, c.digest} and b.digest
    with pytest.raises(StoreError, match="pinned by kept app versions"):
        push(store, tmp_path, b"d" * 2500, "d")
    assert a.digest in store.held()


def test_a_fetch_writes_verified_pieces_resumes_and_checks_the_whole(tmp_path):
    data = os.urandom(3 * (1 << 20) + 7)
    piece_list = P.piece_list_of(data, 1 << 20)
    manifest = manifest_for(data, piece_list)
    digests = P.piece_digests(piece_list, manifest)
    store = ArtifactStore(tmp_path / "data")
    assert store.begin_fetch(manifest, piece_list, digests) == set()
    store.write_piece(manifest.digest, 1 << 20, data[1 << 20:2 << 20])
    assert not store.holds(manifest.digest)
    # a restart: the partial file still has piece 1, and only that verifies
    store = ArtifactStore(tmp_path / "data")
    assert store.begin_fetch(manifest, piece_list, digests) == {1}
    assert store.read_piece(manifest.digest, 1 << 20, 10) == data[1 << 20:(1 << 20) + 10]
    for i in (0, 2, 3):
        store.write_piece(manifest.digest, i << 20, data[i << 20:(i + 1) << 20])
    store.finish_fetch(manifest)
    assert store.holds(manifest.digest) and store.blob(manifest.digest).read_bytes() == data
    assert store.piece_list(manifest.digest) == piece_list
    assert store.manifest_document(manifest.digest)["body"]["digest"] == manifest.digest


def test_a_fetch_whose_bytes_do_not_match_never_becomes_a_blob(tmp_path):
    data = b"z" * 100
    piece_list = P.piece_list_of(data, 1 << 20)
    manifest = manifest_for(data, piece_list)
    store = ArtifactStore(tmp_path / "data")
    store.begin_fetch(manifest, piece_list, P.piece_digests(piece_list, manifest))
    store.write_piece(manifest.digest, 0, b"y" * 100)
    with pytest.raises(StoreError, match="do not match"):
        store.finish_fetch(manifest)
    assert not store.holds(manifest.digest) and not list((store.root / "partial").iterdir())


def _settle(store):
    """The blobs directory as if last changed a while ago (past any timestamp granularity)."""
    past = os.stat(store.root / "blobs").st_mtime - 10
    os.utime(store.root / "blobs", (past, past))


def test_the_listing_of_held_artifacts_is_reused_until_the_store_changes(tmp_path):
    store = ArtifactStore(tmp_path / "data")
    a = push(store, tmp_path, b"a" * 1000, "a.bin")
    assert store.held_unchanged() is None  # never listed
    assert store.held() == {a.digest}
    assert store.held_unchanged() is None  # the directory changed just now: not trusted yet
    _settle(store)
    assert store.held() == {a.digest} and store.held_unchanged() == {a.digest}
    b = push(store, tmp_path, b"b" * 1000, "b.bin")
    assert store.held_unchanged() is None  # a new blob: listed again
    _settle(store)
    assert store.held() == {a.digest, b.digest} == store.held_unchanged()
    store.remove(a.digest)
    assert store.held_unchanged() is None and store.held() == {b.digest}
