"""The byte format of a replica's durable store: an append-only log of updates and a snapshot.

Log: records back to back, each `length (4 bytes BE) | crc32 of payload (4 bytes BE) | payload`.
Snapshot: `MESHDOC2 | epoch (24 bytes, crdt.epoch) | crc32 (4 bytes BE) | payload`, the payload
being the whole document as one update and the checksum covering epoch and payload; a
`MESHDOC1 | crc32 | payload` snapshot (written before epochs) is of epoch 0. The I/O layer
(meshd.io.crdtstore) appends and fsyncs; this module only cuts bytes.

Invariants:
- Pure: no I/O.
- `decode_log` returns every complete record whose checksum holds, in order, and the length of
  that valid prefix. It stops at the first record that is cut short or corrupt: a crash in the
  middle of an append leaves exactly such a tail, and everything after it is unacknowledged.
- `decode_snapshot` accepts only what `encode_snapshot` made (or a MESHDOC1 snapshot), whole;
  anything else is refused with a reason (the store then falls back to the log alone).
"""

from __future__ import annotations

import struct
import zlib

from crdt.epoch import ENCODED_BYTES, ZERO_EPOCH, Epoch, EpochError

_RECORD = struct.Struct(">II")
RECORD_HEADER = _RECORD.size
SNAPSHOT_MAGIC = b"MESHDOC2"
SNAPSHOT_MAGIC_V1 = b"MESHDOC1"  # before epochs: read, never written
# One record is one update; the document refuses bigger ones anyway (crdt.document).
MAX_RECORD = 64 * 1024 * 1024


class LogError(ValueError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def encode_record(payload: bytes) -> bytes:
    if len(payload) > MAX_RECORD:
        raise LogError(f"record of {len(payload)} bytes is over the {MAX_RECORD} limit")
    return _RECORD.pack(len(payload), zlib.crc32(payload)) + payload


def decode_log(data: bytes) -> tuple[list[bytes], int]:
    """(the payloads of the valid records, the byte length of the valid prefix)."""
    out: list[bytes] = []
    at = 0
    view = memoryview(data)
    while at + RECORD_HEADER <= len(data):
        length, crc = _RECORD.unpack_from(data, at)
        end = at + RECORD_HEADER + length
        if length > MAX_RECORD or end > len(data):
            break
        payload = bytes(view[at + RECORD_HEADER:end])
        if zlib.crc32(payload) != crc:
            break
        out.append(payload)
        at = end
    return out, at


def encode_snapshot(payload: bytes, epoch: Epoch = ZERO_EPOCH) -> bytes:
    body = epoch.encode() + payload
    return SNAPSHOT_MAGIC + struct.pack(">I", zlib.crc32(body)) + body


def decode_snapshot(data: bytes) -> tuple[Epoch, bytes]:
    """(the snapshot's epoch, the document's full update)."""
    head = len(SNAPSHOT_MAGIC) + 4
    if len(data) < head or not data.startswith((SNAPSHOT_MAGIC, SNAPSHOT_MAGIC_V1)):
        raise LogError("not a meshd document snapshot")
    (crc,) = struct.unpack_from(">I", data, len(SNAPSHOT_MAGIC))
    body = data[head:]
    if zlib.crc32(body) != crc:
        raise LogError("snapshot checksum does not match (torn or corrupted)")
    if data.startswith(SNAPSHOT_MAGIC_V1):
        return ZERO_EPOCH, body
    try:
        return Epoch.decode(body[:ENCODED_BYTES]), body[ENCODED_BYTES:]
    except EpochError as e:
        raise LogError(f"snapshot epoch: {e.reason}") from None
