"""Ranking: among the feasible nodes, which one takes the next replica.

Invariants:
- Pure and total: every algorithm is a sort key over `Candidate`, ending in node_id, so
  two nodes never tie and the same candidates always rank the same way.
- Counts and free memory in a `Candidate` already include the placements made so far by
  the plan in progress (see meshd.placement.feasible.node_usage).
- `spread` (the default) keeps replicas of one app apart, then evens out load; `binpack`
  fills the busiest nodes first, leaving whole nodes free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

DEFAULT_ALGORITHM = "spread"


@dataclass(frozen=True)
class Candidate:
    node_id: str
    app_allocs: int  # live allocations of the app being placed on this node
    allocs: int  # live allocations of any app on this node
    free_mem_mb: int  # memory still free for placement (see feasible.free_mem_mb)


RankKey = Callable[[Candidate], tuple]


def spread(candidate: Candidate) -> tuple:
    """Fewest replicas of this app, then fewest allocations, then most free memory."""
    return (candidate.app_allocs, candidate.allocs, -candidate.free_mem_mb, candidate.node_id)


def binpack(candidate: Candidate) -> tuple:
    """Most allocations (fill nodes up), then least free memory (tightest fit)."""
    return (-candidate.allocs, candidate.free_mem_mb, candidate.node_id)


ALGORITHMS: dict[str, RankKey] = {"spread": spread, "binpack": binpack}


def rank_key(algorithm: str) -> RankKey:
    try:
        return ALGORITHMS[algorithm]
    except KeyError:
        known = ", ".join(sorted(ALGORITHMS))
        raise ValueError(f"unknown placement algorithm {algorithm!r}, known: {known}") from None


def rank(candidates: Iterable[Candidate], algorithm: str = DEFAULT_ALGORITHM) -> list[Candidate]:
    """Candidates best first."""
    return sorted(candidates, key=rank_key(algorithm))
