"""The byte codec of a piece transfer, after `pieces_hello` / `pieces_ready` on the peer port.

The fetching side sends requests, the serving side answers them in order:
    request   b"L"                          the piece list
              b"P" + index (4 bytes)        one piece
    answer    b"L" + length (4) + bytes     the piece list
              b"P" + index (4) + length (4) + bytes
              b"E" + length (2) + UTF-8     a refusal (the reason); the connection ends
Numbers are big-endian. Pieces travel raw: a JSON frame would cost a third more bytes over
a thin link, and a piece is checked by its digest, not by its framing.

Invariants:
- Pure: no I/O. Callers move the bytes.
- A decoder never buffers more than its limit plus one header: a length above the limit is
  refused as soon as its header is seen. After an error it stays failed.
- Whatever bytes it is fed, a decoder returns only well-formed messages or raises PieceWireError.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_INDEX = struct.Struct(">I")
_PIECE = struct.Struct(">II")
_REASON = struct.Struct(">H")
MAX_REASON_BYTES = 1024  # one line an operator reads


class PieceWireError(ValueError):
    """Bytes that are not this codec; the connection carrying them must end."""


@dataclass(frozen=True)
class PieceList:
    data: bytes


@dataclass(frozen=True)
class Piece:
    index: int
    data: bytes


@dataclass(frozen=True)
class Refusal:
    reason: str


@dataclass(frozen=True)
class WantList:
    pass


@dataclass(frozen=True)
class WantPiece:
    index: int


def want_list() -> bytes:
    return b"L"


def want_piece(index: int) -> bytes:
    return b"P" + _INDEX.pack(index)


def piece_list(data: bytes) -> bytes:
    return b"L" + _INDEX.pack(len(data)) + data


def piece_header(index: int, length: int) -> bytes:
    """What goes before a piece's bytes (the server streams them after it)."""
    return b"P" + _PIECE.pack(index, length)


def refusal(reason: str) -> bytes:
    data = reason.encode("utf-8", "replace")[:MAX_REASON_BYTES]
    return b"E" + _REASON.pack(len(data)) + data


class _Decoder:
    def __init__(self) -> None:
        self._buffer = bytearray()
        self._error: PieceWireError | None = None

    def feed(self, data: bytes) -> list:
        if self._error is not None:
            raise PieceWireError(f"stream already failed: {self._error}")
        self._buffer += data
        out = []
        try:
            while self._buffer:
                message = self._cut()
                if message is None:
                    break
                out.append(message)
        except PieceWireError as e:
            self._error = e
            self._buffer = bytearray()
            raise
        return out

    def _cut(self):
        raise NotImplementedError


class AnswerDecoder(_Decoder):
    """The fetching side's: cuts answers; `max_body` bounds a piece or piece list."""

    def __init__(self, max_body: int) -> None:
        super().__init__()
        self.max_body = max_body

    def _cut(self):
        kind, buffer = self._buffer[:1], self._buffer
        if kind == b"L":
            if len(buffer) < 1 + _INDEX.size:
                return None
            (length,) = _INDEX.unpack_from(buffer, 1)
            return self._body(1 + _INDEX.size, length, PieceList)
        if kind == b"P":
            if len(buffer) < 1 + _PIECE.size:
                return None
            index, length = _PIECE.unpack_from(buffer, 1)
            return self._body(1 + _PIECE.size, length, lambda data: Piece(index, data))
        if kind == b"E":
            if len(buffer) < 1 + _REASON.size:
                return None
            (length,) = _REASON.unpack_from(buffer, 1)
            if length > MAX_REASON_BYTES:
                raise PieceWireError(f"a refusal of {length} bytes")
            return self._body(1 + _REASON.size, length, lambda data: Refusal(data.decode("utf-8", "replace")))
        raise PieceWireError(f"unknown answer {bytes(kind)!r}")

    def _body(self, start: int, length: int, make):
        if length > self.max_body:
            raise PieceWireError(f"an answer of {length} bytes, more than the {self.max_body} a piece has")
        end = start + length
        if len(self._buffer) < end:
            return None
        data = bytes(self._buffer[start:end])
        del self._buffer[:end]
        return make(data)


class RequestDecoder(_Decoder):
    """The serving side's: cuts requests."""

    def _cut(self):
        kind = self._buffer[:1]
        if kind == b"L":
            del self._buffer[:1]
            return WantList()
        if kind == b"P":
            if len(self._buffer) < 1 + _INDEX.size:
                return None
            (index,) = _INDEX.unpack_from(self._buffer, 1)
            del self._buffer[:1 + _INDEX.size]
            return WantPiece(index)
        raise PieceWireError(f"unknown request {bytes(kind)!r}")
