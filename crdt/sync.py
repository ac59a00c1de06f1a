"""Sync between two replicas of the mesh document: the messages, their binary codec, and the
session that decides what to send.

A session is symmetric. Each side opens with its state vector (STATE); the other answers with
exactly what that vector is missing (DELTA); from then on each side pushes the update of every
change it makes or learns (UPDATE), and both re-send their state vector now and then (the I/O
layer decides when) so a push lost on the way is repaired by the next DELTA.

Wire form of one message: 1 byte type, 4 bytes big-endian length, that many payload bytes.
Binary, because updates are binary: base64 inside JSON would cost a third more on every byte.
A DELTA or UPDATE of COMPRESS_MIN bytes or more travels zlib-compressed (DELTA_Z, UPDATE_Z)
when that is smaller: records repeat their field names and specs, so a catch-up shrinks to
about a sixth, which is what a slow or metered link between sites cares about.

Invariants:
- Pure: no I/O, no clock; `now` is passed in for the bookkeeping (`last_sync`).
- `SyncDecoder.feed` returns only complete messages of known types and raises nothing but
  `SyncError`; a length over its limit is refused when the 5-byte header is seen, before any
  payload is buffered; after an error it stays failed (the stream cannot be resynchronised).
- A session applies what it receives to its document and never sends an update back to the
  replica it came from (the other side already has it).
- Counters: `bytes_in`/`bytes_out` count every byte of every message as sent (headers
  included, compressed); `payload_in`/`payload_out` only the updates, uncompressed.
- A compressed payload is inflated to at most MAX_UPDATE_BYTES: one that would grow past it
  is refused (a SyncError) before it is fully inflated.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from crdt.document import MAX_STATE_VECTOR_BYTES, MAX_UPDATE_BYTES, MeshDocument, SyncError

STATE, DELTA, UPDATE, DELTA_Z, UPDATE_Z = 1, 2, 3, 4, 5
MESSAGE_TYPES = {STATE: "state", DELTA: "delta", UPDATE: "update", DELTA_Z: "compressed delta",
                 UPDATE_Z: "compressed update"}
_COMPRESSED = {DELTA: DELTA_Z, UPDATE: UPDATE_Z}
_PLAIN = {DELTA_Z: DELTA, UPDATE_Z: UPDATE}
# Smaller updates (one edit, one audit record) gain little and would pay zlib's header and
# a few microseconds each; level 1: within 20 % of the best ratio here at a quarter of the time.
COMPRESS_MIN = 512
COMPRESS_LEVEL = 1
_HEADER = struct.Struct(">BI")
HEADER_SIZE = _HEADER.size
# A message carries at most one update (or one state vector).
MAX_MESSAGE = MAX_UPDATE_BYTES


@dataclass(frozen=True)
class Message:
    type: int
    payload: bytes

    def encode(self) -> bytes:
        return encode_message(self.type, self.payload)

    @property
    def size(self) -> int:
        return HEADER_SIZE + len(self.payload)


def _header_problem(kind: int, length: int, max_message: int) -> str | None:
    """Why a message of this type and length may not be sent or taken, or None."""
    if kind not in MESSAGE_TYPES:
        return f"unknown sync message type {kind}"
    limit = MAX_STATE_VECTOR_BYTES if kind == STATE else max_message
    if length > limit:
        return f"{MESSAGE_TYPES[kind]} message of {length} bytes is over the limit ({limit} bytes)"
    return None


def encode_message(kind: int, payload: bytes) -> bytes:
    problem = _header_problem(kind, len(payload), MAX_MESSAGE)
    if problem:
        raise SyncError(problem)
    return _HEADER.pack(kind, len(payload)) + payload


class SyncDecoder:
    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self._buffer = bytearray()
        self._max = max_message
        self._failed: str | None = None

    def feed(self, data: bytes) -> list[Message]:
        if self._failed:
            raise SyncError(self._failed)
        self._buffer += data
        out = []
        while len(self._buffer) >= HEADER_SIZE:
            kind, length = _HEADER.unpack_from(self._buffer)
            problem = _header_problem(kind, length, self._max)
            if problem:
                self._failed = problem
                self._buffer.clear()
                raise SyncError(problem)
            if len(self._buffer) < HEADER_SIZE + length:
                break
            out.append(Message(kind, bytes(self._buffer[HEADER_SIZE:HEADER_SIZE + length])))
            del self._buffer[:HEADER_SIZE + length]
        return out


def _inflate(packed: bytes) -> bytes:
    inflater = zlib.decompressobj()
    try:
        update = inflater.decompress(packed, MAX_UPDATE_BYTES)
    except zlib.error as e:
        raise SyncError(f"compressed update does not inflate: {e}") from None
    if inflater.unconsumed_tail:
        raise SyncError(f"compressed update inflates past the {MAX_UPDATE_BYTES}-byte limit")
    if not inflater.eof or inflater.unused_data:
        raise SyncError("compressed update is cut short or followed by other bytes")
    return update


class SyncSession:
    """One side of a sync session with one remote replica."""

    def __init__(self, document: MeshDocument, peer: str) -> None:
        self.document = document
        self.peer = peer  # who is at the other end (a site name or an address), for events
        self.bytes_in = self.bytes_out = 0
        self.payload_in = self.payload_out = 0
        self.last_sync: float | None = None  # when the last DELTA or UPDATE arrived
        self.synced = False  # the other side's DELTA to our first STATE has arrived
        # STATEs sent whose DELTA has not come back yet. Messages of a session are never lost
        # (one ordered stream), so while this is above 0 another STATE would only make the
        # other side compute and send the same catch-up again.
        self.unanswered_states = 0

    def _out(self, message: Message) -> Message:
        if message.type != STATE:
            self.payload_out += len(message.payload)
            if len(message.payload) >= COMPRESS_MIN:
                packed = zlib.compress(message.payload, COMPRESS_LEVEL)
                if len(packed) < len(message.payload):
                    message = Message(_COMPRESSED[message.type], packed)
        self.bytes_out += message.size
        return message

    def open(self) -> list[Message]:
        """Our state vector: the opening message, and sent again now and then to ask for
        anything missed."""
        self.unanswered_states += 1
        return [self._out(Message(STATE, self.document.state_vector()))]

    @property
    def awaiting_delta(self) -> bool:
        """Whether a catch-up we asked for is still on its way (see `unanswered_states`)."""
        return self.unanswered_states > 0

    def receive(self, message: Message, now: float) -> tuple[list[Message], bytes | None]:
        """Handle one message: (replies, the update if it brought anything new, else None).
        Raises SyncError for a malformed message; the document is then unchanged."""
        self.bytes_in += message.size
        if message.type == STATE:
            return [self._out(Message(DELTA, self.document.delta_since(message.payload)))], None
        if message.type in _PLAIN:
            message = Message(_PLAIN[message.type], _inflate(message.payload))
        self.payload_in += len(message.payload)
        changed = self.document.apply(message.payload)
        self.last_sync = now
        if message.type == DELTA:
            self.synced = True
            self.unanswered_states = max(0, self.unanswered_states - 1)
        return [], message.payload if changed else None

    def push(self, update: bytes) -> list[Message]:
        """A change made here, or learnt from another replica, for the other side."""
        return [self._out(Message(UPDATE, update))]
