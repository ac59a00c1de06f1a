"""Tests of meshd.io.admin against a real Unix socket in tmp_path."""

from __future__ import annotations

import logging
import os
import socket
import stat
import struct
import subprocess
import sys
import threading
from contextlib import contextmanager
from functools import partial
from typing import Any, Awaitable, Callable

import pytest
import trio

from meshd.io.admin import (MAX_ADMIN_CONNECTIONS, AdminAdmission, AdminError, AdminRequest, AdminUnavailable,
                            admin_call, serve_admin)
from meshd.io.adminclient import admin_call_sync
from meshd.wire import ADMIN_MAX_FRAME, FrameDecoder, encode_frame

# Guards every test against a hang; never reached when the code works.
DEADLOCK_GUARD_S = 20


class Recorder:
    """A small admin handler: records requests and answers per command."""

    def __init__(self) -> None:
        self.requests: list[AdminRequest] = []
        self.released = trio.Event()
        self.handler_exit: list[str] = []
        self.handler_done = trio.Event()

    async def __call__(self, request: AdminRequest, stream: Any) -> Any:
        self.requests.append(request)
        if request.cmd == "echo":
            return {"cmd": request.cmd, "args": request.args}
        if request.cmd == "count":
            for i in range(request.args["n"]):
                await stream.send({"i": i})
            return {"sent": request.args["n"]}
        if request.cmd == "refuse":
            raise AdminError("no such app 'x'")
        if request.cmd == "refuse-in-nursery":
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._raise_admin_error)
            return None
        if request.cmd == "boom":
            raise RuntimeError("kaboom")
        if request.cmd == "unsendable":
            return {"x": {1, 2}}
        if request.cmd == "big-stream-item":
            await stream.send({"data": "x" * (ADMIN_MAX_FRAME + 1)})
            return None
        if request.cmd == "many-rows":  # a list result far over one frame
            return [{"alloc_id": f"a{i:06d}", "app": "svc", "state": "running", "node": "edge-1" * 4}
                    for i in range(request.args["n"])]
        if request.cmd == "big-dict":
            return {"data": "x" * (ADMIN_MAX_FRAME + 1)}
        if request.cmd == "wait":
            await self.released.wait()
            return "released"
        if request.cmd == "release":
            self.released.set()
            return "ok"
        if request.cmd in ("stream-forever", "silent-forever"):
            try:
                i = 0
                while True:
                    if request.cmd == "stream-forever":
                        await stream.send({"i": i})
                        i += 1
                    await trio.sleep(0.01)
            except trio.Cancelled:
                self.handler_exit.append("cancelled")
                raise
            finally:
                self.handler_done.set()
        raise AdminError(f"unknown command {request.cmd!r}")

    async def _raise_admin_error(self) -> None:
        raise AdminError("refused inside a nursery")


def run_with_server(
    path: str,
    handler: Any,
    body: Callable[[], Awaitable[None]],
    **serve_kwargs: Any,
) -> None:
    async def main() -> None:
        with trio.fail_after(DEADLOCK_GUARD_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(serve_admin, path, handler, **serve_kwargs))
                await body()
                nursery.cancel_scope.cancel()

    trio.run(main)


async def raw_exchange(path: str, data: bytes, *, close_after_send: bool = False) -> list[dict]:
    """Send raw bytes, read until the server closes, return the frames it sent."""
    conn = await trio.open_unix_socket(path)
    async with conn:
        if data:
            await conn.send_all(data)
        decoder = FrameDecoder(ADMIN_MAX_FRAME)
        frames: list[dict] = []
        while True:
            try:
                chunk = await conn.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not chunk:
                break
            frames += decoder.feed(chunk)
        return frames


