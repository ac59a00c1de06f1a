"""A node's durable replica of the mesh document: `<data-dir>/mesh/snapshot` and its log.

Every update the replica takes (its own writes and what peers send) is appended to the log and
fsync'd before the write is acknowledged or the update forwarded; now and then the whole
document is written as a snapshot and the log starts afresh (`compact`: the log folded in, the
same Doc). A compaction of the document itself (crdt.compaction) or the adoption of another
replica's epoch replaces the Doc: `rewrite` stores the new epoch's document and an empty log.
Byte formats: crdt.log.

The snapshot names its epoch (crdt.epoch); the log of an epoch is the file `log-<generation>-
<id hex>` (`log` for epoch 0, as stores were before epochs), so a log is never replayed into
the Doc of another epoch (its items would land beside the records as duplicates).

Invariants:
- Nothing acknowledged is lost: `append` returns only after the record is on disk (fsync), and
  a caller acknowledges only after `append` returned.
- A crash at any point leaves a store that opens: a torn last record (a crash mid-append) is
  cut off, since it was never acknowledged; a snapshot is replaced atomically (temp file,
  fsync, rename, directory fsync) before the log is emptied, so between the two a restart
  replays updates the snapshot already holds, which CRDT updates make harmless.
- A rewrite writes the new epoch's snapshot first (atomically), then creates its empty log,
  then removes the old epoch's log. The new snapshot holds everything the old log held (the
  caller's promise: every update appended before it took the full update is in it), so a
  crash after the first step opens the new epoch and drops the old log; a crash before it
  opens the old epoch whole. Either way the document holds everything acknowledged.
- A snapshot that does not verify (torn by a failing disk, or not ours) is set aside as
  `snapshot.bad` with an error logged, never silently merged; the newest epoch's log is then
  replayed alone and no log is removed. The same holds for a snapshot that is missing while
  the log of a later epoch than 0 exists (only a rewrite creates one, after its snapshot).
  What the replica lost comes back from its peers by sync.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from typing import Iterator

from crdt.document import MeshDocument, SyncError
from crdt.epoch import ZERO_EPOCH, Epoch
from crdt.log import LogError, decode_log, decode_snapshot, encode_record, encode_snapshot
from meshd.io.diskspace import is_full, refused
from meshd.io.identity import fsync_dir, write_atomic

log = logging.getLogger("meshd.crdt")

# The log is folded into a snapshot once it holds this much: replay at start stays well under
# a second (pycrdt applies ~10 MB of small updates a second here) and the disk use bounded.
COMPACT_LOG_BYTES = 4 * 1024 * 1024


def log_name(epoch: Epoch) -> str:
    """The file name of an epoch's log."""
    return "log" if epoch == ZERO_EPOCH else f"log-{epoch.generation}-{epoch.epoch_id.hex()}"


def _epoch_of_log(name: str) -> Epoch | None:
    if name == "log":
        return ZERO_EPOCH
    parts = name.split("-")
    if len(parts) != 3 or parts[0] != "log" or not parts[1].isdigit():
        return None
    try:
        return Epoch(int(parts[1]), bytes.fromhex(parts[2]))
    except ValueError:  # EpochError too: not a log this store wrote
        return None


