"""Keep the daemon's resident memory small on boards with little RAM.

- `limit_malloc_arenas()` caps glibc's per-thread malloc arenas (each thread that allocates
  would otherwise get its own, mostly empty, arena); call it before any thread starts.
- `trim_heap()` hands freed heap pages back to the kernel. Start-up (imports, the join
  handshake, loading the Raft journal) leaves a lot of freed memory behind that glibc keeps.

Both are best-effort: on a libc without these calls (musl, macOS) they do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("meshd.memory")

M_ARENA_MAX = -8  # mallopt parameter number, from glibc's malloc.h
# Two arenas: the trio loop and the Raft thread allocate the most; the others share.
MALLOC_ARENAS = 2


def _libc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_ARENA_MAX, arenas))


def trim_heap() -> bool:
    """True when memory was handed back to the kernel."""
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    return bool(libc.malloc_trim(0))
