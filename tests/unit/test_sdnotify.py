"""systemd's notify protocol: when to ping the watchdog (table), and what a real AF_UNIX datagram
socket receives from sd_notify and from the ping task of a real trio loop, wedged or not."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import trio

from meshd.io.sdnotify import ping_watchdog, sd_notify, sd_status, watchdog_ping_interval

PID = 4242

CASES = [
    ("no watchdog", {}, None),
    ("half the timeout", {"WATCHDOG_USEC": "30000000"}, 15.0),
    ("our pid", {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(PID)}, 1.0),
    ("another process's watchdog", {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, None),
    ("zero is off", {"WATCHDOG_USEC": "0"}, None),
    ("not a number", {"WATCHDOG_USEC": "30s"}, None),
    ("negative", {"WATCHDOG_USEC": "-1"}, None),
    ("empty", {"WATCHDOG_USEC": ""}, None),
    ("a malformed pid is not ours", {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "x"}, None),
]


@pytest.mark.parametrize("env,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_watchdog_ping_interval(env, expected):
    assert watchdog_ping_interval(env, PID) == expected


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(tmp_path / "notify"))
        s.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        yield s


def test_notifications_reach_the_socket_as_sent(notify_socket):
    sd_notify("READY=1")
    sd_status("joining  site\nlab")  # one line, whatever the text
    assert notify_socket.recv(4096) == b"READY=1"
    assert notify_socket.recv(4096) == b"STATUS=joining site lab"


def test_an_abstract_socket_is_written_with_a_leading_nul(monkeypatch):
    name = f"meshd-test-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        sd_notify("STOPPING=1")
        assert s.recv(4096) == b"STOPPING=1"


def test_a_missing_socket_is_logged_not_raised(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    sd_notify("READY=1")
    assert [r.message for r in caplog.records] == ["sd_notify failed"]


def ping_times(notify_socket, interval: float, block_for: float, run_for: float) -> list[float]:
    """When WATCHDOG=1 pings arrive (monotonic seconds) from a real trio loop that runs for
    `run_for`, blocked once for `block_for` in the middle."""
    times: list[float] = []

    def listen():  # a thread of its own, so each arrival is timed as it comes
        notify_socket.settimeout(block_for + interval * 5)  # the end: silence beyond any gap
        while True:
            try:
                assert notify_socket.recv(4096) == b"WATCHDOG=1"
            except TimeoutError:
                return
            times.append(time.monotonic())

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(ping_watchdog, interval)
            await trio.sleep(run_for / 2)
            time.sleep(block_for)  # wedge the loop: nothing else runs on it meanwhile
            await trio.sleep(run_for / 2)
            nursery.cancel_scope.cancel()

    listener = threading.Thread(target=listen)
    listener.start()
    trio.run(main)
    listener.join()
    return times


def test_a_live_loop_pings_on_its_interval(notify_socket):
    times = ping_times(notify_socket, interval=0.1, block_for=0, run_for=1.0)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert 8 <= len(times) <= 12
    assert max(gaps) < 0.5


def test_a_wedged_loop_stops_pinging(notify_socket):
    """The pings come from the loop: while it is blocked none is sent, so systemd sees the
    whole block as silence (here 1 s, ten intervals)."""
    times = ping_times(notify_socket, interval=0.1, block_for=1.0, run_for=0.6)
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    assert gaps[-1] >= 0.95  # the block
    assert gaps[-2] < 0.5  # every other gap is about one interval
