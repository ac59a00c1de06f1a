"""This node's artifact store: content-addressed files in the data dir.

Layout, under `<data dir>/artifacts/`:
    blobs/<hex>              the artifact's bytes (0444), complete and verified
    blobs/<hex>.manifest     its signed manifest (JSON)
    blobs/<hex>.pieces       its piece list (raw sha256 digests)
    partial/<hex>            an artifact being fetched, its size from the start
    unpacked/<hex>/          an archive artifact unpacked (read-only tree)
    incoming/                files being pushed, before their digest is known
Directories are 0711: a workload reaches an artifact by the path it is given, but cannot
list what else the node holds.

Invariants:
- A blob exists only complete: bytes reach `blobs/` by a rename, after the whole file's
  sha256 and size were checked against the manifest (a fetched one), or computed (a pushed
  one). Nothing in `partial/` or `incoming/` is ever given to a workload.
- A size is checked before any byte is hashed or written: a push or fetch that cannot fit in
  the quota without dropping a pinned artifact is refused (retention.make_room) first.
- A piece is written to a partial file only after PieceFetch accepted it; a partial file
  found at start is re-hashed piece by piece, so a fetch resumes with what verifies.
- An unpacked tree appears whole or not at all (meshd.artifacts.unpack), read-only.
- Reads and writes are synchronous: the trio shell runs the long ones in a thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from meshd.artifacts import retention
from meshd.artifacts.manifest import Manifest, piece_size_for
from meshd.artifacts.unpack import UnpackError, unpack
from meshd.io.identity import fsync_dir, write_atomic

DIR_MODE = 0o711
# Files are copied and hashed in chunks of this size: large enough that a 100 MB file is a
# hundred system calls' worth of overhead, small enough to bound memory on a small device.
CHUNK = 1 << 20
# The default quota: a few models or program bundles on a device with a small card.
DEFAULT_QUOTA_BYTES = 10 * 1024**3


class StoreError(Exception):
    """A push, fetch or removal refused; the message is the reason an operator sees."""


class ArtifactWait(Exception):
    """A workload cannot have its artifact now; the message says why (it does not start)."""


@dataclass(frozen=True)
class Ingested:
    digest: str
    size: int
    piece_list: bytes


def _hex(digest: str) -> str:
    return digest.removeprefix("sha256:")


# A listing is remembered once the directory's last change is this much older than it: well
# past any filesystem's timestamp granularity (a jiffy, up to 10 ms; FAT's 2 s is not a data dir).
HELD_MARK_SETTLE = 1.0


def _mark(directory: Path) -> tuple[int, int, int] | None:
    """What changes when an entry of `directory` is added, renamed or removed."""
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


class ArtifactStore:
    def __init__(self, data_dir: Path, quota: int = DEFAULT_QUOTA_BYTES,
                 pinned: Callable[[], frozenset[str]] = frozenset) -> None:
        """`pinned()`: the digests that must stay (kept app versions, running workloads)."""
        self.root = Path(data_dir) / "artifacts"
        self.quota = quota
        self.pinned = pinned
        for sub in ("", "blobs", "partial", "unpacked", "incoming"):
            (self.root / sub).mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            os.chmod(self.root / sub, DIR_MODE)
        for leftover in (self.root / "incoming").iterdir():
            _remove(leftover)
        self._used: dict[str, float] = {}
        self._held: tuple[tuple[int, int, int], frozenset[str]] | None = None  # (mark, listing): held_unchanged

    # --- what is held --------------------------------------------------------------------

    def holds(self, digest: str) -> bool:
        return self.blob(digest).is_file() and self._manifest_path(digest).is_file()

    def held(self) -> frozenset[str]:
        """The artifacts held whole (blob and manifest), from a listing of the store."""
        blobs = self.root / "blobs"
        mark = _mark(blobs)
        listing = frozenset("sha256:" + p.name for p in blobs.iterdir()
                            if "." not in p.name and (p.parent / f"{p.name}.manifest").is_file())
        # Kept only for a listing the directory's time of change surely covers: that time has
        # the filesystem's coarse granularity, and a change within the same tick as the listing
        # would not move it.
        self._held = (mark, listing) if mark is not None and time.time() - mark[0] / 1e9 > HELD_MARK_SETTLE else None
        return listing

    def held_unchanged(self) -> frozenset[str] | None:
        """`held()` as the last listing found it, if the store has not changed since (one stat,
        cheap on the trio thread), else None: list it again."""
        if self._held is not None and _mark(self.root / "blobs") == self._held[0]:
            return self._held[1]
        return None

    def blob(self, digest: str) -> Path:
        return self.root / "blobs" / _hex(digest)

    def manifest_document(self, digest: str) -> dict | None:
        try:
            return json.loads(self._manifest_path(digest).read_text())
        except (OSError, ValueError):
            return None

    def piece_list(self, digest: str) -> bytes | None:
        try:
            return (self.root / "blobs" / f"{_hex(digest)}.pieces").read_bytes()
        except OSError:
            return None

    def sizes(self) -> dict[str, retention.Held]:
        """What each held or partial artifact takes on disk, and when it was last used."""
        out: dict[str, retention.Held] = {}
        for path in (self.root / "blobs").iterdir():
            if "." not in path.name:
                digest = "sha256:" + path.name
                size = _size(path) + _size(self.root / "unpacked" / path.name)
                out[digest] = retention.Held(size, self._used.get(digest, path.stat().st_mtime))
        for path in (self.root / "partial").iterdir():
            if path.name.startswith("."):
                continue
            digest = "sha256:" + path.name
            out[digest] = retention.Held(_size(path), self._used.get(digest, path.stat().st_mtime))
        return out

    def used_bytes(self) -> int:
        return sum(h.size for h in self.sizes().values())

    def touch(self, digest: str) -> None:
        self._used[digest] = time.time()

    # --- room ----------------------------------------------------------------------------

    def make_room(self, need: int, keep: Iterable[str] = ()) -> None:
        """Drop unpinned artifacts (least recently used first) until `need` bytes fit; else
        StoreError, and nothing was dropped."""
        outcome = retention.make_room(self.sizes(), self.pinned() | frozenset(keep), self.quota, need)
        if isinstance(outcome, retention.NoRoom):
            raise StoreError(outcome.reason)
        for digest in outcome.remove:
            self.remove(digest)

    # --- pushing a file ------------------------------------------------------------------

    def ingest(self, fd: int, progress: Callable[[int, int], None] = lambda done, total: None) -> Ingested:
        """Copy the open file `fd` (from its start) into the store, hashing it as it goes; the
        manifest comes after (`put_manifest`). Its size is checked against the quota first."""
        try:
            size = os.fstat(fd).st_size
        except OSError as e:
            raise StoreError(f"cannot read the file: {e.strerror}") from None
        self.make_room(size)
        piece_size = piece_size_for(size)
        whole, pieces = hashlib.sha256(), []
        tmp = self.root / "incoming" / f"{os.getpid()}-{time.monotonic_ns()}"
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        done, piece, piece_fill = 0, hashlib.sha256(), 0
        try:
            while True:
                data = os.pread(fd, CHUNK, done)
                if not data:
                    break
                if done + len(data) > size:
                    raise StoreError("the file grew while it was read; push it again once it is written")
                view = memoryview(data)
                while view:
                    take = min(len(view), piece_size - piece_fill)
                    piece.update(view[:take])
                    piece_fill += take
                    view = view[take:]
                    if piece_fill == piece_size:
                        pieces.append(piece.digest())
                        piece, piece_fill = hashlib.sha256(), 0
                whole.update(data)
                _write_all(out, data)
                done += len(data)
                progress(done, size)
            if done != size:
                raise StoreError(f"the file shrank while it was read ({done} of {size} bytes)")
            if piece_fill:
                pieces.append(piece.digest())
            os.fsync(out)
        except OSError as e:
            os.close(out)
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot store the file: {e.strerror or e}") from None
        except BaseException:
            os.close(out)
            tmp.unlink(missing_ok=True)
            raise
        os.close(out)
        digest = "sha256:" + whole.hexdigest()
        piece_list = b"".join(pieces)
        if self.holds(digest):
            tmp.unlink()
        else:
            write_atomic(self.root / "blobs" / f"{_hex(digest)}.pieces", piece_list, 0o444)
            os.replace(tmp, self.blob(digest))
            fsync_dir(self.blob(digest).parent)
        self.touch(digest)
        return Ingested(digest, size, piece_list)

    def put_manifest(self, manifest: Manifest) -> None:
        """Record the manifest of a blob this store holds (pushed, or fetched and verified)."""
        write_atomic(self._manifest_path(manifest.digest), json.dumps(manifest.document).encode(), 0o444)

    # --- fetching in pieces --------------------------------------------------------------

    def begin_fetch(self, manifest: Manifest, piece_list: bytes, digests: tuple[bytes, ...]) -> set[int]:
        """Make room and a partial file for `manifest`'s artifact; the pieces already in a
        partial file from before that still verify (a resumed fetch)."""
        partial = self._partial(manifest.digest)
        have: set[int] = set()
        if partial.exists() and partial.stat().st_size == manifest.size:
            with open(partial, "rb") as f:
                for index, expected in enumerate(digests):
                    data = f.read(manifest.piece_size)
                    if hashlib.sha256(data).digest() == expected:
                        have.add(index)
        else:
            partial.unlink(missing_ok=True)
            self.make_room(manifest.size, keep=(manifest.digest,))
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, manifest.size)
            finally:
                os.close(fd)
        write_atomic(self.root / "partial" / f".{_hex(manifest.digest)}.pieces", piece_list, 0o600)
        return have

    def write_piece(self, digest: str, offset: int, data: bytes) -> None:
        fd = os.open(self._partial(digest), os.O_WRONLY)
        try:
            view = memoryview(data)
            while view:
                view = view[os.pwrite(fd, view, offset + len(data) - len(view)):]
        finally:
            os.close(fd)

    def read_piece(self, digest: str, offset: int, length: int) -> bytes:
        """Bytes of a held artifact, or of a partial one (the caller serves only verified
        pieces of it)."""
        path = self.blob(digest) if self.holds(digest) else self._partial(digest)
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def finish_fetch(self, manifest: Manifest) -> None:
        """The whole partial file is checked (size, sha256) and becomes the blob; StoreError
        (and the partial file is gone) when it does not match."""
        partial = self._partial(manifest.digest)
        whole = hashlib.sha256()
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
            while data := f.read(CHUNK):
                whole.update(data)
        if partial.stat().st_size != manifest.size or "sha256:" + whole.hexdigest() != manifest.digest:
            self.abandon(manifest.digest)
            raise StoreError(f"the fetched bytes of {manifest.digest} do not match it")
        pieces = self.root / "partial" / f".{_hex(manifest.digest)}.pieces"
        os.chmod(pieces, 0o444)
        os.replace(pieces, self.root / "blobs" / f"{_hex(manifest.digest)}.pieces")
        os.chmod(partial, 0o444)
        os.replace(partial, self.blob(manifest.digest))
        self.put_manifest(manifest)
        fsync_dir(self.blob(manifest.digest).parent)
        self.touch(manifest.digest)

    def abandon(self, digest: str) -> None:
        self._partial(digest).unlink(missing_ok=True)
        (self.root / "partial" / f".{_hex(digest)}.pieces").unlink(missing_ok=True)

    def partial_pieces(self, digest: str) -> bytes | None:
        try:
            return (self.root / "partial" / f".{_hex(digest)}.pieces").read_bytes()
        except OSError:
            return None

    # --- use -----------------------------------------------------------------------------

    def unpacked(self, digest: str, max_bytes: int | None = None) -> Path:
        """The archive artifact's unpacked tree, made on first use; StoreError when it is
        not an archive meshd unpacks safely, or does not fit."""
        target = self.root / "unpacked" / _hex(digest)
        if target.is_dir():
            return target
        room = self.quota - self.used_bytes() if max_bytes is None else max_bytes
        try:
            unpack(self.blob(digest), target, max_bytes=max(0, room))
        except UnpackError as e:
            raise StoreError(f"cannot unpack {digest[:19]}: {e}") from None
        return target

    def remove(self, digest: str) -> bool:
        """Drop everything this store has of `digest`; whether there was anything."""
        name = _hex(digest)
        paths = [self.blob(digest), self.root / "blobs" / f"{name}.manifest", self.root / "blobs" / f"{name}.pieces",
                 self._partial(digest), self.root / "partial" / f".{name}.pieces", self.root / "unpacked" / name]
        found = any(p.exists() or p.is_symlink() for p in paths)
        for path in paths:
            _remove(path)
        self._used.pop(digest, None)
        return found

    def _manifest_path(self, digest: str) -> Path:
        return self.root / "blobs" / f"{_hex(digest)}.manifest"

    def _partial(self, digest: str) -> Path:
        return self.root / "partial" / _hex(digest)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _size(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    if not path.is_dir():
        return 0
    total = 0
    for base, _dirs, files in os.walk(path):
        total += sum(os.lstat(os.path.join(base, f)).st_size for f in files)
    return total


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        for base, dirs, _files in os.walk(path):  # read-only trees: writable again to remove
            for d in dirs:
                os.chmod(os.path.join(base, d), 0o700)
        os.chmod(path, 0o700)
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)

