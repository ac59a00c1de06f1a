"""The local admin socket: how `meshctl` talks to its node's daemon.

Protocol (frames from meshd.wire, one request per connection):
    client -> daemon   {"cmd": str, "args": {...}}
    daemon -> client   zero or more {"stream": item} progress frames, then exactly one final
                       {"ok": true, "result": ...} or {"ok": false, "error": "reason"}
    then the daemon closes the connection. A list result too large for one frame (`allocs`
    of a large site) travels as {"part": [items]} frames, each under RESULT_PART_BYTES,
    then the final {"ok": true, "parts": N}; the client joins the parts into the list.

Invariants:
- The socket file is mode 0600 before it accepts anyone (chmod between bind and listen),
  and every connection is also checked by its kernel-reported uid (SO_PEERCRED): the
  file mode guards the path, the uid check guards against a loose parent directory or mode.
- Nothing a client sends or does, and nothing a handler raises, stops the server: bad input
  gets a "bad request: ..." reply, handler failures are logged and answered with
  "internal error: ...", and each connection is closed after its final frame.
- A request must arrive complete within `request_timeout` seconds of connecting; nothing may
  follow it on the same connection.
- When the client goes away while its handler runs (Ctrl-C on `meshctl logs --follow`),
  the handler is cancelled and nothing is logged as an error. A client therefore keeps its
  sending side open until it has the final frame: end of input means it left.
- A stale socket file is replaced; a live one (another daemon answering) or a path that is
  not a socket is never removed.
- At most MAX_ADMIN_CONNECTIONS connections are served at once (AdminAdmission). One beyond
  that takes the place of the oldest connection that has not yet sent its request (idle or
  trickling: a flood), so an operator's meshctl, which sends its request at once, always gets
  in; only when every place is a request being answered is the newcomer told "busy". Streams
  (`--follow`, `--wait`) hold at most MAX_STREAMS of the places: a newer one closes the
  oldest, so followers that never read can neither fill the socket nor keep a new one out;
  and at most STREAM_STARTS_PER_S start a second (a burst of STREAM_START_BURST), since
  each start reads the history it sends first: beyond that a stream is told "busy" at once.
- Lines a client can cause (a refused uid, data after a request, a dropped client) are
  throttled (meshd.io.logthrottle): a flood costs a line per message every ten seconds.
"""

from __future__ import annotations

import array
import errno
import inspect
import json
import logging
import os
import socket
import stat
import struct
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Any, Awaitable, Callable, Protocol

import trio

# RECEIVE_CHUNK: one read from the socket, server and client alike (the request itself is
# bounded by ADMIN_MAX_FRAME).
from meshd.io.adminclient import (BUSY_PREFIX, ENDED_STREAM, FULL_QUEUE_PATIENCE_S, FULL_QUEUE_RETRY_S,
                                  RECEIVE_CHUNK, AdminError, AdminUnavailable, Reply, encode_request,
                                  unreachable_message)
from meshd.wire import ADMIN_MAX_FRAME, FrameDecoder, FrameError, encode_frame

from meshd.io.logthrottle import throttle

log = throttle(logging.getLogger(__name__))

# A client has this long from connecting to deliver its whole request: meshctl sends it at
# once, so a connection that is silent (or trickles bytes) this long is stuck or hostile.
REQUEST_TIMEOUT_S = 10.0

# Final and error frames must be taken by the client within this time; a client that stops
# reading would otherwise hold its connection task forever. Progress frames are exempt: a
# paused pager (`meshctl logs -f | less`) may legitimately stop reading for a long time.
REPLY_TIMEOUT_S = 30.0
# A streaming client (`--follow`, `--wait`) that takes nothing of one item for this long is
# dropped: it would hold its handler, its buffers and a place among the connections for as
# long as it does not read, however much else the daemon has to say to other clients.
STREAM_SEND_TIMEOUT_S = 10.0

# Pending connections the kernel queues: far beyond a device's operators, so that while a
# flood of connections is being shed a meshctl still finds a place in the queue.
LISTEN_BACKLOG = 1024

