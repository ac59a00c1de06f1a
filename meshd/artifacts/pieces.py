"""Fetching an artifact in pieces from several peers: which piece to ask whom, and what to
believe of what arrives.

An artifact of `size` bytes is cut into consecutive pieces of `piece_size` bytes (the last
one shorter); the piece list (the raw sha256 digests, in order) is checked against the
manifest's `pieces` digest before any piece is asked for. `PieceFetch` is the plan for one
artifact on one node: the shell runs one task per peer that asks `next_piece(peer, now)`,
fetches it, and tells `received` (the bytes) or `failed` (the transfer broke). It writes a
piece only when `received` said `Accepted`.

Invariants:
- Pure: no I/O, no clock (`now` is passed in).
- A piece is accepted only when its length and sha256 are the piece list's; a piece that
  does not match bans the peer that sent it for this fetch (it lies, or its copy is damaged),
  and the piece is asked of another. The fetch is `done` exactly when every piece was
  accepted, so the bytes written are the manifest's bytes, or the fetch is refused.
- Each missing piece is asked of one peer at a time until every missing piece is in flight;
  then (the end game) an idle peer may ask for a piece another is still sending, so one slow
  peer cannot hold back the last piece. A piece accepted twice is written once.
- A peer whose transfer breaks is asked again after RETRY_DELAY, at most MAX_FAILURES times
  in a row; `stuck` says why no piece can come when no peer is left that may be asked.
- A peer that says which pieces it holds (a partial copy: a member fetching it too) is asked
  only for those. Fresh pieces are asked in order from the fetch's `start`, which members
  fetching together choose apart, so that they hold different pieces and trade them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable

from meshd.artifacts.manifest import Manifest, pieces_digest

DIGEST_BYTES = 32
# Pieces asked of one peer at once: two keep its link busy while the next request crosses a
# LAN (the shell pipelines them), more only splits the same link.
MAX_IN_FLIGHT_PER_PEER = 2
# A peer whose transfer broke (it restarted, its link dropped) is asked again after this long:
# soon enough to resume after a short cut, long enough not to spin on one that is gone.
RETRY_DELAY = 2.0
# Broken transfers in a row after which a peer is given up on for this fetch.
MAX_FAILURES = 5


class PieceError(ValueError):
    """A piece list refused; the message is the reason."""


def piece_digests(piece_list: bytes, manifest: Manifest) -> tuple[bytes, ...]:
    """The piece digests of `piece_list` when it is the one `manifest` names; else PieceError."""
    if len(piece_list) != manifest.piece_count * DIGEST_BYTES:
        raise PieceError(f"piece list of {len(piece_list)} bytes, the manifest has {manifest.piece_count} pieces")
    if pieces_digest(piece_list) != manifest.pieces:
        raise PieceError("piece list does not match the manifest's (a lying or damaged peer)")
    return tuple(piece_list[i:i + DIGEST_BYTES] for i in range(0, len(piece_list), DIGEST_BYTES))


def piece_list_of(data: bytes, piece_size: int) -> bytes:
    """The piece list of `data` (tests, and the store hashing a file as it reads it)."""
    return b"".join(hashlib.sha256(data[i:i + piece_size]).digest() for i in range(0, len(data), piece_size))


@dataclass(frozen=True)
class Accepted:
    index: int
    offset: int  # where in the artifact its bytes go


@dataclass(frozen=True)
class Duplicate:
    """Accepted before (the end game asked two peers): nothing to write."""
    index: int


@dataclass(frozen=True)
class Rejected:
    index: int
    reason: str  # the peer that sent it is banned for this fetch


Outcome = Accepted | Duplicate | Rejected


@dataclass
class _Peer:
    have: frozenset[int] | None  # None: every piece
    in_flight: set[int] = field(default_factory=set)
    failures: int = 0
    retry_at: float = 0.0
    banned: str = ""  # why it is not asked any more


class PieceFetch:
    def __init__(self, manifest: Manifest, digests: tuple[bytes, ...], have: Iterable[int] = (),
                 start: int = 0) -> None:
        """`digests`: the checked piece list (piece_digests); `have`: pieces already on disk
        and verified (a resumed fetch); `start`: the piece this fetch asks for first, then the
        ones after it (members fetching together start apart, so each has pieces the others
        lack and they trade them instead of all asking the one holder for the same)."""
        self.start = start % max(1, manifest.piece_count)
        self.size, self.piece_size = manifest.size, manifest.piece_size
        self.count = manifest.piece_count
        self.digests = digests
        self.have: set[int] = {i for i in have if 0 <= i < self.count}
        self.peers: dict[str, _Peer] = {}
        self.rejected: list[str] = []  # what went wrong, for the reason of a stuck fetch

    # --- peers ---------------------------------------------------------------------------

    def add_peer(self, peer: str, have: Iterable[int] | None = None) -> None:
        """A peer that holds the artifact (have=None) or these pieces of it. A banned peer stays
        banned; one that failed before gets a fresh start."""
        known = self.peers.get(peer)
        held = None if have is None else frozenset(i for i in have if 0 <= i < self.count)
        if known is None:
            self.peers[peer] = _Peer(held)
        elif not known.banned:
            known.have, known.failures, known.retry_at = held, 0, 0.0

    def remove_peer(self, peer: str) -> None:
        """It no longer holds the artifact (or left the site): its pieces in flight are free."""
        self.peers.pop(peer, None)

    # --- the plan ------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return len(self.have) == self.count

    @property
    def fetched_bytes(self) -> int:
        return sum(self.length(i) for i in self.have)

    @property
    def progress(self) -> float:
        return 1.0 if not self.size else self.fetched_bytes / self.size

    def stuck(self, now: float) -> str | None:
        """Why no missing piece can come from any peer, or None while one can (or it is done)."""
        if self.done:
            return None
        missing = self.missing()
        usable = [p for p in self.peers.values() if not p.banned and p.failures < MAX_FAILURES
                  and (p.have is None or p.have & missing)]
        if usable:
            return None
        if not self.peers:
            return "no member of the site holds it"
        reasons = sorted({p.banned for p in self.peers.values() if p.banned}
                         | {"transfers kept breaking" for p in self.peers.values() if p.failures >= MAX_FAILURES})
        return "no peer can send the missing pieces: " + "; ".join(reasons or ["they hold other pieces"])

    def missing(self) -> set[int]:
        return set(range(self.count)) - self.have

    def next_piece(self, peer: str, now: float) -> int | None:
        """The piece `peer` should send next (it is then in flight), or None for now."""
        state = self.peers.get(peer)
        if state is None or state.banned or state.failures >= MAX_FAILURES or now < state.retry_at:
            return None
        if len(state.in_flight) >= MAX_IN_FLIGHT_PER_PEER or self.done:
            return None
        in_flight = set().union(*(p.in_flight for p in self.peers.values()))
        candidates = [i for i in self.missing() - state.in_flight if state.have is None or i in state.have]
        fresh = [i for i in candidates if i not in in_flight]
        # In order from `start`: members fetching the same artifact start at different pieces.
        order = lambda i: (i - self.start) % self.count  # noqa: E731
        pick = min(fresh, key=order) if fresh else (min(candidates, key=order) if candidates else None)
        if pick is not None:
            state.in_flight.add(pick)
        return pick

    def received(self, peer: str, index: int, data: bytes) -> Outcome:
        """`peer` sent `data` as piece `index`."""
        state = self.peers.get(peer)
        if state is not None:
            state.in_flight.discard(index)
        if not 0 <= index < self.count:
            return self._reject(peer, index, f"sent piece {index} of {self.count}")
        if index in self.have:
            return Duplicate(index)
        if len(data) != self.length(index):
            return self._reject(peer, index, f"sent {len(data)} bytes for piece {index}, which has {self.length(index)}")
        if hashlib.sha256(data).digest() != self.digests[index]:
            return self._reject(peer, index, f"sent piece {index} with the wrong digest")
        self.have.add(index)
        if state is not None:
            state.failures = 0
        return Accepted(index, index * self.piece_size)

    def failed(self, peer: str, index: int | None, reason: str, now: float) -> None:
        """The transfer from `peer` broke (of piece `index`, or before one was asked)."""
        state = self.peers.get(peer)
        if state is None:
            return
        if index is not None:
            state.in_flight.discard(index)
        else:
            state.in_flight.clear()
        state.failures += 1
        state.retry_at = now + RETRY_DELAY

    def length(self, index: int) -> int:
        return min(self.piece_size, self.size - index * self.piece_size)

    def _reject(self, peer: str, index: int, what: str) -> Rejected:
        state = self.peers.get(peer)
        reason = f"{peer} {what}"
        if state is not None:
            state.banned = reason
            state.in_flight.clear()
        self.rejected.append(reason)
        return Rejected(index, reason)
