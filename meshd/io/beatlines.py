"""The leader's side of non-voters' beats (meshd.io.services.beats sends them): the beat
connections it holds, and when each last carried a beat.

A beat is dated by the kernel's arrival time of the connection's data (peer.Arrivals,
TCP_INFO), asked when the leader looks (`items`), so it need not be read the moment it
arrives: the connections are read together once per DRAIN_PERIOD, each by its own task woken
by one shared slot (meshd.io.wakeup), instead of the leader's loop waking for every beat of
every non-voter (21 a second at 12 members, each costing more than the beat it carried).

Invariants:
- A connection counts only once its first frame, read at once, was a beat; a frame that is
  not a beat, the end of the stream, or BEAT_SILENCE without one ends the line,
  and with it the node's contacts through it.
- Bytes count from their arrival until the next drain reads and checks them: at most one
  DRAIN_PERIOD of data that is not yet known to be a beat (only a party inside the TCP
  connection could send such bytes; an authenticated member may beat anyway).
- One line per node: a new connection of the same node replaces the older one.
- Where the kernel gives no arrival time, a beat is dated when a drain reads it.
"""

from __future__ import annotations

import time

from meshd.io import peer
from meshd.io.wakeup import slot_event

# How often the beat connections are read: often enough that a backlog stays a few frames
# (a sender beats BEATS_PER_LEASE times a lease), rarely enough that reading costs the idle
# leader one wake a second for all non-voters. Liveness does not wait for it (arrival times).
DRAIN_PERIOD = 1.0
# A beat connection silent this long is ended (the sender beats several times a lease; a dead
# one is noticed by its lease long before, this only frees the socket).
BEAT_SILENCE = 10.0
# Frames read from one connection per drain at most: a sender beats a few times a period,
# so more means a backlog after a stall (read at the next drains) or a peer that floods (it
# waits on TCP's window, not on this node's loop).
MAX_FRAMES_PER_DRAIN = 16


class BeatLine:
    def __init__(self, conn: peer.FramedStream) -> None:
        self.arrivals = peer.Arrivals(conn.stream)
        self.read_at = time.monotonic()  # the last beat read (monotonic)

    def heard(self, now: float) -> float:
        """When the last beat arrived, on time.monotonic()'s clock (`now`)."""
        age = self.arrivals.last_data_age()
        return self.read_at if age is None else now - age


class BeatLines:
    """node id -> its live beat line; `items()` is what the leader's liveness reads."""

    def __init__(self) -> None:
        self._lines: dict[str, BeatLine] = {}

    def items(self) -> list[tuple[str, float]]:
        now = time.monotonic()
        return [(node_id, line.heard(now)) for node_id, line in self._lines.items()]

    def __len__(self) -> int:
        return len(self._lines)

    async def take(self, conn: peer.FramedStream, node_id: str, silence: float = BEAT_SILENCE) -> None:
        """Serve one beat connection until it ends; raises peer.PeerError with the reason."""
        message = await conn.receive(timeout=silence)
        _check(message)
        line = BeatLine(conn)
        self._lines[node_id] = line
        try:
            while True:
                await slot_event(DRAIN_PERIOD).wait()
                if self._lines.get(node_id) is not line:
                    raise peer.PeerError("a newer beat connection of this node took over")
                taken = 0
                while taken < MAX_FRAMES_PER_DRAIN and (conn.has_frame() or line.arrivals.readable()):
                    _check(await conn.receive(timeout=silence))
                    taken += 1
                now = time.monotonic()
                if taken:
                    line.read_at = now
                elif now - line.read_at > silence:
                    raise peer.PeerError(f"no beat for {silence:g} s")
        finally:
            if self._lines.get(node_id) is line:
                del self._lines[node_id]


def _check(message: dict) -> None:
    if message.get("type") != "beat":
        raise peer.PeerError(f"expected beat, got {message.get('type')!r}")
