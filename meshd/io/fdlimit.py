"""The daemon's file-descriptor limit, raised at start to what it may need.

What one daemon holds open at most: 256 peer connections, 128 unauthenticated and a site's
worth of Raft connections, 128 admin connections, the document store, logs and journal,
and three descriptors (stdin/out/err pipes) per workload while it starts, plus what zeroconf
and trio use. WANTED leaves room for all of that several times over; the distribution's
default soft limit (1024) does not once floods of two ports coincide.

Invariants:
- Only the soft limit is raised, never above the hard limit (that needs privileges the
  daemon does not ask for); a hard limit below NEEDED is reported, not fatal: the listeners
  then shed connections at accept (meshd.io.raftport, peer admission) rather than close.
"""

from __future__ import annotations

import resource

# Raise to this when the hard limit allows: a few times what the bounds above add up to.
WANTED = 16384
# Below this the bounds above cannot all be met at once.
NEEDED = 1024


def raise_fd_limit(wanted: int = WANTED) -> tuple[int, int, int]:
    """Raise the soft RLIMIT_NOFILE towards `wanted`: (before, after, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    after, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, after, hard
