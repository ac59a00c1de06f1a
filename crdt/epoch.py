"""The epoch of a replica's document: which generation of the mesh document its pycrdt Doc is.

Compaction (crdt.compaction) rebuilds the document from its live records into a fresh Doc:
the same records, none of the history. Two Docs built apart share no items, so plain Yjs
deltas between them mean nothing (applied, they would duplicate every record under other
ids). Each rebuild therefore starts a new epoch, and replicas of different epochs do a full
state transfer instead (crdt.sync): the replica of the lower epoch adopts the higher one's
document and merges its own records into it, so every replica ends on one epoch.

An epoch is (generation, id): the generation counts rebuilds (one more than the epoch it was
rebuilt from), the id (16 random bytes, made by the caller) tells apart two rebuilds of one
generation made apart. Epochs are totally ordered by (generation, id): every replica picks
the same survivor of any two. Generation 0 with a zero id is the document as it was before
compaction existed (stores and peers that never mention an epoch).

Invariants:
- Pure: no I/O, no clock, no randomness (ids are passed in).
- `decode(encode(e)) == e`; `decode` refuses anything else with an EpochError naming why.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

EPOCH_ID_BYTES = 16  # random: two rebuilds made apart collide with probability 2**-128
# Bounded like every int the document holds (crdt.schema.MAX_SAFE_INT): at one rebuild a
# second that is 285 million years, so a peer announcing more is lying.
MAX_GENERATION = 2**53
_PACK = struct.Struct(">Q")
ENCODED_BYTES = _PACK.size + EPOCH_ID_BYTES


class EpochError(ValueError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, order=True)
class Epoch:
    generation: int
    epoch_id: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.generation, int) or not 0 <= self.generation <= MAX_GENERATION:
            raise EpochError(f"epoch generation {self.generation!r} is not from 0 to 2**53")
        if not isinstance(self.epoch_id, bytes) or len(self.epoch_id) != EPOCH_ID_BYTES:
            raise EpochError(f"an epoch id is {EPOCH_ID_BYTES} bytes")

    def encode(self) -> bytes:
        return _PACK.pack(self.generation) + self.epoch_id

    @classmethod
    def decode(cls, data: bytes) -> "Epoch":
        if len(data) != ENCODED_BYTES:
            raise EpochError(f"an epoch is {ENCODED_BYTES} bytes, got {len(data)}")
        (generation,) = _PACK.unpack_from(data)
        return cls(generation, bytes(data[_PACK.size:]))

    def successor(self, epoch_id: bytes) -> "Epoch":
        """The epoch of a document rebuilt from this one."""
        if self.generation >= MAX_GENERATION:
            raise EpochError("no epoch after the last generation")
        return Epoch(self.generation + 1, epoch_id)

    def __str__(self) -> str:
        return f"{self.generation}/{self.epoch_id.hex()[:12]}"


ZERO_EPOCH = Epoch(0, bytes(EPOCH_ID_BYTES))
