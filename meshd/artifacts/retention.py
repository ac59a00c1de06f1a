"""Which artifacts a node's store may drop, and whether a new one fits its quota.

The store holds what this node's workloads need, what the site's kept app versions pin (a
rollback must find its artifacts without a fetch over a thin uplink), and, while there is
room, everything else it fetched or was pushed (other members fetch from it).

Invariants:
- Pure: no I/O, no clock.
- `make_room` never names a pinned artifact, whatever the quota: a pinned version's bytes
  are removed only after no kept version pins them (then least recently used first).
- When the room cannot be made without removing a pinned artifact, the answer is a
  `NoRoom` whose reason says the quota and what pins the space; nothing is removed then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class Held:
    size: int  # bytes on disk: the blob, its pieces, an unpacked tree
    used_at: float  # last time a workload started with it, or it arrived


@dataclass(frozen=True)
class Room:
    remove: tuple[str, ...]  # digests to drop, least recently used first


@dataclass(frozen=True)
class NoRoom:
    reason: str


def make_room(held: Mapping[str, Held], pinned: frozenset[str], quota: int, need: int) -> Room | NoRoom:
    """What to drop so that `need` more bytes fit in `quota`."""
    used = sum(h.size for h in held.values())
    if used + need <= quota:
        return Room(())
    if need > quota:
        return NoRoom(f"{_mb(need)} is larger than the artifact quota of {_mb(quota)}")
    drop: list[str] = []
    for digest, h in sorted(((d, h) for d, h in held.items() if d not in pinned), key=lambda x: (x[1].used_at, x[0])):
        if used + need <= quota:
            break
        drop.append(digest)
        used -= h.size
    if used + need > quota:
        kept = sum(h.size for d, h in held.items() if d in pinned)
        return NoRoom(f"{_mb(need)} does not fit in the artifact quota of {_mb(quota)}: "
                      f"{_mb(kept)} is pinned by kept app versions")
    return Room(tuple(drop))


def over_quota(held: Mapping[str, Held], pinned: frozenset[str], quota: int) -> tuple[str, ...]:
    """What to drop to be back within `quota` (after the quota shrank): unpinned, oldest first."""
    outcome = make_room(held, pinned, quota, 0)
    return outcome.remove if isinstance(outcome, Room) else tuple(d for d in held if d not in pinned)


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size} bytes"
