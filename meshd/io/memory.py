"""Keep the daemon's resident memory small on boards with little RAM.

- `tune_malloc()` caps glibc's per-thread malloc arenas (each thread that allocates would
  otherwise get its own, mostly empty, arena) and fixes its mmap and trim thresholds; call it
  before any thread starts.
- `trim_heap()` hands freed heap pages back to the kernel. Start-up (imports, the join
  handshake, loading the Raft journal) leaves a lot of freed memory behind that glibc keeps.

Both are best-effort: on a libc without these calls (musl, macOS) they do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("meshd.memory")

# mallopt parameter numbers, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
# Two arenas: the trio loop and the Raft thread allocate the most; the others share.
MALLOC_ARENAS = 2
# Blocks of at least this size get a mapping of their own, which goes back to the kernel the
# moment the block is freed: a snapshot's pickled slices, a document's full state, a sync
# peer's update. glibc starts at this very value but, left alone, raises it to the size of the
# largest such block freed (up to 32 MiB), after which every later block of that size is cut
# from the heap and its pages stay with the daemon until a trim. Setting it keeps it here.
MMAP_THRESHOLD = 128 * 1024
# Free memory at the top of the heap beyond this is handed back by the free() that makes it
# (glibc's default, which glibc would otherwise raise to twice the raised mmap threshold).
TRIM_THRESHOLD = 128 * 1024


def _libc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def tune_malloc(arenas: int = MALLOC_ARENAS) -> bool:
    """True when glibc took every setting (see the constants above)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    taken = [libc.mallopt(M_ARENA_MAX, arenas), libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD),
             libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)]
    return all(taken)


def trim_heap() -> bool:
    """True when memory was handed back to the kernel."""
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    return bool(libc.malloc_trim(0))