def frame_of(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


@pytest.fixture
def sock_path(tmp_path) -> str:
    return str(tmp_path / "admin.sock")


def test_socket_file_is_0600_and_removed_on_shutdown(sock_path):
    async def body() -> None:
        st = os.stat(sock_path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600

    run_with_server(sock_path, Recorder(), body)
    assert not os.path.exists(sock_path)


def test_request_response_carries_peer_credentials(sock_path):
    handler = Recorder()

    async def body() -> None:
        result = await admin_call(sock_path, "echo", {"site": "factory-a"})
        assert result == {"cmd": "echo", "args": {"site": "factory-a"}}

    run_with_server(sock_path, handler, body)
    (request,) = handler.requests
    assert request == AdminRequest("echo", {"site": "factory-a"}, os.getuid(), os.getpid())


def test_streaming_items_arrive_in_order_before_result(sock_path):
    seen: list[dict] = []

    async def body() -> None:
        result = await admin_call(sock_path, "count", {"n": 5}, on_stream=seen.append)
        assert result == {"sent": 5}
        assert seen == [{"i": i} for i in range(5)]

        async def async_collect(item: dict) -> None:
            await trio.sleep(0)
            seen.append(item)

        seen.clear()
        await admin_call(sock_path, "count", {"n": 3}, on_stream=async_collect)
        assert seen == [{"i": i} for i in range(3)]

    run_with_server(sock_path, Recorder(), body)


def test_admin_error_reaches_client(sock_path):
    async def body() -> None:
        with pytest.raises(AdminError, match="no such app 'x'"):
            await admin_call(sock_path, "refuse", {})
        with pytest.raises(AdminError, match="refused inside a nursery"):
            await admin_call(sock_path, "refuse-in-nursery", {})
        with pytest.raises(AdminError, match="unknown command 'nope'"):
            await admin_call(sock_path, "nope", {})

    run_with_server(sock_path, Recorder(), body)


def test_handler_exception_is_logged_and_server_keeps_serving(sock_path, caplog):
    async def body() -> None:
        with pytest.raises(AdminError, match="internal error: RuntimeError: kaboom"):
            await admin_call(sock_path, "boom", {})
        with pytest.raises(AdminError, match="internal error: result cannot be sent"):
            await admin_call(sock_path, "unsendable", {})
        with pytest.raises(AdminError, match="internal error: FrameError: .*exceeds limit"):
            await admin_call(sock_path, "big-stream-item", {})
        assert await admin_call(sock_path, "echo", {}) == {"cmd": "echo", "args": {}}

    with caplog.at_level(logging.ERROR, logger="meshd.io.admin"):
        run_with_server(sock_path, Recorder(), body)
    assert any("'boom' failed" in r.getMessage() for r in caplog.records)


def test_oversized_frame_refused_and_next_client_served(sock_path):
    handler = Recorder()

    async def body() -> None:
        frames = await raw_exchange(sock_path, struct.pack(">I", ADMIN_MAX_FRAME + 1))
        assert frames == [
            {
                "ok": False,
                "error": f"bad request: frame of {ADMIN_MAX_FRAME + 1} bytes exceeds limit "
                f"{ADMIN_MAX_FRAME}",
            }
        ]
        assert await admin_call(sock_path, "echo", {}) == {"cmd": "echo", "args": {}}

    run_with_server(sock_path, handler, body)
    assert [r.cmd for r in handler.requests] == ["echo"]


@pytest.mark.parametrize(
    "data, reason",
    [
        (frame_of(b"hello"), "frame is not valid JSON"),
        (frame_of(b"\xc3\x28{}"), "frame is not valid UTF-8"),
        (frame_of(b"[1]"), "frame holds a JSON array, not an object"),
        (frame_of(b'{"args": {}}'), '"cmd" must be a non-empty string'),
        (frame_of(b'{"cmd": 5}'), '"cmd" must be a non-empty string'),
        (frame_of(b'{"cmd": ""}'), '"cmd" must be a non-empty string'),
        (frame_of(b'{"cmd": "echo", "args": [1]}'), '"args" must be an object'),
        (encode_frame({"cmd": "echo"}) * 2, "one request per connection"),
        (encode_frame({"cmd": "echo"}) + b"\x00", "one request per connection"),
        (b"\xff\xff\xff\xff", "exceeds limit"),
    ],
)
def test_junk_gets_bad_request(sock_path, data, reason):
    handler = Recorder()

    async def body() -> None:
        frames = await raw_exchange(sock_path, data)
        assert len(frames) == 1
        assert frames[0]["ok"] is False
        assert frames[0]["error"].startswith("bad request: ")
        assert reason in frames[0]["error"]
        assert await admin_call(sock_path, "echo", {"after": True}) is not None

    run_with_server(sock_path, handler, body)
    assert [r.args for r in handler.requests] == [{"after": True}]


def test_missing_args_default_to_empty(sock_path):
    async def body() -> None:
        frames = await raw_exchange(sock_path, encode_frame({"cmd": "echo"}))
        assert frames == [{"ok": True, "result": {"cmd": "echo", "args": {}}}]

    run_with_server(sock_path, Recorder(), body)


@pytest.mark.parametrize("sent", [b"", encode_frame({"cmd": "echo"})[:7]])
def test_silent_client_is_dropped_after_timeout(sock_path, sent):
    async def body() -> None:
        frames = await raw_exchange(sock_path, sent)
        assert frames == [
            {"ok": False, "error": "bad request: no complete request within 0.2 s"}
        ]

    run_with_server(sock_path, Recorder(), body, request_timeout=0.2)


def test_uid_not_allowed_is_refused(sock_path):
    handler = Recorder()
    someone_else = os.getuid() + 4242

    async def body() -> None:
        with pytest.raises(AdminError, match=f"permission denied: uid {os.getuid()}"):
            await admin_call(sock_path, "echo", {})

    run_with_server(sock_path, handler, body, allowed_uids={someone_else})
    assert handler.requests == []


@pytest.mark.parametrize("cmd", ["stream-forever", "silent-forever"])
def test_client_disconnect_cancels_handler_quietly(sock_path, cmd, caplog):
    handler = Recorder()

    async def body() -> None:
        conn = await trio.open_unix_socket(sock_path)
        await conn.send_all(encode_frame({"cmd": cmd, "args": {}}))
        if cmd == "stream-forever":
            decoder = FrameDecoder(ADMIN_MAX_FRAME)
            frames: list[dict] = []
            while not frames:
                frames = decoder.feed(await conn.receive_some(65536))
            assert frames[0] == {"stream": {"i": 0}}
        else:
            await trio.sleep(0.05)  # let the handler start
        await conn.aclose()
        await handler.handler_done.wait()
        assert await admin_call(sock_path, "echo", {}) is not None

    with caplog.at_level(logging.WARNING, logger="meshd.io.admin"):
        run_with_server(sock_path, handler, body)
    assert handler.handler_exit == ["cancelled"]
    assert caplog.records == []


def test_clients_are_served_concurrently(sock_path):
    async def body() -> None:
        results: list[Any] = []

        async def waiter() -> None:
            results.append(await admin_call(sock_path, "wait", {}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            assert await admin_call(sock_path, "release", {}) == "ok"
        assert results == ["released"]

    run_with_server(sock_path, Recorder(), body)


def test_client_closing_early_does_not_disturb_server(sock_path):
    async def body() -> None:
        conn = await trio.open_unix_socket(sock_path)
        await conn.send_all(b"\x00\x00")
        await conn.aclose()
        assert await admin_call(sock_path, "echo", {}) is not None

    run_with_server(sock_path, Recorder(), body)


def test_stale_socket_file_is_replaced(sock_path):
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(sock_path)
    leftover.close()
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)

    async def body() -> None:
        assert await admin_call(sock_path, "echo", {}) is not None

    run_with_server(sock_path, Recorder(), body)


def test_live_socket_is_not_taken_over(sock_path):
    async def body() -> None:
        with pytest.raises(FileExistsError, match="another meshd is already serving"):
            await serve_admin(sock_path, Recorder())
        assert await admin_call(sock_path, "echo", {}) is not None

    run_with_server(sock_path, Recorder(), body)


def test_regular_file_is_never_removed(sock_path):
    with open(sock_path, "w") as f:
        f.write("precious")
    with pytest.raises(FileExistsError, match="not a socket"):
        trio.run(partial(serve_admin, sock_path, Recorder()))
    with open(sock_path) as f:
        assert f.read() == "precious"


def test_overlong_path_is_refused_clearly(tmp_path):
    path = str(tmp_path / ("s" * 120))
    with pytest.raises(OSError, match="limit is 107"):
        trio.run(partial(serve_admin, path, Recorder()))


@pytest.mark.parametrize("make", ["missing", "regular-file", "dead-socket"])
def test_unreachable_daemon_is_reported_clearly(sock_path, make):
    if make == "regular-file":
        with open(sock_path, "w") as f:
            f.write("x")
    elif make == "dead-socket":
        leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        leftover.bind(sock_path)
        leftover.close()
    with pytest.raises(AdminUnavailable) as excinfo:
        admin_call_sync(sock_path, "status", {})
    message = excinfo.value.message
    assert message.startswith(f"cannot reach meshd at {sock_path}: ")
    assert message.endswith("; is the daemon running?")


def test_timeout_becomes_admin_error(sock_path):
    async def body() -> None:
        with pytest.raises(AdminError, match="no answer from meshd at .* within 0.1 s"):
            await admin_call(sock_path, "wait", {}, timeout=0.1)

    run_with_server(sock_path, Recorder(), body)


def test_daemon_hanging_up_is_unavailable(sock_path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(1)

    def accept_and_hang_up() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.close()

    thread = threading.Thread(target=accept_and_hang_up)
    thread.start()
    try:
        with pytest.raises(AdminUnavailable, match="closed the connection without an answer"):
            admin_call_sync(sock_path, "status", {}, timeout=DEADLOCK_GUARD_S)
    finally:
        thread.join()
        listener.close()


def test_malformed_reply_is_admin_error(sock_path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(1)

    def answer_junk() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(encode_frame({"something": "else"}))
        conn.close()

    thread = threading.Thread(target=answer_junk)
    thread.start()
    try:
        with pytest.raises(AdminError, match="malformed reply from meshd"):
            admin_call_sync(sock_path, "status", {}, timeout=DEADLOCK_GUARD_S)
    finally:
        thread.join()
        listener.close()


def test_oversized_request_is_refused_before_connecting(sock_path):
    with pytest.raises(AdminError, match="request cannot be sent: frame of .* exceeds limit"):
        admin_call_sync(sock_path, "deploy", {"spec_toml": "x" * ADMIN_MAX_FRAME})


@contextmanager
def server_in_a_thread(sock_path):
    """The admin server on a trio loop of its own, for the blocking client."""
    ready = threading.Event()
    token_box: list[trio.lowlevel.TrioToken] = []
    scope_box: list[trio.CancelScope] = []

    async def server_main() -> None:
        with trio.CancelScope() as scope:
            scope_box.append(scope)
            token_box.append(trio.lowlevel.current_trio_token())
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_admin, sock_path, Recorder())
                ready.set()

    thread = threading.Thread(target=trio.run, args=(server_main,))
    thread.start()
    try:
        assert ready.wait(DEADLOCK_GUARD_S)
        yield
    finally:
        if token_box:
            trio.from_thread.run_sync(scope_box[0].cancel, trio_token=token_box[0])
        thread.join()


def test_admin_call_sync_against_server_in_another_thread(sock_path):
    with server_in_a_thread(sock_path):
        seen: list[dict] = []
        assert admin_call_sync(sock_path, "count", {"n": 2}, on_stream=seen.append) == {"sent": 2}
        assert seen == [{"i": 0}, {"i": 1}]


def test_a_list_result_over_one_frame_arrives_whole_in_parts(sock_path):
    async def body() -> None:
        rows = await admin_call(sock_path, "many-rows", {"n": 30_000})  # about 3 MB of rows
        assert len(rows) == 30_000 and rows[0]["alloc_id"] == "a000000" and rows[-1]["alloc_id"] == "a029999"
        frames = await raw_exchange(sock_path, frame_of(b'{"cmd": "many-rows", "args": {"n": 30000}}'))
        assert len(frames) > 3 and all(set(f) == {"part"} for f in frames[:-1])
        assert frames[-1] == {"ok": True, "parts": len(frames) - 1}
        assert await admin_call(sock_path, "many-rows", {"n": 3}) == [
            {"alloc_id": f"a{i:06d}", "app": "svc", "state": "running", "node": "edge-1" * 4} for i in range(3)]
        with pytest.raises(AdminError, match="result cannot be sent"):  # not a list: still refused
            await admin_call(sock_path, "big-dict", {})

    run_with_server(sock_path, Recorder(), body)


def test_the_blocking_client_times_out_and_joins_parts_like_the_trio_one(sock_path):
    with server_in_a_thread(sock_path):
        with pytest.raises(AdminError, match="no answer from meshd at .* within 0.1 s"):
            admin_call_sync(sock_path, "wait", {}, timeout=0.1)
        rows = admin_call_sync(sock_path, "many-rows", {"n": 30_000}, timeout=DEADLOCK_GUARD_S)
        assert [r["alloc_id"] for r in rows] == [f"a{i:06d}" for i in range(30_000)]


def test_meshctl_imports_no_event_loop():
    """`meshctl` runs one request and exits: trio would be most of its start-up."""
    code = "import sys, meshd.cli.meshctl; print(sorted(m for m in ('trio', 'pycrdt', 'cryptography') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_a_stream_client_that_stops_reading_is_dropped_and_others_are_served(sock_path, monkeypatch):
    """It asks for an endless stream and never reads: once it took nothing for the stream
    send timeout, its handler ends (cancelled) and its connection closes; meanwhile and after,
    other clients are answered at once."""
    from meshd.io import admin as adminmod
    monkeypatch.setattr(adminmod, "STREAM_SEND_TIMEOUT_S", 0.5)
    handler = Recorder()

    async def body() -> None:
        stalled = await trio.open_unix_socket(sock_path)
        await stalled.send_all(encode_frame({"cmd": "stream-forever", "args": {}}))
        started = trio.current_time()
        with trio.fail_after(1.0):
            assert await admin_call(sock_path, "echo", {}) == {"cmd": "echo", "args": {}}
        await handler.handler_done.wait()  # the socket buffers filled, then the timeout
        assert trio.current_time() - started < 10
        assert handler.handler_exit == ["cancelled"]
        with trio.fail_after(1.0):
            assert await admin_call(sock_path, "echo", {}) == {"cmd": "echo", "args": {}}
        await stalled.aclose()

    run_with_server(sock_path, handler, body)


# --- admission: a flood of idle connections never keeps an operator out --------------------



def test_admission_evicts_the_oldest_waiting_connection_and_refuses_only_when_all_are_answering():
    gate = AdminAdmission(total=3)
    assert gate.arrive(1) == (True, None) and gate.arrive(2) == (True, None)
    gate.requested(2)  # being answered: never evicted
    assert gate.arrive(3) == (True, None)
    assert gate.arrive(4) == (True, 1)  # full: 1 waited longest
    gate.requested(3)
    gate.requested(4)
    assert gate.arrive(5) == (False, None) and gate.refused == 1 and gate.evicted == 1
    gate.leave(2)
    assert gate.arrive(6) == (True, None)
    gate.leave(6)
    gate.leave(6)  # leaving twice changes nothing
    assert len(gate.waiting) + len(gate.answering) == 2


def test_an_operator_gets_through_a_flood_of_idle_connections(sock_path):
    """More idle connections than the limit: each newcomer takes the oldest idle one's place,
    so a real request is answered at once, however many idle ones arrived before it."""
    handler = Recorder()

    async def body() -> None:
        idle = [await trio.open_unix_socket(sock_path) for _ in range(MAX_ADMIN_CONNECTIONS + 50)]
        await trio.sleep(0.2)  # all accepted
        start = trio.current_time()
        with trio.fail_after(2.0):
            assert await admin_call(sock_path, "echo", {}) == {"cmd": "echo", "args": {}}
        assert trio.current_time() - start < 2.0
        # The first idle ones were dropped (closed with nothing sent) to make room.
        with trio.fail_after(2.0):
            assert await idle[0].receive_some(100) == b""
        for conn in idle:
            await conn.aclose()

    run_with_server(sock_path, handler, body)


async def hold_places(nursery, sock_path, handler: Recorder, count: int) -> None:
    """`count` requests the handler holds until `handler.released` is set."""
    for _ in range(count):
        nursery.start_soon(admin_call, sock_path, "wait", {})
    while len(handler.requests) < count:
        await trio.sleep(0.01)


def test_when_every_place_is_a_request_being_answered_a_newcomer_is_told_busy(sock_path):
    handler = Recorder()

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            await hold_places(nursery, sock_path, handler, 4)
            with pytest.raises(AdminError, match="busy: 4 admin requests are being answered; try again"):
                await admin_call(sock_path, "echo", {})
            handler.released.set()
        assert await admin_call(sock_path, "echo", {}) == {"cmd": "echo", "args": {}}  # places freed

    run_with_server(sock_path, handler, body, max_connections=4)


def test_streams_hold_at_most_half_the_places_and_a_newer_one_closes_the_oldest():
    gate = AdminAdmission(total=6)
    assert gate.max_streams == 3
    for conn in range(1, 5):
        gate.arrive(conn)
    assert [gate.requested(c, stream=True) for c in (1, 2, 3)] == [(True, None)] * 3
    assert gate.requested(4, stream=True) == (True, 1)  # the oldest stream makes room
    assert list(gate.streams) == [2, 3, 4] and 1 not in gate.answering
    gate.arrive(5)
    assert gate.requested(5) == (True, None) and gate.arrive(6) == (True, None)  # one-shots find room beside them
    gate.leave(4)
    assert list(gate.streams) == [2, 3]


def test_streams_start_at_a_bounded_rate_and_one_shot_requests_at_any():
    gate = AdminAdmission(total=1000, streams=1000, starts_per_s=10.0, burst=3)
    for conn in range(1, 100):
        gate.arrive(conn)
    assert [gate.requested(c, stream=True, now=0.0)[0] for c in (1, 2, 3, 4)] == [True, True, True, False]
    assert gate.requested(5, stream=False, now=0.0) == (True, None)
    assert gate.requested(6, stream=True, now=0.05)[0] is False  # half a start earned
    assert gate.requested(7, stream=True, now=0.1)[0] is True
    assert [gate.requested(c, stream=True, now=10.0)[0] for c in (8, 9, 10, 11)] == [True, True, True, False]
    assert gate.refused == 3


def test_followers_that_never_read_cannot_fill_the_socket(sock_path, monkeypatch):
    """More silent followers than the stream places: the oldest are closed (their client is
    told the stream ended), and one-shot requests are answered at once throughout."""
    from meshd.io import admin as adminmod
    from meshd.io.admin import MAX_STREAMS
    monkeypatch.setattr(adminmod, "STREAM_START_BURST", 1000)  # this test is about the places
    handler = Recorder()

    async def body() -> None:
        errors: list[str] = []

        async def follower() -> None:
            try:
                await admin_call(sock_path, "silent-forever", {"follow": True})
            except AdminUnavailable as e:
                errors.append(e.message)

        async with trio.open_nursery() as nursery:
            for _ in range(MAX_STREAMS + 5):
                nursery.start_soon(follower)
                await trio.sleep(0.005)
            while len(handler.requests) < MAX_STREAMS + 5 or len(errors) < 5:
                await trio.sleep(0.01)
            with trio.fail_after(2.0):
                assert await admin_call(sock_path, "echo", {}) == {"cmd": "echo", "args": {}}
            nursery.cancel_scope.cancel()
        assert len(errors) == 5 and "closed the connection without an answer" in errors[0]

    run_with_server(sock_path, handler, body)


def test_meshctl_waits_out_a_busy_daemon_instead_of_failing(sock_path):
    """Every place is a request being answered: the blocking client (meshctl's) is told busy,
    tries again, and gets its answer once a place is free, within its timeout."""
    handler = Recorder()

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            await hold_places(nursery, sock_path, handler, 4)

            async def free_a_place_soon() -> None:
                await trio.sleep(0.5)
                handler.released.set()
            nursery.start_soon(free_a_place_soon)
            start = trio.current_time()
            answer = await trio.to_thread.run_sync(partial(admin_call_sync, sock_path, "echo", {}, timeout=5.0))
            assert answer == {"cmd": "echo", "args": {}} and trio.current_time() - start >= 0.4

    run_with_server(sock_path, handler, body, max_connections=4)


def test_a_busy_answer_sent_before_the_request_was_read_is_still_retried(tmp_path):
    """A full daemon answers "busy" and closes at once: a request still being sent then
    fails with a broken pipe, yet the answer is there to read, and meshctl's client retries
    on it (it once gave up: "closed the connection: Broken pipe")."""
    path = str(tmp_path / "admin.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    served = []

    def serve() -> None:
        first, _ = server.accept()  # busy at once, closed without reading the request
        first.sendall(encode_frame({"ok": False, "error": "busy: 4 admin requests are being answered; try again"}))
        first.close()
        second, _ = server.accept()
        decoder, frames = FrameDecoder(ADMIN_MAX_FRAME), []
        while not frames:
            frames = decoder.feed(second.recv(65536))
        served.append(frames[0]["cmd"])
        second.sendall(encode_frame({"ok": True, "result": "done"}))
        second.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    big = {"blob": "x" * 800_000}  # more than the socket buffers hold: its sending meets the close
    try:
        assert admin_call_sync(path, "echo", big, timeout=5.0) == "done"
    finally:
        thread.join(5)
        server.close()
    assert served == ["echo"]


class FileReader:
    """Reads the files passed with a request (as `artifact push` does)."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    async def __call__(self, request: AdminRequest, stream: Any) -> Any:
        self.seen.extend(request.fds)
        return [os.pread(fd, 100, 0).decode() for fd in request.fds]


def test_files_passed_with_a_request_reach_the_handler_and_are_closed_after(sock_path, tmp_path):
    from meshd.io.adminclient import admin_call_sync
    handler = FileReader()
    paths = [tmp_path / f"f{i}" for i in range(3)]
    for i, path in enumerate(paths):
        path.write_text(f"content {i}")
    opened = [os.open(p, os.O_RDONLY) for p in paths]

    async def body() -> None:
        before = len(os.listdir("/proc/self/fd"))
        got = await trio.to_thread.run_sync(lambda: admin_call_sync(sock_path, "read", {}, fds=tuple(opened)))
        assert got == ["content 0", "content 1", "content 2"]
        await trio.sleep(0.05)
        assert len(os.listdir("/proc/self/fd")) == before  # the server closed its copies
        too_many = tuple(opened) * 6  # 18 > MAX_PASSED_FDS
        with pytest.raises(AdminError, match="more than 16 files"):
            await trio.to_thread.run_sync(lambda: admin_call_sync(sock_path, "read", {}, fds=too_many))
        await trio.sleep(0.05)
        assert len(os.listdir("/proc/self/fd")) == before

    try:
        run_with_server(sock_path, handler, body)
    finally:
        for fd in opened:
            os.close(fd)
    assert len(handler.seen) == 3
