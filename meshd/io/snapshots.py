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
import logging
import os
import pickle
import threading
import time
import zlib
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
# zlib level 1: 4.7x faster than pysyncobj's gzip 9 for 10 % more bytes (measured).
COMPRESSION_LEVEL = 1


class SnapshotError(ValueError):
    """The file is not a snapshot this store can load; the reason says why."""


class SnapshotStore:
    """pysyncobj's serializer, deserializer and serializeChecker for one SiteRaft.

    `state` returns the live state (the Raft thread's, read only on that thread) and
    `install(state)` replaces it after a load; both are bound by the SiteRaft.
    """

    def __init__(self) -> None:
        self.state: Callable[[], SiteState] | None = None
        self.install: Callable[[SiteState], None] | None = None
        self._writer: threading.Thread | None = None
        self._outcome: int | None = None  # SUCCESS or FAILED of the last writer, until reported
        self.last_write_s: float | None = None  # how long the last writer took (for logs and tests)

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
        """Raft thread: load the snapshot at `path` into the state; pysyncobj's metadata back."""
        assert self.install is not None
        state, meta = load(Path(path).read_bytes())
        self.install(state)
        return meta

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


def load(data: bytes) -> tuple[SiteState, tuple]:
    """(state, pysyncobj metadata) from a snapshot file's bytes; SnapshotError if it is none."""
    if data.startswith(MARKER):
        raise SnapshotError("no snapshot was completed yet (the journal holds every entry)")
    if data.startswith(b"\x1f\x8b"):  # pysyncobj's own dump, written by an older meshd
        saved = pickle.loads(gzip.decompress(data))
        fields = saved[0][0] if isinstance(saved[0], list) else saved[0]
        state = fields.get("site_state")
        if not isinstance(state, SiteState):
            raise SnapshotError("an old-format snapshot without a site state")
        return state, tuple(saved[1:])
    if not data.startswith(MAGIC):
        raise SnapshotError("not a meshd snapshot (unknown header)")
    try:
        raw = zlib.decompress(data[len(MAGIC):])
    except zlib.error as e:
        raise SnapshotError(f"snapshot damaged: {e}") from None
    unpickler = _Reader(raw)
    meta, head, count = unpickler.next()
    slices: list = []
    while sum(map(len, slices)) < count:
        slices.append(unpickler.next())
    allocs = AllocTable.of(alloc for part in slices for alloc in part)
    state = SiteState()
    state.__setstate__({**head, "allocs": allocs})
    return state, tuple(meta)


class _Reader:
    """Consecutive pickles out of one byte string."""

    def __init__(self, raw: bytes) -> None:
        import io
        self._file = io.BytesIO(raw)

    def next(self) -> Any:
        try:
            return pickle.load(self._file)
        except EOFError:
            raise SnapshotError("snapshot truncated") from None


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