# Connections served at once: scripts and followers of one device's operators need a few
# dozen; each costs a task, a descriptor and at most one frame of buffer.
MAX_ADMIN_CONNECTIONS = 128
# Streams (`--follow`, `--wait`) served at once: half the places, so one-shot requests always
# find room beside them.
MAX_STREAMS = MAX_ADMIN_CONNECTIONS // 2
# New streams a second (and the burst allowed above it): each start costs the history it sends
# first (~ms); a script or two of an operator start a few, a flood of them thousands.
STREAM_STARTS_PER_S = 10.0
STREAM_START_BURST = 20
# A connection told "busy" gets this long to take that answer before it is closed anyway.
BUSY_REPLY_TIMEOUT_S = 1.0

# A list result larger than one frame is sent in parts of about this many bytes: well under
# the frame limit (so items of any ordinary size fit), large enough that 100,000
# allocations take a few hundred frames.
RESULT_PART_BYTES = ADMIN_MAX_FRAME // 2

# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107

# Files one request may pass (an app's artifacts, meshd.spec.MAX_ARTIFACTS); more is refused.
MAX_PASSED_FDS = 16

# struct ucred as SO_PEERCRED returns it: pid, uid, gid.
_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class AdminRequest:
    cmd: str
    args: dict
    peer_uid: int
    peer_pid: int
    # Open files the client passed with the request (SCM_RIGHTS): a file it pushes, which
    # the daemon (sandboxed, without access to the operator's home) reads through them.
    # The server closes them when the request ends.
    fds: tuple[int, ...] = ()


class AdminStream(Protocol):
    async def send(self, item: dict) -> None: ...


AdminHandler = Callable[[AdminRequest, AdminStream], Awaitable[Any]]


