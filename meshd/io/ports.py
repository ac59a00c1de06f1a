"""Free ports for listeners a daemon (or a test) binds a moment after choosing them.

Invariant: a port handed out is free when chosen and lies outside the kernel's ephemeral
range whenever that range leaves room. A port taken from the ephemeral range (bind to 0) can
be given, between choosing and binding, to any outgoing connection of this host as its local
port: the daemon's own connection to its TPM, to a peer, to the mesh. The listener's bind
then fails; pysyncobj would retry it forever. Ports outside that range are only ever taken by
another listener, which the start-up port check reports.
"""

from __future__ import annotations

import random
import socket
from typing import Collection

EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
DEFAULT_EPHEMERAL = (32768, 60999)  # Linux's default, when the file cannot be read
LOWEST = 10_000  # below this live well-known and registered services a host may start later
PICKS = 64  # random tries before falling back to the kernel's choice; each is one bind


def ephemeral_range(path: str = EPHEMERAL_RANGE_FILE) -> tuple[int, int]:
    try:
        with open(path) as f:
            low, high = (int(x) for x in f.read().split()[:2])
        return low, high
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL


def candidate_ranges(ephemeral: tuple[int, int]) -> list[range]:
    """The port ranges outside `ephemeral` worth choosing from (may be empty)."""
    low, high = ephemeral
    ranges = [range(LOWEST, low), range(high + 1, 65536)]
    return [r for r in ranges if len(r) > 0]


def free_port(ip: str = "127.0.0.1", *, ephemeral: tuple[int, int] | None = None, avoid: Collection[int] = ()) -> int:
    """A TCP port free on `ip` now, outside the ephemeral range where possible, and not one of
    `avoid` (ports already picked but not bound yet: a probe frees its port again at once)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    ranges = candidate_ranges(ephemeral or ephemeral_range())
    sizes = [len(r) for r in ranges]
    for _ in range(PICKS if ranges else 0):
        r = random.choices(ranges, weights=sizes)[0]
        port = random.choice(r)
        if port in avoid:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((ip, port))
            except OSError:
                continue
            return port
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
            if s.getsockname()[1] not in avoid:
                return s.getsockname()[1]
