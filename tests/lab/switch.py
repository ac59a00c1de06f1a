"""The lab's Ethernet segments: a userspace hub per site over TAP devices, with impairments.

Each lab host's eth0 is a TAP device whose other end is a file descriptor held here. A frame
read from one port is flooded to every other port of the same segment (a hub: hosts' kernels
drop unicast frames not addressed to them; multicast, hence mDNS, reaches everyone), unless:
- the two ports are on different sides of a partition (`Impairments.groups`): dropped, both
  ways, like a cut cable between two switches;
- the sending port has a link impairment (`Impairments.links`): the frame is lost with the
  given probability, else delivered after the given delay. Like netem on the host's egress
  queue, one decision per frame, and order is kept.

Why not a kernel bridge with `tc netem`: the kernel these labs run on is built without
sch_netem (CONFIG_NET_SCH_NETEM is not set), so delay and loss could not be had there; one
place that forwards every frame also makes partitions a set assignment instead of rules.

Invariants:
- `fate()` is pure: (impairments, source, destination, draw) -> drop or delay.
- The forwarding thread never blocks on one port: writes that fail (interface down, queue
  full) drop that frame for that port only.
"""

from __future__ import annotations

import fcntl
import heapq
import itertools
import os
import random
import select
import struct
import threading
import time
from dataclasses import dataclass, field

TUNSETIFF = 0x400454CA  # linux/if_tun.h
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
MAX_FRAME = 65536  # a TAP read returns one frame; the MTU is 1500, GSO never reaches a TAP without offloads


@dataclass(frozen=True)
class Link:
    delay: float = 0.0  # seconds added to every frame the port sends
    loss: float = 0.0  # probability in [0, 1) that a frame the port sends is lost


@dataclass
class Impairments:
    groups: dict[str, int] = field(default_factory=dict)  # port -> side of the partition; absent: reaches all
    links: dict[str, Link] = field(default_factory=dict)


def fate(imp: Impairments, source: str, destination: str, draw: float) -> float | None:
    """None when the frame from `source` never reaches `destination`, else its delay (s).
    `draw`: one uniform [0, 1) sample per frame (the same for every destination)."""
    side_a, side_b = imp.groups.get(source), imp.groups.get(destination)
    if side_a is not None and side_b is not None and side_a != side_b:
        return None
    link = imp.links.get(source)
    if link is None:
        return 0.0
    if draw < link.loss:
        return None
    return link.delay


def open_tap(name: str) -> int:
    """A new TAP device `name` in the caller's network namespace; its frames come and go on
    the returned fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


class Segments:
    """Every site's segment; ports are added while the lab is built, before `start()`."""

    def __init__(self, seed: int = 0) -> None:
        self.ports: dict[str, tuple[int, str]] = {}  # port -> (fd, segment)
        self.impairments = Impairments()
        self._lock = threading.Lock()  # guards impairments swaps against the thread's reads
        self._rng = random.Random(seed)
        self._stop_r, self._stop_w = os.pipe()
        self._thread: threading.Thread | None = None
        self.forwarded = 0
        self.dropped = 0

    def add_port(self, port: str, fd: int, segment: str) -> None:
        self.ports[port] = (fd, segment)

    def set(self, groups: dict[str, int] | None = None, links: dict[str, Link] | None = None) -> None:
        with self._lock:
            self.impairments = Impairments(
                groups=dict(self.impairments.groups if groups is None else groups),
                links=dict(self.impairments.links if links is None else links))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lab-switch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._stop_r < 0:
            return
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join(5)
            self._thread = None
        for fd, _ in self.ports.values():
            os.close(fd)
        self.ports.clear()
        os.close(self._stop_r)
        os.close(self._stop_w)
        self._stop_r = self._stop_w = -1

    def _run(self) -> None:
        poller = select.epoll()
        by_fd = {fd: (port, segment) for port, (fd, segment) in self.ports.items()}
        for fd in by_fd:
            poller.register(fd, select.EPOLLIN)
        poller.register(self._stop_r, select.EPOLLIN)
        pending: list[tuple[float, int, int, bytes]] = []  # (due, seq, fd, frame)
        seq = itertools.count()
        try:
            while True:
                timeout = -1.0 if not pending else max(0.0, pending[0][0] - time.monotonic())
                for fd, _ in poller.poll(timeout):
                    if fd == self._stop_r:
                        return
                    self._drain(fd, by_fd, pending, seq)
                now = time.monotonic()
                while pending and pending[0][0] <= now:
                    _, _, fd, frame = heapq.heappop(pending)
                    self._write(fd, frame)
        finally:
            poller.close()

    def _drain(self, fd: int, by_fd, pending, seq) -> None:
        source, segment = by_fd[fd]
        with self._lock:
            imp = self.impairments
        for _ in range(64):  # bounded, so one chatty port cannot starve the others
            try:
                frame = os.read(fd, MAX_FRAME)
            except (BlockingIOError, OSError):
                return
            draw = self._rng.random()
            now = time.monotonic()
            for other, (other_fd, other_segment) in self.ports.items():
                if other == source or other_segment != segment:
                    continue
                delay = fate(imp, source, other, draw)
                if delay is None:
                    self.dropped += 1
                elif delay == 0.0:
                    self._write(other_fd, frame)
                else:
                    heapq.heappush(pending, (now + delay, next(seq), other_fd, frame))

    def _write(self, fd: int, frame: bytes) -> None:
        try:
            os.write(fd, frame)
            self.forwarded += 1
        except OSError:  # the host's interface is down or its queue full: the frame is lost
            self.dropped += 1
