"""Raft snapshots written off the Raft thread.

pysyncobj's own dump pickles and gzips (level 9) the whole replicated object on the Raft
thread when it is not allowed to fork (a trio process must not): 1-2 s at 100,000
allocations, during which the node answers no heartbeat and its site may hold an election.
This store plugs into pysyncobj's custom-serializer hooks instead:

- `write(tmp, meta)` runs on the Raft thread when pysyncobj compacts its log. It takes a
  copy of the state (cheap: its records are frozen and shared) and hands it to a writer
  thread. pysyncobj renames `tmp` over the snapshot as soon as `write` returns, so `tmp` is
  made a hard link to the snapshot in force (before the first one: a marker that `read`
  refuses): the file pysyncobj knows is never a half-written one.
- The writer thread pickles the copy in slices of SLICE_ALLOCS allocations (other threads
  run between slices), compresses it (zlib lets go of the GIL), fsyncs and renames it over
  the snapshot.
- `check()` says SERIALIZING until then; SUCCESS once it is in place (only then does
  pysyncobj drop the journal entries the snapshot covers); FAILED if the writer failed.
- `read(path)` loads this format, or pysyncobj's own (gzip pickle) left by an older meshd.

Invariants:
- At every moment the snapshot file is a complete snapshot, or the marker while no snapshot
  was ever completed; the journal always holds every entry after the snapshot's last one
  (entries are dropped only after SUCCESS). A crash at any point restarts from both.
- One write at a time: pysyncobj starts no new one while `check()` says SERIALIZING.
- A snapshot holds the whole replicated state, the request-dedupe records included.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import pickle
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pysyncobj.config import SERIALIZER_STATE

from meshd.state import AllocTable, SiteState

log = logging.getLogger("meshd.raft")

MAGIC = b"MESHD-SNAPSHOT-1\n"
# Written where no snapshot was ever completed (see `write`): not a snapshot.
MARKER = b"MESHD-NO-SNAPSHOT-YET\n"
# Allocations pickled per slice: about 5 ms of work, so the writer thread holds the GIL
# for no longer than that at a time and the Raft and trio threads keep their pace.
SLICE_ALLOCS = 2_000
# Compressed bytes inflated at a time when a snapshot is read: small enough that reading its
# header inflates little more than the header, large enough to cost few calls.
INFLATE_CHUNK = 256 * 1024
# zlib level 1: 4.7x faster than pysyncobj's gzip 9 for 10 % more bytes (measured).
COMPRESSION_LEVEL = 1


class SnapshotError(ValueError):
    """The file is not a snapshot this store can load; the reason says why."""


class SnapshotStore:
    """pysyncobj's serializer, deserializer and serializeChecker for one SiteRaft.

    `state` returns the live state (the Raft thread's, read only on that thread) and
    `install(finish)` replaces it with the state `finish()` loads; both are bound by the
    SiteRaft.
    """

    def __init__(self) -> None:
        self.state: Callable[[], SiteState] | None = None
        self.install: Callable[[Callable[[], SiteState]], None] | None = None
        self._writer: threading.Thread | None = None
        self._outcome: int | None = None  # SUCCESS or FAILED of the last writer, until reported
        self.last_write_s: float | None = None  # how long the last writer took (for logs and tests)
        # ((inode, size, mtime), state, metadata) of the snapshot file checked whole at start
        # (meshd.io.raftdata): the first `read` of that very file takes it instead of loading.
        self.checked: tuple | None = None

    # --- pysyncobj hooks ------------------------------------------------------------------
    def write(self, tmp: str, meta: tuple) -> None:
        """Raft thread: start writing a snapshot of the state as it is now (see module doc)."""
        assert self.state is not None
        final = tmp[: -len(".tmp")] if tmp.endswith(".tmp") else tmp
        copy = self.state().snapshot_copy()
        _remove(tmp)
        if os.path.exists(final):
            os.link(final, tmp)
        else:
            Path(tmp).write_bytes(MARKER)
        self._outcome = None
        self._writer = threading.Thread(target=self._write, args=(final, meta, copy), name="meshd-snapshot",
                                        daemon=True)
        self._writer.start()

    def check(self) -> int:
        """Raft thread: where the last write stands, SUCCESS/FAILED reported once."""
        if self._writer is None:
            return SERIALIZER_STATE.NOT_SERIALIZING
        if self._writer.is_alive():
            return SERIALIZER_STATE.SERIALIZING
        self._writer = None
        outcome, self._outcome = self._outcome, None
        return SERIALIZER_STATE.SUCCESS if outcome == SERIALIZER_STATE.SUCCESS else SERIALIZER_STATE.FAILED

    def read(self, path: str) -> tuple:
        """Raft thread: open the snapshot at `path` and hand its loading to `install` (which
        may finish it on another thread: meshd.io.raft.SiteRaft._install); pysyncobj's
        metadata back."""
        assert self.install is not None
        checked, self.checked = self.checked, None
        if checked is not None:
            stat = os.stat(path)
            key, state, meta = checked
            if key == (stat.st_ino, stat.st_size, stat.st_mtime_ns):  # the very file checked at start
                self.install(lambda: state)
                return meta
        opened = open_snapshot(Path(path).read_bytes())
        self.install(opened.finish)
        return opened.meta

    # --- the writer thread ------------------------------------------------------------------
    def _write(self, final: str, meta: tuple, state: SiteState) -> None:
        started = time.monotonic()
        part = final + ".part"
        try:
            with open(part, "wb") as out:
                for chunk in dump_chunks(state, meta):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(part, final)
            _fsync_dir(os.path.dirname(final) or ".")
            self._outcome = SERIALIZER_STATE.SUCCESS
            self.last_write_s = time.monotonic() - started
            log.info("raft snapshot written", extra={"allocs": len(state.allocs), "seconds": round(self.last_write_s, 3),
                                                     "bytes": os.path.getsize(final)})
        except Exception as e:  # reported as FAILED; pysyncobj keeps its journal and tries again later
            self._outcome = SERIALIZER_STATE.FAILED
            log.warning("raft snapshot failed", extra={"reason": str(e) or type(e).__name__})
            _remove(part)


def dump_chunks(state: SiteState, meta: tuple):
    """The snapshot file's bytes, in pieces: MAGIC, then one zlib stream of pickles (the
    metadata and the state without its allocations, then the allocations in slices)."""
    yield MAGIC
    packer = zlib.compressobj(COMPRESSION_LEVEL)
    allocs = list(state.allocs.values())
    head = dict(state.__dict__)
    head["allocs"] = None
    yield packer.compress(pickle.dumps((meta, head, len(allocs)), protocol=pickle.HIGHEST_PROTOCOL))
    for at in range(0, len(allocs), SLICE_ALLOCS):
        yield packer.compress(pickle.dumps(allocs[at:at + SLICE_ALLOCS], protocol=pickle.HIGHEST_PROTOCOL))
    yield packer.flush()


@dataclass(frozen=True)
class Opened:
    """A snapshot whose header is read: pysyncobj's metadata now, the state by `finish()`
    (the costly part: unpickling and indexing every allocation, about a second for 100,000;
    SnapshotError if the rest of the file is damaged)."""
    meta: tuple
    finish: Callable[[], SiteState]


def open_snapshot(data: bytes) -> Opened:
    """Check a snapshot file's bytes and read its metadata (a few ms, whatever its size);
    SnapshotError if it is none."""
    if data.startswith(MARKER):
        raise SnapshotError("no snapshot was completed yet (the journal holds every entry)")
    if data.startswith(b"\x1f\x8b"):  # pysyncobj's own dump, written by an older meshd
        saved = pickle.loads(gzip.decompress(data))
        fields = saved[0][0] if isinstance(saved[0], list) else saved[0]
        state = fields.get("site_state")
        if not isinstance(state, SiteState):
            raise SnapshotError("an old-format snapshot without a site state")
        return Opened(tuple(saved[1:]), lambda: state)
    if not data.startswith(MAGIC):
        raise SnapshotError("not a meshd snapshot (unknown header)")
    reader = _Reader(data, len(MAGIC))
    meta, head, count = reader.next()

    def finish() -> SiteState:
        slices: list = []
        while sum(map(len, slices)) < count:
            slices.append(reader.next())
        reader.end()
        allocs = AllocTable.of(alloc for part in slices for alloc in part)
        state = SiteState()
        state.__setstate__({**head, "allocs": allocs})
        return state

    return Opened(tuple(meta), finish)


def load(data: bytes) -> tuple[SiteState, tuple]:
    """(state, pysyncobj metadata) from a snapshot file's bytes; SnapshotError if it is none."""
    opened = open_snapshot(data)
    return opened.finish(), opened.meta


