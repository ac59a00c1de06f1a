"""A node's durable replica of the mesh document: `<data-dir>/mesh/snapshot` and `<data-dir>/mesh/log`.

Every update the replica takes (its own writes and what peers send) is appended to the log and
fsync'd before the write is acknowledged or the update forwarded; now and then the whole
document is written as a snapshot and the log starts afresh. Byte formats: crdt.log.

Invariants:
- Nothing acknowledged is lost: `append` returns only after the record is on disk (fsync), and
  a caller acknowledges only after `append` returned.
- A crash at any point leaves a store that opens: a torn last record (a crash mid-append) is
  cut off, since it was never acknowledged; a snapshot is replaced atomically (temp file,
  fsync, rename, directory fsync) before the log is emptied, so between the two a restart
  replays updates the snapshot already holds, which CRDT updates make harmless.
- A snapshot that does not verify (torn by a failing disk, or not ours) is set aside as
  `snapshot.bad` with an error logged, never silently merged.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from crdt.document import MeshDocument, SyncError
from crdt.log import LogError, decode_log, decode_snapshot, encode_record, encode_snapshot
from meshd.io.identity import write_atomic

log = logging.getLogger("meshd.crdt")

# The log is folded into a snapshot once it holds this much: replay at start stays well under
# a second (pycrdt applies ~10 MB of small updates a second here) and the disk use bounded.
COMPACT_LOG_BYTES = 4 * 1024 * 1024


class DocumentStore:
    def __init__(self, directory: Path, compact_at: int = COMPACT_LOG_BYTES) -> None:
        self.directory = Path(directory)
        self.snapshot_path = self.directory / "snapshot"
        self.log_path = self.directory / "log"
        self.compact_at = compact_at
        self._fd: int | None = None
        self.log_bytes = 0
        self.replayed = 0  # log records applied at open, for the start-up log line

    def open(self, document: MeshDocument | None = None) -> MeshDocument:
        """Load the snapshot and the log's valid records into `document` (a new one if None)."""
        document = document or MeshDocument()
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.snapshot_path.exists():
            try:
                document.apply(decode_snapshot(self.snapshot_path.read_bytes()))
            except (LogError, SyncError) as e:
                os.replace(self.snapshot_path, self.snapshot_path.with_name("snapshot.bad"))
                log.error("document snapshot set aside", extra={"reason": getattr(e, "reason", str(e))})
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
        """Write updates to the log and fsync once: on return they survive a crash."""
        if self._fd is None:
            raise RuntimeError("document store is not open")
        data = b"".join(encode_record(u) for u in updates)
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)
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
        write_atomic(self.snapshot_path, encode_snapshot(full_update))
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.fsync(self._fd)
        self.log_bytes = 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
