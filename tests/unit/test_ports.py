"""meshd.io.ports: ports chosen for later binding stay out of the kernel's ephemeral range."""

from __future__ import annotations

import socket

from meshd.io import ports
from meshd.io.ports import LOWEST, candidate_ranges, ephemeral_range, free_port


def test_the_ephemeral_range_is_read_from_the_kernel_or_defaults(tmp_path):
    f = tmp_path / "range"
    f.write_text("40000\t50000\n")
    assert ephemeral_range(str(f)) == (40000, 50000)
    assert ephemeral_range(str(tmp_path / "missing")) == (32768, 60999)
    f.write_text("junk")
    assert ephemeral_range(str(f)) == (32768, 60999)


def test_a_chosen_port_is_free_and_outside_the_ephemeral_range():
    low, high = ephemeral_range()
    for _ in range(50):
        port = free_port("127.0.0.1")
        assert LOWEST <= port < low or port > high
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free: a listener can have it


def test_with_no_room_outside_the_range_the_kernel_chooses():
    assert candidate_ranges((1024, 65535)) == []
    port = free_port("127.0.0.1", ephemeral=(1024, 65535))
    assert 0 < port < 65536


def test_a_port_held_by_a_listener_is_never_chosen(monkeypatch):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        taken = held.getsockname()[1]
        # The only candidate is the held port: every pick fails and the kernel chooses.
        monkeypatch.setattr(ports, "LOWEST", taken)
        assert candidate_ranges((taken + 1, 65535)) == [range(taken, taken + 1)]
        assert free_port("127.0.0.1", ephemeral=(taken + 1, 65535)) != taken


def test_a_port_picked_already_but_not_bound_yet_is_never_chosen_again(monkeypatch):
    # A node picks its peer and Raft ports one after the other; each probe frees its port at
    # once, so the second pick must be told the first (two equal picks would clash at bind).
    first = free_port("127.0.0.1")
    monkeypatch.setattr(ports, "LOWEST", first)
    only = (first + 1, 65535)  # the only candidate outside the range is `first`
    assert candidate_ranges(only) == [range(first, first + 1)]
    assert free_port("127.0.0.1", ephemeral=only) == first
    assert free_port("127.0.0.1", ephemeral=only, avoid=(first,)) != first