class AdminAdmission:
    """Which admin connections are served (pure): at most `total` at once. A newcomer beyond
    that evicts the oldest connection still waiting for its request; with none waiting it is
    refused. Connection ids are the caller's."""

    def __init__(self, total: int = MAX_ADMIN_CONNECTIONS, streams: int | None = None,
                 starts_per_s: float | None = None, burst: int | None = None) -> None:
        self.total = total
        self.max_streams = max(1, total // 2) if streams is None else streams
        self.starts_per_s = STREAM_STARTS_PER_S if starts_per_s is None else starts_per_s
        self.burst = STREAM_START_BURST if burst is None else burst
        self._starts = float(self.burst)  # token bucket of stream starts
        self._starts_at: float | None = None
        self.waiting: OrderedDict[int, None] = OrderedDict()  # oldest first
        self.answering: set[int] = set()
        self.streams: OrderedDict[int, None] = OrderedDict()  # the answering ones that stream, oldest first
        self.evicted = 0
        self.refused = 0

    def arrive(self, conn: int) -> tuple[bool, int | None]:
        """(served, the id of a waiting connection to drop for it, if any)."""
        victim = None
        if len(self.waiting) + len(self.answering) >= self.total:
            if not self.waiting:
                self.refused += 1
                return False, None
            victim, _ = self.waiting.popitem(last=False)
            self.evicted += 1
        self.waiting[conn] = None
        return True, victim

    def requested(self, conn: int, stream: bool = False, now: float = 0.0) -> tuple[bool, int | None]:
        """Its request arrived: (answered, the id of the oldest stream to close for it). A
        one-shot request is answered and no longer evictable; a stream is refused beyond the
        start rate, and beyond max_streams takes the oldest stream's place."""
        if self.waiting.pop(conn, 0) is not None:
            return True, None  # no longer admitted: its handler is being cancelled anyway
        self.answering.add(conn)
        if not stream:
            return True, None
        if self._starts_at is not None:
            self._starts = min(float(self.burst), self._starts + (now - self._starts_at) * self.starts_per_s)
        self._starts_at = now
        if self._starts < 1.0:
            self.refused += 1
            return False, None
        self._starts -= 1.0
        victim = None
        if len(self.streams) >= self.max_streams:
            victim, _ = self.streams.popitem(last=False)
            self.answering.discard(victim)
            self.evicted += 1
        self.streams[conn] = None
        return True, victim

    def leave(self, conn: int) -> None:
        self.waiting.pop(conn, None)
        self.answering.discard(conn)
        self.streams.pop(conn, None)


# --- server --------------------------------------------------------------------------


async def serve_admin(
    path: str,
    handler: AdminHandler,
    *,
    allowed_uids: set[int] | None = None,
    request_timeout: float = REQUEST_TIMEOUT_S,
    max_connections: int = MAX_ADMIN_CONNECTIONS,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin socket at `path` until cancelled; the socket file is removed then.

    `allowed_uids` defaults to root and the daemon's own user. With `nursery.start`, returns
    once the socket accepts connections (the value is trio's list of listeners).
    """
    if allowed_uids is None:
        allowed_uids = {0, os.getuid()}
    sock = await _bind_admin_socket(path)
    try:
        bound = os.stat(path)
        listener = trio.SocketListener(sock)
    except BaseException:
        sock.close()
        raise
    connection = partial(
        _serve_connection,
        handler=handler,
        allowed_uids=frozenset(allowed_uids),
        request_timeout=request_timeout,
        gate=_Gate(AdminAdmission(max_connections)),
    )
    try:
        await trio.serve_listeners(connection, [listener], task_status=task_status)
    finally:
        _remove_if_ours(path, bound)


async def _bind_admin_socket(path: str) -> trio.socket.SocketType:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise OSError(
            errno.ENAMETOOLONG,
            f"admin socket path is {len(os.fsencode(path))} bytes, the limit is "
            f"{MAX_SOCKET_PATH_BYTES}",
            path,
        )
    await _remove_stale_socket(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        # Nobody can connect before listen(), so restricting the mode here leaves no window.
        # (fchmod on a socket fd does not reach the file; a umask change is process-wide.)
        os.chmod(path, 0o600)
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


async def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(
            errno.EEXIST, "refusing to replace a file that is not a socket", path
        )
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await probe.connect(path)
    except OSError:
        pass  # nobody answers: a leftover of a daemon that died
    else:
        raise FileExistsError(
            errno.EADDRINUSE, "another meshd is already serving this admin socket", path
        )
    finally:
        probe.close()
    os.unlink(path)


def _remove_if_ours(path: str, bound: os.stat_result) -> None:
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == (bound.st_dev, bound.st_ino):
            os.unlink(path)
    except OSError:
        pass


class _ConnectionStream:
    """The `stream` a handler gets: sends {"stream": item} frames to its client."""

    def __init__(self, conn: trio.SocketStream, on_client_gone: Callable[[], None]) -> None:
        self._conn = conn
        self._lock = trio.Lock()  # a handler may send from several tasks
        self._on_client_gone = on_client_gone

    async def send(self, item: dict) -> None:
        """Send one progress item. FrameError if it cannot be framed (e.g. too large)."""
        frame = encode_frame({"stream": item}, max_frame=ADMIN_MAX_FRAME)
        async with self._lock:
            try:
                with trio.move_on_after(STREAM_SEND_TIMEOUT_S) as sending:
                    await self._conn.send_all(frame)
                if sending.cancelled_caught:
                    # Half a frame may be out: the connection cannot carry anything more.
                    log.info("admin client dropped: it read nothing of its stream for %gs", STREAM_SEND_TIMEOUT_S)
                    await trio.aclose_forcefully(self._conn)
                    raise trio.BrokenResourceError("the client fell behind its stream")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # The client went away: end the handler through cancellation, quietly.
                self._on_client_gone()
                await trio.lowlevel.checkpoint()
                raise


@dataclass
class _ConnectionState:
    client_gone: bool = False


class _Gate:
    """AdminAdmission with the cancel scopes of the waiting connections, to drop them."""

    def __init__(self, admission: AdminAdmission) -> None:
        self.admission = admission
        self.scopes: dict[int, trio.CancelScope] = {}  # of the evictable: waiting ones and streams
        self.next_id = 0

    def arrive(self) -> tuple[int, trio.CancelScope] | None:
        self.next_id += 1
        served, victim = self.admission.arrive(self.next_id)
        if victim is not None:
            log.warning("admin socket: full; dropping the oldest connection that sent no request",
                        extra={"limit": self.admission.total, "dropped": self.admission.evicted})
            self.scopes.pop(victim).cancel()
        if not served:
            log.warning("admin socket: full of requests being answered; refusing a connection",
                        extra={"limit": self.admission.total, "refused": self.admission.refused})
            return None
        scope = self.scopes[self.next_id] = trio.CancelScope()
        return self.next_id, scope

    def requested(self, conn_id: int, stream: bool) -> bool:
        """Whether to answer it (False: a stream over the start rate, to be told busy)."""
        answered, victim = self.admission.requested(conn_id, stream, trio.current_time())
        if not stream:
            self.scopes.pop(conn_id, None)
        elif not answered:
            log.warning("admin socket: streams starting too fast; refusing one",
                        extra={"per_s": self.admission.starts_per_s, "refused": self.admission.refused})
        elif victim is not None:
            log.warning("admin socket: too many streams; closing the oldest",
                        extra={"limit": self.admission.max_streams, "dropped": self.admission.evicted})
            self.scopes.pop(victim).cancel()
        return answered

    def leave(self, conn_id: int) -> None:
        self.admission.leave(conn_id)
        self.scopes.pop(conn_id, None)


async def _serve_connection(
    conn: trio.SocketStream,
    *,
    handler: AdminHandler,
    allowed_uids: frozenset[int],
    request_timeout: float,
    gate: _Gate,
) -> None:
    place = gate.arrive()
    try:
        async with conn:
            if place is None:
                with trio.move_on_after(BUSY_REPLY_TIMEOUT_S):
                    await _reply(conn, _error(f"{BUSY_PREFIX}{gate.admission.total} admin requests are being answered; "
                                              "try again"))
                return
            conn_id, evictable = place
            with evictable:  # cancelled: its place went to a newer connection (AdminAdmission)
                await _handle_connection(conn, handler, allowed_uids, request_timeout,
                                         partial(gate.requested, conn_id))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client left before its answer; nothing to tell anyone
    except Exception:
        log.exception("admin connection failed")
    finally:
        if place is not None:
            gate.leave(place[0])


async def _handle_connection(
    conn: trio.SocketStream,
    handler: AdminHandler,
    allowed_uids: frozenset[int],
    request_timeout: float,
    requested: Callable[[bool], bool],
) -> None:
    peer_pid, peer_uid, _gid = _UCRED.unpack(
        conn.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    if peer_uid not in allowed_uids:
        log.warning("admin socket: refused uid %d (pid %d)", peer_uid, peer_pid)
        await _reply(conn, _error(f"permission denied: uid {peer_uid} may not use meshd"))
        return

    fds: list[int] = []
    try:
        await _handle_request(conn, handler, request_timeout, requested, peer_uid, peer_pid, fds)
    finally:
        for fd in fds:
            os.close(fd)


async def _receive(conn: trio.SocketStream, fds: list[int]) -> bytes:
    """One read of the request, taking any files passed with it (closed by the caller)."""
    data, ancdata, flags, _address = await conn.socket.recvmsg(
        RECEIVE_CHUNK, socket.CMSG_SPACE(MAX_PASSED_FDS * _FD.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            passed = array.array("i")
            passed.frombytes(payload[:len(payload) - len(payload) % _FD.itemsize])
            fds.extend(passed)
    if flags & socket.MSG_CTRUNC:
        raise FrameError(f"more than {MAX_PASSED_FDS} files passed with one request")
    return data


_FD = array.array("i")


async def _handle_request(conn: trio.SocketStream, handler: AdminHandler, request_timeout: float,
                          requested: Callable[[bool], bool], peer_uid: int, peer_pid: int, fds: list[int]) -> None:
    decoder = FrameDecoder(ADMIN_MAX_FRAME)
    frames: list[dict] = []
    try:
        with trio.move_on_after(request_timeout) as read_scope:
            while not frames:
                data = await _receive(conn, fds)
                if not data:
                    return  # closed before a complete request: nobody to answer
                frames = decoder.feed(data)
    except FrameError as exc:
        await _reply(conn, _error(f"bad request: {exc.reason}"))
        return
    if read_scope.cancelled_caught:
        requested(False)
        await _reply(conn, _error(f"bad request: no complete request within {request_timeout:g} s"))
        return
    if len(frames) > 1 or decoder.buffered:
        await _reply(conn, _error("bad request: one request per connection, nothing after it"))
        return
    try:
        cmd, args = _parse_request(frames[0])
    except FrameError as exc:
        await _reply(conn, _error(f"bad request: {exc.reason}"))
        return

    if not requested(bool(args.get("follow") or args.get("wait"))):
        await _reply(conn, _error(f"{BUSY_PREFIX}streams are starting faster than {STREAM_STARTS_PER_S:g} a second; "
                                  "try again"))
        return
    request = AdminRequest(cmd=cmd, args=args, peer_uid=peer_uid, peer_pid=peer_pid, fds=tuple(fds))
    state = _ConnectionState()
    final: list[dict] | None = None
    async with trio.open_nursery() as nursery:

        def client_gone() -> None:
            state.client_gone = True
            nursery.cancel_scope.cancel()

        nursery.start_soon(_watch_client, conn, client_gone)
        final = await _run_handler(handler, request, _ConnectionStream(conn, client_gone))
        nursery.cancel_scope.cancel()  # stop the watcher
    if state.client_gone or final is None:
        log.debug("admin socket: client left during %r", cmd)
        return
    await _reply(conn, *final)


def _parse_request(frame: dict) -> tuple[str, dict]:
    cmd = frame.get("cmd")
    if not isinstance(cmd, str) or not cmd:
        raise FrameError('"cmd" must be a non-empty string')
    args = frame.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise FrameError('"args" must be an object')
    return cmd, args


async def _watch_client(conn: trio.SocketStream, client_gone: Callable[[], None]) -> None:
    """Runs beside the handler; the client sends nothing more, so any read event is its end."""
    try:
        data = await conn.receive_some(RECEIVE_CHUNK)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        data = b""
    if data:
        log.warning("admin socket: client sent data after its request; dropping it")
    client_gone()


async def _run_handler(
    handler: AdminHandler, request: AdminRequest, stream: AdminStream
) -> list[dict]:
    """Call the handler and turn its outcome into the reply frames (parts of a large list,
    then the final frame). Lets only Cancelled out."""
    frame = await _outcome(handler, request, stream)
    if frame.get("ok") is not True:
        return [frame]
    try:
        encode_frame(frame, max_frame=ADMIN_MAX_FRAME)
        return [frame]
    except FrameError as exc:
        result = frame["result"]
        if not isinstance(result, list):
            log.error("admin command %r: unsendable result: %s", request.cmd, exc.reason)
            return [_error(f"internal error: result cannot be sent: {exc.reason}")]
    try:
        parts = _parts(result)
    except FrameError as exc:
        log.error("admin command %r: unsendable result: %s", request.cmd, exc.reason)
        return [_error(f"internal error: result cannot be sent: {exc.reason}")]
    return [*({"part": part} for part in parts), {"ok": True, "parts": len(parts)}]


def _parts(items: list) -> list[list]:
    """`items` in consecutive runs that each frame under RESULT_PART_BYTES; FrameError for an
    item that cannot be framed at all."""
    parts: list[list] = [[]]
    size = 0
    for item in items:
        try:  # as encode_frame writes it, plus the comma between items
            length = len(json.dumps(item, ensure_ascii=True, allow_nan=False, separators=(",", ":"))) + 1
        except (TypeError, ValueError, RecursionError) as exc:
            raise FrameError(f"cannot encode frame: {exc}") from None
        if parts[-1] and size + length > RESULT_PART_BYTES:
            parts.append([])
            size = 0
        parts[-1].append(item)
        size += length
    return parts


async def _outcome(handler: AdminHandler, request: AdminRequest, stream: AdminStream) -> dict:
    """The handler's result or refusal as one frame (not yet checked for size)."""
    try:
        result = await handler(request, stream)
    except AdminError as exc:
        return _error(exc.message)
    except BaseExceptionGroup as group:
        # A handler that runs a nursery raises its failures as a group.
        if group.subgroup(trio.Cancelled) is not None or not isinstance(group, Exception):
            raise
        admin_errors, rest = group.split(AdminError)
        if admin_errors is not None and rest is None:
            first = _first_leaf(admin_errors)
            return _error(first.message if isinstance(first, AdminError) else str(first))
        log.exception("admin command %r failed", request.cmd)
        return _error(f"internal error: {_describe(group)}")
    except Exception as exc:
        log.exception("admin command %r failed", request.cmd)
        return _error(f"internal error: {_describe(exc)}")
    return {"ok": True, "result": result}


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        exc = _first_leaf(exc)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _error(message: str) -> dict:
    return {"ok": False, "error": message}


async def _reply(conn: trio.SocketStream, *frames: dict) -> None:
    """Send the reply frames; the client has REPLY_TIMEOUT_S to take them all."""
    with trio.move_on_after(REPLY_TIMEOUT_S):
        for frame in frames:
            try:
                data = encode_frame(frame, max_frame=ADMIN_MAX_FRAME)
            except FrameError as exc:  # only an error message too large to frame gets here
                data = encode_frame(_error(f"internal error: reply cannot be sent: {exc.reason}"))
            await conn.send_all(data)


# --- client --------------------------------------------------------------------------
# The blocking client (`meshctl`) and what reply frames mean are in meshd.io.adminclient;
# this is the same client for trio code (tests, tools that run inside a trio loop).


async def admin_call(
    path: str,
    cmd: str,
    args: dict | None = None,
    on_stream: Callable[[dict], Any] | None = None,
    timeout: float | None = None,
) -> Any:
    """Send one request to the daemon at `path` and return its result.

    Each progress item is passed to `on_stream` (a plain or async callable) as it arrives.
    Raises AdminError for the daemon's refusals (and for no answer within `timeout`
    seconds), AdminUnavailable when the daemon cannot be reached or hangs up.
    """
    args = args or {}
    if timeout is None:
        return await _call(path, cmd, args, on_stream)
    try:
        with trio.fail_after(timeout):
            return await _call(path, cmd, args, on_stream)
    except trio.TooSlowError:
        raise AdminError(f"no answer from meshd at {path} within {timeout:g} s") from None


async def _call(
    path: str, cmd: str, args: dict, on_stream: Callable[[dict], Any] | None
) -> Any:
    request = encode_request(cmd, args)
    give_up = trio.current_time() + FULL_QUEUE_PATIENCE_S
    while True:
        try:
            conn = await trio.open_unix_socket(path)
            break
        except BlockingIOError as exc:  # the accept queue is full (see adminclient._connect)
            if trio.current_time() + FULL_QUEUE_RETRY_S >= give_up:
                raise AdminUnavailable(unreachable_message(path, exc)) from None
            await trio.sleep(FULL_QUEUE_RETRY_S)
        except OSError as exc:
            raise AdminUnavailable(unreachable_message(path, exc)) from None
    async with conn:
        try:
            await conn.send_all(request)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise AdminUnavailable(f"meshd at {path} closed the connection: {exc}") from None
        reply = Reply()
        streamed = 0
        while True:
            try:
                data = await conn.receive_some(RECEIVE_CHUNK)
            except trio.BrokenResourceError as exc:
                raise AdminUnavailable(f"meshd at {path} dropped the connection: {exc}") from None
            if not data:
                if streamed:
                    raise AdminUnavailable(ENDED_STREAM.format(path=path))
                raise AdminUnavailable(
                    f"meshd at {path} closed the connection without an answer; "
                    "it may have stopped"
                )
            items, done = reply.receive(data)
            streamed += len(items)
            for item in items if on_stream is not None else ():
                outcome = on_stream(item)
                if inspect.isawaitable(outcome):
                    await outcome
            if done:
                return reply.result
