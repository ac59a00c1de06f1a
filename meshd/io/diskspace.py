"""How full the data dir's filesystem is, asked before a write that must be durable.

A full filesystem is an ordinary state for an edge device (logs, a model that did not fit, a
worn card shrinking): a write this node cannot make durable is refused before anything is
acknowledged or applied, with the reason, and the daemon keeps serving reads and takes writes
again on its own once space is freed, without a restart.

Invariants:
- Reads only (statvfs); the one decision is `full_problem`, from the bytes free.
- DiskFull is an OSError (ENOSPC), so code that already handles failed writes handles it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

# Writes are refused while less than this is free: a Raft journal grows by doubling (the next
# step of a journal of a few MB) and a document snapshot is written whole beside the old one;
# 4 MiB keeps both possible, and is nothing beside any real disk.
RESERVE_BYTES = 4 * 1024 * 1024
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(OSError):
    """A write was refused because the data dir's filesystem is full; the message says so."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def full_problem(path: Path) -> str | None:
    """Why a durable write under `path` is refused now (its filesystem is full), or None."""
    try:
        free = free_bytes(path)
    except OSError:
        return None  # not there yet (a node that never wrote): the write itself will say
    if free < RESERVE_BYTES:
        return (f"the filesystem of {path} is full ({free // 1024} KiB free, {RESERVE_BYTES // (1024 * 1024)} MiB "
                "needed): nothing was changed; free some space and try again")
    return None


def is_full(error: BaseException) -> bool:
    """A write failed because the filesystem (or the user's quota) is full."""
    return isinstance(error, OSError) and error.errno in FULL_ERRNOS


def refused(path: Path, error: OSError) -> DiskFull:
    """The DiskFull for a write under `path` that failed with `error` (is_full)."""
    return DiskFull(full_problem(path) or f"the filesystem of {path} is full ({error.strerror}): nothing was "
                                          "changed; free some space and try again")
