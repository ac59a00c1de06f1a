"""The twin's network between sites: the real document sync sessions (crdt.sync) on simulated
links with delay, loss, bandwidth and cuts.

Each link carries one session pair, one session per end, holding that site's replica of the
mesh document (meshd.twin keeps one replica per site: its members' replicas follow their
leader's within a round trip on the LAN, which the twin does not model). A message leaves
when the link's queue in that direction is free, takes its size over the bandwidth to send,
then the link's delay to arrive. A lost packet is resent by TCP: each loss adds a
retransmission timeout, so loss shows as delay and never as a lost message, and messages of
one direction arrive in the order sent. A cut drops what is on the way and ends the sessions;
when it heals, both ends open new sessions (state vectors first, then the deltas each lacks),
as the daemon redials (meshd.io.mesh).

Invariants:
- Deterministic: every random draw comes from the run's seeded generator, in the order
  messages are sent; the same seed gives the same arrivals.
- A message of a session that ended (a cut) is never delivered.
- An update learnt from one link is passed on to the site's other live links, never back.
- Bytes are counted as sent on the wire (crdt.sync counts headers and compression).
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

from crdt.document import MeshDocument
from crdt.sync import Message, SyncSession
from meshd.twin.scenario import LinkSpec

# TCP's minimum retransmission timeout (Linux: 200 ms), or two round trips when longer.
MIN_RTO = 0.2


@dataclass
class Link:
    spec: LinkSpec
    cut: bool = False
    generation: int = 0  # sessions of an earlier generation ended with a cut
    sessions: dict[str, SyncSession] = field(default_factory=dict)  # site -> its end
    free_at: dict[str, float] = field(default_factory=dict)  # sending site -> when its queue is free
    last_arrival: dict[str, float] = field(default_factory=dict)  # sending site -> its last arrival
    sent: dict[str, int] = field(default_factory=dict)  # sending site -> bytes on the wire, all sessions

    def other(self, site: str) -> str:
        return self.spec.b if site == self.spec.a else self.spec.a


@dataclass(order=True)
class Transit:
    at: float
    serial: int
    link: tuple[str, str] = field(compare=False)
    generation: int = field(compare=False)
    to: str = field(compare=False)
    message: Message = field(compare=False)


class Network:
    def __init__(self, links: tuple[LinkSpec, ...], documents: dict[str, MeshDocument], rng: random.Random) -> None:
        self.links = {spec.key: Link(spec) for spec in links}
        self._of: dict[str, list[Link]] = {}  # site -> its links, in the scenario's order
        for link in self.links.values():
            for site in (link.spec.a, link.spec.b):
                self._of.setdefault(site, []).append(link)
        self.documents = documents
        self.rng = rng
        self.in_flight: list[Transit] = []
        self._serial = 0
        self.changed: set[str] = set()  # sites whose replica an arrival changed
        self.refused: list[tuple[str, str]] = []  # (site, reason): malformed messages (a bug, never expected)

    def of(self, site: str) -> list[Link]:
        return self._of.get(site, [])

    # --- sessions --------------------------------------------------------------------------

    def open(self, now: float) -> None:
        """Every link that is not cut has its sessions (at the start, and after a heal)."""
        for link in self.links.values():
            if link.cut or link.sessions:
                continue
            for site in (link.spec.a, link.spec.b):
                link.sessions[site] = SyncSession(self.documents[site], peer=link.other(site))
            for site in (link.spec.a, link.spec.b):
                self.send(link, site, link.sessions[site].open(), now)

    def cut(self, key: tuple[str, str]) -> None:
        link = self.links[key]
        link.cut, link.sessions = True, {}
        link.generation += 1
        link.free_at.clear()
        link.last_arrival.clear()

    def heal(self, key: tuple[str, str], now: float) -> None:
        self.links[key].cut = False
        self.open(now)

    # --- messages --------------------------------------------------------------------------

    def send(self, link: Link, site: str, messages: list[Message], now: float) -> None:
        spec = link.spec
        for message in messages:
            size = message.size
            start = max(now, link.free_at.get(site, 0.0))
            busy = size * 8 / spec.bandwidth if spec.bandwidth else 0.0
            link.free_at[site] = start + busy
            delay = spec.delay
            while spec.loss and self.rng.random() < spec.loss:
                delay += max(MIN_RTO, 4 * spec.delay)
            at = max(start + busy + delay, link.last_arrival.get(site, 0.0))
            link.last_arrival[site] = at
            link.sent[site] = link.sent.get(site, 0) + size
            self._serial += 1
            heapq.heappush(self.in_flight, Transit(at, self._serial, spec.key, link.generation, link.other(site),
                                                   message))

    def push(self, site: str, update: bytes, now: float, besides: tuple[str, str] | None = None) -> None:
        """A change of `site`'s replica, to every live link but the one it came from."""
        for link in self.of(site):
            if link.cut or link.spec.key == besides or site not in link.sessions:
                continue
            self.send(link, site, link.sessions[site].push(update), now)

    def in_flight_between(self, key: tuple[str, str]) -> bool:
        generation = self.links[key].generation
        return any(t.link == key and t.generation == generation for t in self.in_flight)

    def next_arrival(self) -> float | None:
        return self.in_flight[0].at if self.in_flight else None

    def deliver(self, now: float) -> int:
        """Every message due by `now`, in arrival order; the number delivered."""
        count = 0
        while self.in_flight and self.in_flight[0].at <= now:
            transit = heapq.heappop(self.in_flight)
            link = self.links[transit.link]
            if transit.generation != link.generation or transit.to not in link.sessions:
                continue  # its session ended with a cut
            count += 1
            session = link.sessions[transit.to]
            try:
                replies, update = session.receive(transit.message, transit.at)
            except ValueError as e:
                self.refused.append((transit.to, str(e)))
                continue
            self.send(link, transit.to, replies, transit.at)
            if update is not None:
                self.changed.add(transit.to)
                self.push(transit.to, update, transit.at, besides=link.spec.key)
        return count

    def bytes_between(self) -> dict[str, int]:
        """Bytes on the wire per link ("a-b"), both ways."""
        return {f"{a}-{b}": sum(link.sent.values()) for (a, b), link in sorted(self.links.items())}
