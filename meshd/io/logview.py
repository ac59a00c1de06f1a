"""An allocation's log as `meshctl logs` shows it, from this node's disk: the local admin
socket and the `logs` member call (an allocation that ran on another member) both serve it.

Invariants:
- Only files under the supervisor's allocation directories are read (the id is checked).
- A tail is bounded (MAX_LOG_TAIL bytes); `lines` keeps the last that many lines of it
  (`meshctl logs --tail N`, at most MAX_TAIL_LINES), `tail` the last that many bytes (what an
  older meshctl or member asks for). A count out of range is refused with its bounds.
  Following streams what is appended until the caller goes away.
- Whatever the size of the answer, it is sent: text goes out in pieces of at most
  SEND_CHUNK bytes (stream items, the last piece in the final answer), each of which fits a
  frame however it escapes, and multi-byte characters are never cut between pieces. The log
  files are the only buffer: a follower that reads slowly is served at its own pace from
  disk, and holds no more memory than one piece.
"""

from __future__ import annotations

import codecs
import contextlib
from typing import Any, Awaitable, Callable

import trio

from meshd.io import peer
from meshd.io.context import NodeContext
from meshd.io.logfiles import follow, read_tail
from meshd.wire import ADMIN_MAX_FRAME

# Default bytes of log shown by `meshctl logs` without --tail: a screenful or two.
DEFAULT_LOG_TAIL = 64 * 1024
# Upper bound on --tail: the log files themselves are bounded by rotation anyway.
MAX_LOG_TAIL = 16 * 1024 * 1024
# --tail N lines: no more than MAX_LOG_TAIL bytes are read for them, which hold fewer lines
# than this unless the lines are nearly empty.
MAX_TAIL_LINES = 1_000_000
# Bytes of log per frame sent: JSON escapes a byte into at most 6 characters (\u00XX), so a
# piece always fits the smallest frame it travels in (the admin socket's).
SEND_CHUNK = 64 * 1024
assert 6 * SEND_CHUNK + 1024 < ADMIN_MAX_FRAME


def _count(value: Any, limit: int, what: str) -> int | None:
    """A count the caller gave (None: not given); PeerError, with the bounds, if out of range."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit:
        return value
    raise peer.PeerError(f"--tail must be a number of {what} from 0 to {limit}, not {str(value)[:40]}")


class _Pieces:
    """Log bytes as text pieces of at most SEND_CHUNK bytes, decoded across piece boundaries."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def split(self, data: bytes, final: bool = False) -> list[str]:
        pieces = [self._decoder.decode(data[i:i + SEND_CHUNK]) for i in range(0, len(data), SEND_CHUNK)]
        if final:
            pieces.append(self._decoder.decode(b"", final=True))
        return [p for p in pieces if p]


def last_lines(path, lines: int) -> bytes:
    """The last `lines` lines of the log (across its rotated files), reading no more than
    needed: DEFAULT_LOG_TAIL bytes first, more while that holds fewer lines, up to MAX_LOG_TAIL."""
    if lines <= 0:
        return b""
    size = DEFAULT_LOG_TAIL
    while True:
        data = read_tail(path, size)
        if data.count(b"\n", 0, len(data) - 1) >= lines or len(data) < size or size >= MAX_LOG_TAIL:
            break
        size = min(size * 4, MAX_LOG_TAIL)
    kept = data.splitlines(keepends=True)[-lines:]
    return b"".join(kept)


async def serve_local_logs(ctx: NodeContext, alloc_id: str, follow_: bool, tail: Any,
                           send: Callable[[dict], Awaitable[None]], lines: Any = None) -> dict:
    """Log text of an allocation that ran on this node (`meshctl logs`, local or via a member call)."""
    if ctx.supervisor is None:
        raise peer.PeerError("supervisor not running")
    want_lines = _count(lines, MAX_TAIL_LINES, "lines")
    tail_bytes = _count(tail, MAX_LOG_TAIL, "bytes")
    if tail_bytes is None:
        tail_bytes = DEFAULT_LOG_TAIL
    try:
        path = ctx.supervisor.log_path(alloc_id)
    except ValueError as e:
        raise peer.PeerError(str(e)) from None
    if not path.parent.exists():
        raise peer.PeerError(f"no logs for allocation {alloc_id} on {ctx.config.name}")
    if want_lines is not None:
        data = await trio.to_thread.run_sync(last_lines, path, want_lines)
    else:
        data = await trio.to_thread.run_sync(read_tail, path, tail_bytes)
    pieces = _Pieces()
    if not follow_:
        *first, last = pieces.split(data, final=True) or [""]
        for piece in first:
            await send({"data": piece})
        return {"data": last}
    for piece in pieces.split(data):
        await send({"data": piece})
    async with contextlib.aclosing(follow(path)) as chunks:
        async for chunk in chunks:
            for piece in pieces.split(chunk):
                await send({"data": piece})
    return {"data": ""}
