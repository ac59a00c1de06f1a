"""Sync between two replicas of the mesh document: the messages, their binary codec, and the
session that decides what to send.

A session is symmetric. Each side opens with its epoch (EPOCH, crdt.epoch; left out at epoch 0,
so a replica that never compacted speaks as before) and its state vector (STATE); the other
answers with exactly what that vector is missing (DELTA); from then on each side pushes the
update of every change it makes or learns (UPDATE), and both re-send their state vector now
and then (the I/O layer decides when) so a push lost on the way is repaired by the next DELTA.

Two replicas of different epochs cannot exchange deltas (their Docs share no items). A side
that learns its peer is of a higher epoch asks for that epoch's whole document (WANT); the
other answers with it (FULL: the epoch and the document as one update); every STATE between
sides of different epochs is answered with an empty DELTA. The asking side hands the document
over as an `adoption` to the I/O layer, which builds the higher epoch's document from it,
merges its own records into it (crdt.compaction) and calls `switched`: the session announces
the new epoch and asks again (EPOCH, STATE), and deltas flow as before. A side whose epoch
changes during a session (it compacted, or adopted another) calls `switched` too. A side asks
once for each epoch it hears of, and never for one its I/O layer refused (`refused`): a peer
whose document was refused is not asked to send megabytes again at every redial.

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
  then; a whole document is taken only as the answer to a WANT of ours, only for an epoch
  higher than ours, and handed over (`take_adoption`) unapplied, for the I/O layer to check
  (crdt.document.MeshDocument.adopted refuses it whole when it is malformed or holds
  anything but well-formed records) and merge.
- Counters: `bytes_in`/`bytes_out` count every byte of every message as sent (headers
  included, compressed); `payload_in`/`payload_out` only the updates, uncompressed.
- A compressed payload is inflated to at most MAX_UPDATE_BYTES: one that would grow past it
  is refused (a SyncError) before it is fully inflated.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Callable

from crdt.document import EMPTY_UPDATE, MAX_STATE_VECTOR_BYTES, MAX_UPDATE_BYTES, MeshDocument, SyncError
from crdt.epoch import ENCODED_BYTES, ZERO_EPOCH, Epoch, EpochError

STATE, DELTA, UPDATE, DELTA_Z, UPDATE_Z, EPOCH, WANT, FULL, FULL_Z = 1, 2, 3, 4, 5, 6, 7, 8, 9
MESSAGE_TYPES = {STATE: "state", DELTA: "delta", UPDATE: "update", DELTA_Z: "compressed delta",
                 UPDATE_Z: "compressed update", EPOCH: "epoch", WANT: "want", FULL: "full document",
                 FULL_Z: "compressed full document"}
_COMPRESSED = {DELTA: DELTA_Z, UPDATE: UPDATE_Z, FULL: FULL_Z}
_PLAIN = {DELTA_Z: DELTA, UPDATE_Z: UPDATE, FULL_Z: FULL}
_UPDATES = {DELTA, UPDATE, FULL}  # messages that carry an update (counted in payload_*)
# Smaller updates (one edit, one audit record) gain little and would pay zlib's header and
# a few microseconds each; level 1: within 20 % of the best ratio here at a quarter of the time.
COMPRESS_MIN = 512
COMPRESS_LEVEL = 1
_HEADER = struct.Struct(">BI")
HEADER_SIZE = _HEADER.size
# A message carries at most one update (or one state vector; a FULL also its epoch).
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
    limit = (MAX_STATE_VECTOR_BYTES if kind == STATE else ENCODED_BYTES if kind in (EPOCH, WANT)
             else max_message + ENCODED_BYTES if kind in (FULL, FULL_Z) else max_message)
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


def _inflate(packed: bytes, limit: int = MAX_UPDATE_BYTES) -> bytes:
    inflater = zlib.decompressobj()
    try:
        update = inflater.decompress(packed, limit)
    except zlib.error as e:
        raise SyncError(f"compressed update does not inflate: {e}") from None
    if inflater.unconsumed_tail:
        raise SyncError(f"compressed update inflates past the {MAX_UPDATE_BYTES}-byte limit")
    if not inflater.eof or inflater.unused_data:
        raise SyncError("compressed update is cut short or followed by other bytes")
    return update


class SyncSession:
    """One side of a sync session with one remote replica. `refused(epoch)`: whether the I/O
    layer refused that epoch's document already (then it is not asked for again)."""

    def __init__(self, document: MeshDocument, peer: str,
                 refused: Callable[[Epoch], bool] = lambda epoch: False) -> None:
        self.document = document
        self.peer = peer  # who is at the other end (a site name or an address), for events
        self.refused = refused
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
        self.wanted: Epoch | None = None  # the epoch whose document we asked for (WANT)
        self.ignored = 0  # DELTAs, UPDATEs and documents of another epoch, not applied
        self._adoption: tuple[Epoch, bytes] | None = None

    def _out(self, message: Message) -> Message:
        if message.type in _UPDATES:
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
        return self.open() + self._want()

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

    def _want(self) -> list[Message]:
        """Ask for the peer's document when its epoch is higher than ours, once per epoch."""
        theirs = self.peer_epoch
        if theirs is None or theirs <= self.document.epoch or theirs == self.wanted or self.refused(theirs):
            return []
        self.wanted = theirs
        return [self._out(Message(WANT, theirs.encode()))]

    def _learn_epoch(self, theirs: Epoch) -> list[Message]:
        self.peer_epoch = theirs
        return self._want()

    def receive(self, message: Message, now: float) -> tuple[list[Message], bytes | None]:
        """Handle one message: (replies, the update if it brought anything new, else None).
        Raises SyncError for a malformed message; the document is then unchanged."""
        self.bytes_in += message.size
        ours = self.document.epoch
        if message.type in (EPOCH, WANT):
            try:
                epoch = Epoch.decode(message.payload)
            except EpochError as e:
                raise SyncError(f"malformed {MESSAGE_TYPES[message.type]}: {e.reason}") from None
            if message.type == EPOCH:
                return self._learn_epoch(epoch), None
            if epoch != ours:  # asked for an epoch we have left meanwhile: our EPOCH tells it
                return [], None
            return [self._out(Message(FULL, ours.encode() + self.document.full_update()))], None
        replies = self._learn_epoch(ZERO_EPOCH) if self.peer_epoch is None else []
        if message.type == STATE:
            if self.peer_epoch == ours:
                answer = self.document.delta_since(message.payload)
            else:
                answer = EMPTY_UPDATE  # their vector is of another Doc; the document goes by WANT
            return replies + [self._out(Message(DELTA, answer))], None
        if message.type in _PLAIN:
            limit = MAX_UPDATE_BYTES + ENCODED_BYTES if message.type == FULL_Z else MAX_UPDATE_BYTES
            message = Message(_PLAIN[message.type], _inflate(message.payload, limit))
        self.payload_in += len(message.payload)
        if message.type == FULL:
            try:
                epoch = Epoch.decode(message.payload[:ENCODED_BYTES])
            except EpochError as e:
                raise SyncError(f"malformed full document: {e.reason}") from None
            if epoch != self.wanted or epoch <= ours:
                self.ignored += 1  # not asked for, or no longer higher than ours
                return replies, None
            self._adoption = (epoch, message.payload[ENCODED_BYTES:])
            return replies, None
        if message.type == DELTA:
            self.unanswered_states = max(0, self.unanswered_states - 1)
        if self.peer_epoch != ours:
            self.ignored += 1
            return replies, None
        changed = self.document.apply(message.payload)
        self.last_sync = now
        if message.type == DELTA:
            self.synced = True
        return replies, message.payload if changed else None

    def push(self, update: bytes) -> list[Message]:
        """A change made here, or learnt from another replica, for the other side (nothing
        while the other side is of another epoch: it would not apply there)."""
        if not self.same_epoch:
            return []
        return [self._out(Message(UPDATE, update))]