class DocumentStore:
    def __init__(self, directory: Path, compact_at: int = COMPACT_LOG_BYTES) -> None:
        self.directory = Path(directory)
        self.snapshot_path = self.directory / "snapshot"
        self.compact_at = compact_at
        self.epoch = ZERO_EPOCH
        self._fd: int | None = None
        self.log_bytes = 0
        self.snapshot_bytes = 0  # the full update the current snapshot holds
        self.replayed = 0  # log records applied at open, for the start-up log line

    @property
    def log_path(self) -> Path:
        return self.directory / log_name(self.epoch)

    def _logs(self) -> dict[Epoch, Path]:
        found = {}
        for path in self.directory.iterdir():
            epoch = _epoch_of_log(path.name)
            if epoch is not None and path.is_file():
                found[epoch] = path
        return found

    def open(self, document: MeshDocument | None = None) -> MeshDocument:
        """Load the snapshot and its epoch's log into `document` (a new one if None; it must
        be empty), which takes the snapshot's epoch."""
        document = document or MeshDocument()
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        logs = self._logs()
        snapshot_good = True
        self.epoch = ZERO_EPOCH
        if not self.snapshot_path.exists() and any(epoch != ZERO_EPOCH for epoch in logs):
            # A log of a later epoch is created only after that epoch's snapshot (`rewrite`):
            # the snapshot was lost. As with one that does not verify, no log goes.
            snapshot_good = False
            self.epoch = max(logs)
            log.error("document snapshot missing beside the log of its epoch", extra={"epoch": str(self.epoch)})
        elif self.snapshot_path.exists():
            try:
                self.epoch, full = decode_snapshot(self.snapshot_path.read_bytes())
                document.apply(full)
                self.snapshot_bytes = len(full)
            except (LogError, SyncError) as e:
                snapshot_good = False
                os.replace(self.snapshot_path, self.snapshot_path.with_name("snapshot.bad"))
                self.epoch = max(logs, default=ZERO_EPOCH)
                log.error("document snapshot set aside", extra={"reason": getattr(e, "reason", str(e))})
        document.epoch = self.epoch
        if snapshot_good:
            for epoch, path in logs.items():  # a rewrite's old log: all of it is in the snapshot
                if epoch != self.epoch:
                    os.unlink(path)
                    log.info("log of an earlier document epoch removed", extra={"epoch": str(epoch)})
        data = self.log_path.read_bytes() if self.log_path.exists() else b""
        updates, valid = decode_log(data)
        for update in updates:
            try:
                document.apply(update)
            except SyncError as e:  # only ever written after it applied; a log of another build?
                log.error("document log record skipped", extra={"reason": e.reason})
        self.replayed = len(updates)
        self._fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if valid < len(data):
            os.ftruncate(self._fd, valid)  # the torn tail of a crash mid-append: never acknowledged
            os.fsync(self._fd)
            log.warning("document log tail cut", extra={"bytes": len(data) - valid})
        self.log_bytes = valid
        return document

    def append(self, *updates: bytes) -> None:
        """Write updates to the log and fsync once: on return they survive a crash. On a full
        disk it raises DiskFull and the log is as it was (meshd.io.diskspace)."""
        if self._fd is None:
            raise RuntimeError("document store is not open")
        data = b"".join(encode_record(u) for u in updates)
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
        except OSError as e:
            if not is_full(e):
                raise
            os.ftruncate(self._fd, self.log_bytes)  # no torn record before the next append
            raise refused(self.directory, e) from None
        self.log_bytes += len(data)

    def needs_compaction(self) -> bool:
        return self.log_bytes >= self.compact_at

    def compact(self, document: MeshDocument) -> None:
        """Snapshot the whole document, then empty the log (in that order: see the header)."""
        self.compact_to(document.full_update())

    def compact_to(self, full_update: bytes) -> None:
        """`compact` with the document's full update taken by the caller (pycrdt documents stay
        on their thread; the disk work may run on another). Every update appended before the
        full update was taken must be in it."""
        write_atomic(self.snapshot_path, encode_snapshot(full_update, self.epoch))
        self.snapshot_bytes = len(full_update)
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.fsync(self._fd)
        self.log_bytes = 0

    def rewrite(self, epoch: Epoch, full_update: bytes) -> None:
        """Store the document of a new epoch (its full update) with an empty log; see the
        header for the order and why a crash between any two steps loses nothing. Every
        update appended before the full update was taken must be in it."""
        for _ in self.rewrite_steps(epoch, full_update):
            pass

    def rewrite_steps(self, epoch: Epoch, full_update: bytes) -> Iterator[str]:
        """`rewrite` one durable step at a time (each name is yielded once the step is on
        disk), so tests can stop between any two as a crash would."""
        if epoch == self.epoch:
            self.compact_to(full_update)
            yield "snapshot"
            return
        old_path = self.log_path
        write_atomic(self.snapshot_path, encode_snapshot(full_update, epoch))
        yield "snapshot"
        new_path = self.directory / log_name(epoch)
        fd = os.open(new_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        os.fsync(fd)
        fsync_dir(self.directory)
        yield "new log"
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self.epoch, self.log_bytes, self.snapshot_bytes = fd, epoch, 0, len(full_update)
        if old_path.exists():
            os.unlink(old_path)
            fsync_dir(self.directory)
        yield "old log removed"

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
