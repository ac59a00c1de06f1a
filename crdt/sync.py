"""Sync between two replicas of the mesh document: the messages, their binary codec, and the
session that decides what to send.

A session is symmetric. Each side opens with its epoch (EPOCH, crdt.epoch; left out at epoch 0,
so a replica that never compacted speaks as before) and its state vector (STATE); the other
answers with exactly what that vector is missing (DELTA); from then on each side pushes the
update of every change it makes or learns (UPDATE), and both re-send their state vector now
and then (the I/O layer decides when) so a push lost on the way is repaired by the next DELTA.

Two replicas of different epochs cannot exchange deltas (their Docs share no items). Then the
side of the higher epoch answers a STATE with its whole document (a DELTA of everything), the
side of the lower epoch answers with an empty DELTA and takes the whole document it gets as an
`adoption` for the I/O layer: that layer builds the higher epoch's document from it, merges its
own records into it (crdt.compaction) and calls `switched`, which announces the new epoch and
asks again (EPOCH, STATE). A side whose epoch changes during a session (it compacted, or
adopted another) calls `switched` too; a side that learns mid-session that its peer moved to a
higher epoch asks for that document with a STATE. Updates of another epoch are never applied.

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
- A session applies a DELTA or UPDATE only when both sides are of one epoch, and pushes only
  then; a whole document from a higher epoch is handed over (`take_adoption`) unapplied, for
  the I/O layer to check (crdt.document.MeshDocument.adopted refuses it whole when it is
  malformed or holds anything but well-formed records) and merge.
- Counters: `bytes_in`/`bytes_out` count every byte of every message as sent (headers
  included, compressed); `payload_in`/`payload_out` only the updates, uncompressed.
- A compressed payload is inflated to at most MAX_UPDATE_BYTES: one that would grow past it
  is refused (a SyncError) before it is fully inflated.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from crdt.document import EMPTY_UPDATE, MAX_STATE_VECTOR_BYTES, MAX_UPDATE_BYTES, MeshDocument, SyncError
from crdt.epoch import ENCODED_BYTES, ZERO_EPOCH, Epoch, EpochError

STATE, DELTA, UPDATE, DELTA_Z, UPDATE_Z, EPOCH = 1, 2, 3, 4, 5, 6
MESSAGE_TYPES = {STATE: "state", DELTA: "delta", UPDATE: "update", DELTA_Z: "compressed delta",
                 UPDATE_Z: "compressed update", EPOCH: "epoch"}
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
    limit = MAX_STATE_VECTOR_BYTES if kind == STATE else ENCODED_BYTES if kind == EPOCH else max_message
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
        # The other side's epoch: None until its first message (an EPOCH, or a STATE without
        # one: epoch 0, a replica that never compacted).
        self.peer_epoch: Epoch | None = None
        self.ignored = 0  # DELTAs and UPDATEs of another epoch, not applied
        self._adoption: tuple[Epoch, bytes] | None = None

    def _out(self, message: Message) -> Message:
        if message.type not in (STATE, EPOCH):
            self.payload_out += len(message.payload)
            if len(message.payload) >= COMPRESS_MIN:
                packed = zlib.compress(message.payload, COMPRESS_LEVEL)
                if len(packed) < len(message.payload):
                    message = Message(_COMPRESSED[message.type], packed)
        self.bytes_out += message.size
        return message

    def _state(self) -> Message:
        self.unanswered_states += 1
        return self._out(Message(STATE, self.document.state_vector()))

    def open(self) -> list[Message]:
        """Our epoch and state vector: the opening messages; the state vector is sent again
        now and then to ask for anything missed."""
        out = [] if self.document.epoch == ZERO_EPOCH else [self._out(Message(EPOCH, self.document.epoch.encode()))]
        return out + [self._state()]

    def resync(self) -> list[Message]:
        """Our state vector again (repairs lost pushes)."""
        return [self._state()]

    def switched(self, document: MeshDocument) -> list[Message]:
        """Our replica moved to another epoch's document: announce it and ask again."""
        self.document = document
        self._adoption = None
        self.synced = False
        return self.open()

    @property
    def same_epoch(self) -> bool:
        ours = self.document.epoch
        return self.peer_epoch == ours or (self.peer_epoch is None and ours == ZERO_EPOCH)

    @property
    def awaiting_delta(self) -> bool:
        """Whether a catch-up we asked for is still on its way (see `unanswered_states`)."""
        return self.unanswered_states > 0

    def take_adoption(self) -> tuple[Epoch, bytes] | None:
        """The whole document of the peer's higher epoch, once it arrived (then cleared)."""
        adoption, self._adoption = self._adoption, None
        return adoption

    def receive(self, message: Message, now: float) -> tuple[list[Message], bytes | None]:
        """Handle one message: (replies, the update if it brought anything new, else None).
        Raises SyncError for a malformed message; the document is then unchanged."""
        self.bytes_in += message.size
        ours = self.document.epoch
        if message.type == EPOCH:
            try:
                theirs = Epoch.decode(message.payload)
            except EpochError as e:
                raise SyncError(f"malformed epoch: {e.reason}") from None
            moved = self.peer_epoch is not None and theirs != self.peer_epoch
            self.peer_epoch = theirs
            # Mid-session news of a higher epoch: ask for its document (at the start, the
            # opening STATE already did).
            return ([self._state()] if moved and theirs > ours else []), None
        if self.peer_epoch is None:
            self.peer_epoch = ZERO_EPOCH
        if message.type == STATE:
            if self.peer_epoch == ours:
                answer = self.document.delta_since(message.payload)
            elif self.peer_epoch < ours:
                answer = self.document.full_update()  # their vector is of another Doc: everything
            else:
                answer = EMPTY_UPDATE  # we take theirs; ours means nothing to their Doc
            return [self._out(Message(DELTA, answer))], None
        if message.type in _PLAIN:
            message = Message(_PLAIN[message.type], _inflate(message.payload))
        self.payload_in += len(message.payload)
        if message.type == DELTA:
            self.unanswered_states = max(0, self.unanswered_states - 1)
        if self.peer_epoch != ours:
            if self.peer_epoch > ours and message.type == DELTA:  # its whole document (maybe empty)
                self._adoption = (self.peer_epoch, message.payload)
            else:
                self.ignored += 1
            return [], None
        changed = self.document.apply(message.payload)
        self.last_sync = now
        if message.type == DELTA:
            self.synced = True
        return [], message.payload if changed else None

    def push(self, update: bytes) -> list[Message]:
        """A change made here, or learnt from another replica, for the other side (nothing
        while the other side is of another epoch: it would not apply there)."""
        if not self.same_epoch:
            return []
        return [self._out(Message(UPDATE, update))]
