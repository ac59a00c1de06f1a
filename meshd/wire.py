"""Length-prefixed JSON frames: the codec of the admin socket and the peer port.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of UTF-8 JSON
whose top-level value is an object.

Invariants:
- Pure: no I/O, no clock. Callers move the bytes; this module only cuts and parses them.
- `FrameDecoder.feed` returns only complete, well-formed frames (dicts) and raises nothing
  but `FrameError`, whatever bytes it is given.
- A declared length above the decoder's limit is refused as soon as the 4-byte header is
  seen; the body is never buffered. The decoder therefore holds at most
  `max_frame + 4` bytes plus one read.
- Nesting is bounded before the JSON parser runs, so hostile input cannot drive the
  parser's recursion.
- NaN and Infinity are not JSON: they are refused on both sides.
- After its first error a decoder stays failed: a byte stream that went wrong once cannot be
  resynchronised, so the connection carrying it must be dropped.
- `encode_frame` emits only frames that a decoder with the same limit accepts.
"""

from __future__ import annotations

import json
import re
import struct
from itertools import accumulate
from typing import Any

# The admin socket carries one request and its replies: app specs and listings are far
# smaller than this, and a local client has no business sending more.
ADMIN_MAX_FRAME = 1 * 1024 * 1024

# Peer messages carry CRDT deltas and state snapshots of a whole site; 4 MiB leaves room for
# a large site's full state while bounding what an unauthenticated peer can make us buffer.
PEER_MAX_FRAME = 4 * 1024 * 1024

# Deeper than any message meshd builds (an app spec is 4 levels), far below the point where
# Python's JSON parser would recurse into a RecursionError.
MAX_NESTING_DEPTH = 64

_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size
# The length field is 32 bits: nothing larger can be framed at all.
_LENGTH_FIELD_MAX = 2**32 - 1

# A JSON string literal as the tokenizer sees it (possessive, so no backtracking on long
# strings). Removing them leaves only structural characters that count towards nesting.
_STRING_LITERAL = re.compile(r'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]++")
_BRACKET_DELTA = {"[": 1, "{": 1, "]": -1, "}": -1}


class FrameError(ValueError):
    """A frame that cannot be encoded or decoded; `reason` says why, for logs and the CLI."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def nesting_depth(text: str) -> int:
    """How deep arrays and objects nest in JSON `text` (0 for a scalar).

    Exact for valid JSON. For invalid JSON it is the deepest nesting the parser could reach
    before it stops at the first error, which is what bounding its recursion needs.
    """
    brackets = _NOT_BRACKET.sub("", _STRING_LITERAL.sub("", text))
    if not brackets:
        return 0
    return max(0, max(accumulate(map(_BRACKET_DELTA.__getitem__, brackets))))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def encode_frame(obj: dict, *, max_frame: int = PEER_MAX_FRAME) -> bytes:
    """Encode one JSON object as a frame; FrameError if it is not encodable or too large."""
    if not isinstance(obj, dict):
        raise FrameError(f"a frame must hold a JSON object, not {type(obj).__name__}")
    try:
        # ensure_ascii: the body is plain ASCII, so any Python str (even a lone surrogate
        # taken from a peer's \\ud800 escape) encodes, and the bytes are valid UTF-8.
        text = json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise FrameError(f"cannot encode frame: {exc}") from None
    depth = nesting_depth(text)
    if depth > MAX_NESTING_DEPTH:
        raise FrameError(f"frame nests {depth} levels deep, limit {MAX_NESTING_DEPTH}")
    body = text.encode("ascii")
    limit = min(max_frame, _LENGTH_FIELD_MAX)
    if len(body) > limit:
        raise FrameError(f"frame of {len(body)} bytes exceeds limit {limit}")
    return _HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict:
    """Parse one frame body (without its header) into a dict; FrameError if it is not one."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FrameError(f"frame is not valid UTF-8 (byte {exc.start})") from None
    depth = nesting_depth(text)
    if depth > MAX_NESTING_DEPTH:
        raise FrameError(f"frame nests {depth} levels deep, limit {MAX_NESTING_DEPTH}")
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise FrameError("frame nests too deeply to parse") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, oversized integer literals
        raise FrameError(f"frame is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise FrameError(f"frame holds a JSON {_json_kind(value)}, not an object")
    return value


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array"


class FrameDecoder:
    """Cuts a byte stream into frames. Feed it whatever the socket returned."""

    def __init__(self, max_frame: int) -> None:
        if max_frame < 0:
            raise ValueError(f"max_frame must be >= 0, got {max_frame}")
        self.max_frame = min(max_frame, _LENGTH_FIELD_MAX)
        self._buffer = bytearray()
        self._error: FrameError | None = None

    @property
    def failed(self) -> FrameError | None:
        """The error that stopped this decoder, or None while it is healthy."""
        return self._error

    @property
    def buffered(self) -> int:
        """Bytes received that do not form a complete frame yet."""
        return len(self._buffer)

    def take_buffered(self) -> bytes:
        """Hand over the bytes not yet cut into frames (the stream switches to another codec
        after its last frame) and forget them."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def feed(self, data: bytes) -> list[dict]:
        """Add bytes; return the frames they complete, in order.

        On bad input raise FrameError; frames completed earlier in the same call are
        discarded with the stream, and every later call raises the same error.
        """
        if self._error is not None:
            raise FrameError(f"stream already failed: {self._error.reason}")
        self._buffer += data
        frames: list[dict] = []
        try:
            while len(self._buffer) >= HEADER_SIZE:
                (length,) = _HEADER.unpack_from(self._buffer)
                if length > self.max_frame:
                    raise FrameError(f"frame of {length} bytes exceeds limit {self.max_frame}")
                end = HEADER_SIZE + length
                if len(self._buffer) < end:
                    break
                body = bytes(self._buffer[HEADER_SIZE:end])
                del self._buffer[:end]
                frames.append(decode_body(body))
        except FrameError as exc:
            self._error = exc
            self._buffer = bytearray()
            raise
        return frames
