"""A 3-node site of real daemons under each flood of tests/bench/flood.py (another host holding
2,000 silent connections to one of the leader's ports, reopening those it closes; 1,000
`events --follow` streams that never read), and the Raft port under one connection that
announces a 2 GiB message. Each asserts what the site must keep doing during the flood:
the leader's `status` answers in well under a second (it took 21.5 s under 1,000 followers),
the leader hears every member within its lease (no member is ever marked down), a node joins
(a TLS handshake and the join over the peer port, then Raft), and the leader's memory comes
back once the flood ends. The figures are printed (`pytest -s`); the benchmark gives them
against a no-flood baseline of the same run."""

from __future__ import annotations

import socket
import struct
import threading

import pytest

from meshd.config import DEFAULT_LEASE
from tests.bench import flood as floodbench

# Bounds an unharmed site meets with a wide margin on a loaded 2-core CI machine (the
# benchmark's medians: status 0.4-0.6 ms, join 0.7-0.9 s, heard gap 0.2 s, RSS within 1 MB).
STATUS_BOUND_MS = 500.0
JOIN_BOUND_S = 10.0
HANDSHAKE_BOUND_MS = 2000.0  # a TLS handshake with the peer port (it took 20 s under 2,000 idle connections)
RSS_GROWTH_BOUND_MB = 30.0


def huge_announcer(address: tuple[str, int], stop: threading.Event, cuts: list[int]) -> None:
    """Connect from another host, announce a 2 GiB message and send its first MiB; again
    whenever cut (the attack that once had the node buffer it, marked down within 5 s)."""
    while not stop.is_set():
        s = socket.socket()
        try:
            s.bind((floodbench.FLOOD_SOURCE, 0))
            s.settimeout(2.0)
            s.connect(address)
            s.sendall(struct.pack("i", 2**31 - 1))
            for _ in range(16):
                s.sendall(b"x" * 65536)
            cut = s.recv(1) == b""  # the node closed it (it never answers such a peer)
        except socket.timeout:
            cut = False  # still open after 2 s: buffered, not cut
        except OSError:
            cut = True  # reset by the node while sending
        finally:
            s.close()
        cuts[0] += cut
        stop.wait(0.05)


@pytest.mark.parametrize("kind", ["raft", "peer", "admin", "followers"])
def test_the_site_keeps_working_through_a_flood_of_one_of_the_leaders_ports(make_site, monkeypatch, kind):
    monkeypatch.setattr(floodbench, "GAP_WINDOW_S", 3.0)
    site = make_site()
    stop, cuts, announcer = threading.Event(), [0], None
    if kind == "raft":
        site.grow(3)
        host, _, port = site.leader().call("status")["raft_address"].rpartition(":")
        announcer = threading.Thread(target=huge_announcer, args=((host, int(port)), stop, cuts), daemon=True)
        announcer.start()
    try:
        figures = floodbench.measure(site, kind)
    finally:
        stop.set()
        if announcer is not None:
            announcer.join(10)
    print(f"\n{kind} flood: " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items())
          + (f", 2 GiB announcements cut {cuts[0]}" if kind == "raft" else ""))
    assert figures["flood_opened"] >= (floodbench.FOLLOWERS if kind == "followers" else floodbench.FLOOD_CONNECTIONS)
    assert figures["downs"] == 0
    assert figures["heard_gap_s"] < DEFAULT_LEASE
    assert figures["status_ms"] < STATUS_BOUND_MS
    assert figures["handshake_ms"] < HANDSHAKE_BOUND_MS
    assert figures["join_s"] < JOIN_BOUND_S
    assert figures["rss_growth_mb"] < RSS_GROWTH_BOUND_MB
    if kind == "raft":
        assert cuts[0] > 10  # it kept trying, and was cut every time


CHATTY = ('[app]\nname = "chatty"\nreplicas = 3\ncommand = ["sh", "-c", "while true; do head -c 65536 /dev/zero '
          '| tr \'\\\\0\' a; echo; sleep 0.01; done"]\n')


def test_a_logs_follow_client_that_never_reads_is_dropped_and_nobody_else_waits(three):
    """`logs --follow` of a chatty workload on another member, through the leader, by a
    client that never reads (once: cut with "internal error" 1 MiB behind). The leader drops
    it once it took nothing for the stream send timeout, says so in its log, and answers
    everyone else at once meanwhile; the member serving the lines keeps serving."""
    import socket as socketmod
    import statistics
    import time

    from meshd.io import admin
    from meshd.wire import ADMIN_MAX_FRAME, encode_frame

    leader = three.leader()
    leader.call("deploy", spec_toml=CHATTY, wait=True, timeout=30)
    remote = next(a for a in three.running("chatty") if a["node"] != leader.name)
    member = next(n for n in three.nodes if n.name == remote["node"])
    stalled = socketmod.socket(socketmod.AF_UNIX, socketmod.SOCK_STREAM)
    stalled.setsockopt(socketmod.SOL_SOCKET, socketmod.SO_RCVBUF, 4096)
    stalled.connect(leader.socket)
    stalled.sendall(encode_frame({"cmd": "logs", "args": {"alloc": remote["alloc_id"], "follow": True, "tail": None}},
                                 max_frame=ADMIN_MAX_FRAME))
    started = time.monotonic()
    latencies = []
    while "admin client dropped" not in leader.log_text():
        assert time.monotonic() - started < admin.STREAM_SEND_TIMEOUT_S + 20, "the stalled client was never dropped"
        t0 = time.monotonic()
        leader.call("status")
        latencies.append((time.monotonic() - t0) * 1000)
        time.sleep(0.1)
    dropped_after = time.monotonic() - started
    print(f"\nstalled logs --follow dropped after {dropped_after:.1f} s; status meanwhile: median "
          f"{statistics.median(latencies):.1f} ms, max {max(latencies):.1f} ms")
    assert max(latencies) < STATUS_BOUND_MS
    said = leader.log_text()
    assert "internal error" not in said and "Traceback" not in said
    assert "Traceback" not in member.log_text()
    stalled.close()
    # the member serving the lines serves a fresh reader
    assert member.call("logs", alloc=remote["alloc_id"], follow=False, tail=5)["data"]
    assert leader.call("logs", alloc=remote["alloc_id"], follow=False, tail=5)["data"]
