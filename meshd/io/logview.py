"""An allocation's log as `meshctl logs` shows it, from this node's disk: the local admin
socket and the `logs` member call (an allocation that ran on another member) both serve it.

Invariants:
- Only files under the supervisor's allocation directories are read (the id is checked).
- A tail is bounded (MAX_LOG_TAIL); following streams what is appended until the caller
  goes away.
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


async def serve_local_logs(ctx: NodeContext, alloc_id: str, follow_: bool, tail: Any,
                           send: Callable[[dict], Awaitable[None]]) -> dict:
    """Log text of an allocation that ran on this node (`meshctl logs`, local or via a member call)."""
    if ctx.supervisor is None:
        raise peer.PeerError("supervisor not running")
    tail_bytes = tail if isinstance(tail, int) and not isinstance(tail, bool) and 0 < tail <= MAX_LOG_TAIL \
        else DEFAULT_LOG_TAIL
    try:
        path = ctx.supervisor.log_path(alloc_id)
    except ValueError as e:
        raise peer.PeerError(str(e)) from None
    if not path.parent.exists():
        raise peer.PeerError(f"no logs for allocation {alloc_id} on {ctx.config.name}")
    text = (await trio.to_thread.run_sync(read_tail, path, tail_bytes)).decode("utf-8", "replace")
    if not follow_:
        return {"data": text}
    await send({"data": text})
    async with contextlib.aclosing(follow(path)) as chunks:
        async for chunk in chunks:
            await send({"data": chunk.decode("utf-8", "replace")})
    return {"data": ""}
