"""An allocation's log as `meshctl logs` shows it, from this node's disk: the local admin
socket and the `logs` member call (an allocation that ran on another member) both serve it.

Invariants:
- Only files under the supervisor's allocation directories are read (the id is checked).
- A tail is bounded (MAX_LOG_TAIL bytes); `lines` keeps the last that many lines of it
  (`meshctl logs --tail N`), `tail` the last that many bytes (what an older meshctl or
  member asks for). Following streams what is appended until the caller goes away.
"""

from __future__ import annotations

import contextlib
from typing import Any, Awaitable, Callable

import trio

from meshd.io import peer
from meshd.io.context import NodeContext
from meshd.io.logfiles import follow, read_tail

# Default bytes of log shown by `meshctl logs` without --tail: a screenful or two.
DEFAULT_LOG_TAIL = 64 * 1024
# Upper bound on --tail: the log files themselves are bounded by rotation anyway.
MAX_LOG_TAIL = 16 * 1024 * 1024


def _count(value: Any, limit: int) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit else None


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
    want_lines = _count(lines, MAX_LOG_TAIL)
    tail_bytes = _count(tail, MAX_LOG_TAIL) or DEFAULT_LOG_TAIL
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
    text = data.decode("utf-8", "replace")
    if not follow_:
        return {"data": text}
    await send({"data": text})
    async with contextlib.aclosing(follow(path)) as chunks:
        async for chunk in chunks:
            await send({"data": chunk.decode("utf-8", "replace")})
    return {"data": ""}