class _Reader:
    """Consecutive pickles out of one zlib stream, inflated as they are read: the header
    costs what it weighs, not the whole file."""

    def __init__(self, data: bytes, offset: int) -> None:
        self._file = io.BufferedReader(_Inflater(memoryview(data)[offset:]), buffer_size=INFLATE_CHUNK)

    def next(self) -> Any:
        try:
            return pickle.load(self._file)
        except EOFError:
            raise SnapshotError("snapshot truncated") from None
        except (pickle.UnpicklingError, zlib.error) as e:
            raise SnapshotError(f"snapshot damaged: {e}") from None

    def end(self) -> None:
        """The stream ends here, checksum and all; SnapshotError if not."""
        try:
            rest = self._file.read()
        except zlib.error as e:
            raise SnapshotError(f"snapshot damaged: {e}") from None
        if rest:
            raise SnapshotError("snapshot damaged: bytes after the allocations")
        if not self._file.raw.complete:
            raise SnapshotError("snapshot truncated")


class _Inflater(io.RawIOBase):
    """A raw stream of what a zlib stream inflates to (zlib.error on damage, checked by its
    checksum when it ends)."""

    def __init__(self, compressed: memoryview) -> None:
        self._source = compressed
        self._at = 0
        self._inflate = zlib.decompressobj()
        self._pending = b""

    @property
    def complete(self) -> bool:
        return self._inflate.eof

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            if self._inflate.eof:
                return 0
            if self._inflate.unconsumed_tail:
                chunk = self._inflate.unconsumed_tail
            elif self._at < len(self._source):
                chunk = self._source[self._at:self._at + INFLATE_CHUNK]
                self._at += len(chunk)
            else:
                return 0  # the file ended before the stream did: `complete` stays False
            self._pending = self._inflate.decompress(chunk, INFLATE_CHUNK)
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
