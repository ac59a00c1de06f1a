"""The leader's beat lines (meshd.io.beatlines) over real loopback TCP connections: a beat is
dated by the kernel's arrival time before it is read, and a line ends on a frame that is not
a beat, on silence, and when a newer connection of its node takes over."""

from __future__ import annotations

import time

import pytest
import trio

from meshd.io import beatlines, peer
from meshd.io.beatlines import BeatLines
from meshd.wire import encode_frame

BEAT = encode_frame({"type": "beat"})


async def _pair():
    """(the server's FramedStream, the client's raw trio stream) over loopback TCP."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    await listeners[0].aclose()
    return peer.FramedStream(server), client


def test_arrivals_date_data_before_it_is_read():
    async def main():
        conn, client = await _pair()
        arrivals = peer.Arrivals(conn.stream)
        assert not arrivals.readable()
        await client.send_all(BEAT)
        await trio.sleep(0.3)
        assert arrivals.readable()
        age = arrivals.last_data_age()
        assert age is not None and 0.25 <= age <= 0.45
        await client.aclose()

    trio.run(main)


def test_a_beat_counts_from_its_arrival_not_from_the_drain_that_reads_it(monkeypatch):
    monkeypatch.setattr(beatlines, "DRAIN_PERIOD", 3600.0)  # no drain during the test

    async def main():
        lines = BeatLines()
        async with trio.open_nursery() as nursery:
            conn, client = await _pair()
            await client.send_all(BEAT)
            nursery.start_soon(lines.take, conn, "n1")
            await trio.sleep(0.2)
            assert [node for node, _ in lines.items()] == ["n1"]
            await trio.sleep(0.3)
            sent = time.monotonic()
            await client.send_all(BEAT)  # never read: the drain is an hour away
            await trio.sleep(0.2)
            (node, heard), = lines.items()
            assert abs(heard - sent) < 0.05
            nursery.cancel_scope.cancel()
        assert lines.items() == []

    trio.run(main)


def test_a_line_ends_on_a_frame_that_is_not_a_beat(monkeypatch):
    monkeypatch.setattr(beatlines, "DRAIN_PERIOD", 0.1)

    async def main():
        lines = BeatLines()
        async with trio.open_nursery() as nursery:
            conn, client = await _pair()
            await client.send_all(BEAT)

            async def serve():
                with pytest.raises(peer.PeerError, match="expected beat"):
                    await lines.take(conn, "n1")
            nursery.start_soon(serve)
            await trio.sleep(0.05)
            assert len(lines) == 1
            await client.send_all(encode_frame({"type": "join_hello"}))
            with trio.fail_after(2):
                while len(lines):
                    await trio.sleep(0.02)

    trio.run(main)


def test_the_first_frame_must_be_a_beat():
    async def main():
        lines = BeatLines()
        conn, client = await _pair()
        await client.send_all(encode_frame({"type": "call"}))
        with pytest.raises(peer.PeerError):
            await lines.take(conn, "n1")
        assert lines.items() == []

    trio.run(main)


def test_silence_ends_a_line(monkeypatch):
    monkeypatch.setattr(beatlines, "DRAIN_PERIOD", 0.05)

    async def main():
        lines = BeatLines()
        conn, client = await _pair()
        await client.send_all(BEAT)
        with trio.fail_after(3), pytest.raises(peer.PeerError, match="no beat for 0.3 s"):
            await lines.take(conn, "n1", silence=0.3)
        assert lines.items() == []

    trio.run(main)


def test_a_newer_connection_of_a_node_takes_over(monkeypatch):
    monkeypatch.setattr(beatlines, "DRAIN_PERIOD", 0.05)

    async def main():
        lines = BeatLines()
        ended = []
        async with trio.open_nursery() as nursery:
            old, old_client = await _pair()
            new, new_client = await _pair()
            await old_client.send_all(BEAT)
            await new_client.send_all(BEAT)

            async def serve(conn, name):
                try:
                    await lines.take(conn, "n1")
                except peer.PeerError as e:
                    ended.append((name, str(e)))
            nursery.start_soon(serve, old, "old")
            await trio.sleep(0.02)
            nursery.start_soon(serve, new, "new")
            with trio.fail_after(2):
                while not ended:
                    await trio.sleep(0.02)
            assert ended == [("old", "a newer beat connection of this node took over")]
            assert len(lines) == 1
            nursery.cancel_scope.cancel()

    trio.run(main)
