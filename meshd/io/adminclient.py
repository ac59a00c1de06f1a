"""The client side of the local admin socket (protocol: meshd.io.admin), for `meshctl`.

A plain blocking Unix socket: `meshctl` runs one request and exits, and an event loop would
cost it more to import (trio: about 0.15 s here, more on a small board) than the request
takes. What the daemon's frames mean is decided once, in `Reply`, which the trio client
(meshd.io.admin.admin_call) shares.

Invariants:
- Imports nothing beyond the standard library and meshd.wire: `meshctl status` starts fast.
- The sending side stays open until the final frame has come: the daemon takes end of input
  for a client that left and cancels its handler (meshd.io.admin).
- Every failure is an AdminError (the daemon refused, or answered nonsense, or not in time)
  or an AdminUnavailable (it cannot be reached, or hung up), with a message for the operator.
"""

from __future__ import annotations

import array
import errno
import socket
import time
from typing import Any, Callable

from meshd.wire import ADMIN_MAX_FRAME, FrameDecoder, FrameError, encode_frame

RECEIVE_CHUNK = 64 * 1024


class AdminError(Exception):
    """A refusal the operator should read: sent as {"ok": false, "error": message}."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class AdminUnavailable(Exception):
    """The daemon cannot be reached (no socket, refused, or it hung up without answering)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Reply:
    """What the daemon's reply bytes mean: progress items, then the result (a list joined
    from its parts, for a result sent in parts). Raises AdminError for a refusal or a
    malformed reply."""

    def __init__(self) -> None:
        self._decoder = FrameDecoder(ADMIN_MAX_FRAME)
        self.parts: list[list] = []
        self.result: Any = None  # once `receive` said done

    def receive(self, data: bytes) -> tuple[list, bool]:
        """The progress items these bytes complete, and whether the final frame came."""
        try:
            frames = self._decoder.feed(data)
        except FrameError as exc:
            raise AdminError(f"malformed reply from meshd: {exc.reason}") from None
        items = []
        for frame in frames:
            if "stream" in frame:
                items.append(frame["stream"])
            elif isinstance(frame.get("part"), list):
                self.parts.append(frame["part"])
            else:
                self.result = self._final(frame)
                return items, True
        return items, False

    def _final(self, frame: dict) -> Any:
        if frame.get("ok") is True and "parts" in frame:
            if frame["parts"] != len(self.parts):
                raise AdminError(f"malformed reply from meshd: {len(self.parts)} of {frame['parts']} parts")
            return [item for part in self.parts for item in part]
        if frame.get("ok") is True:
            return frame.get("result")
        if frame.get("ok") is False:
            raise AdminError(str(frame.get("error") or "meshd refused without a reason"))
        raise AdminError(f"malformed reply from meshd: unexpected frame {sorted(frame)}")


def encode_request(cmd: str, args: dict) -> bytes:
    try:
        return encode_frame({"cmd": cmd, "args": args}, max_frame=ADMIN_MAX_FRAME)
    except FrameError as exc:
        raise AdminError(f"request cannot be sent: {exc.reason}") from None


def unreachable_message(path: str, exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (
            f"cannot reach meshd at {path}: {reason}; the admin socket is open to root and "
            "the daemon's user only"
        )
    return f"cannot reach meshd at {path}: {reason}; is the daemon running?"


# A stream that ends without its final frame: the daemon stopped, or dropped this follower.
ENDED_STREAM = ("meshd at {path} ended this stream before its end: it stopped, or dropped this follower "
                "(one that reads nothing for 10 s, or the oldest when too many follow at once)")


# A Unix socket whose accept queue is full refuses at once (EAGAIN) when the client has a
# timeout: the daemon is shedding a flood. Try again this often until the timeout, or for
# FULL_QUEUE_PATIENCE_S without one.
FULL_QUEUE_RETRY_S = 0.02
FULL_QUEUE_PATIENCE_S = 10.0


def _connect(conn: socket.socket, path: str, timeout: float | None, deadline: float | None) -> None:
    give_up = deadline if deadline is not None else time.monotonic() + FULL_QUEUE_PATIENCE_S
    conn.settimeout(timeout)
    while True:
        try:
            conn.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() + FULL_QUEUE_RETRY_S >= give_up:
                raise
            time.sleep(FULL_QUEUE_RETRY_S)
            if deadline is not None:
                conn.settimeout(max(deadline - time.monotonic(), 0.001))


# The daemon said "busy" (every place taken, or streams starting too fast): nothing was done,
# so the same request is sent again after this long, until the timeout or the patience.
BUSY_RETRY_S = 0.2
BUSY_PREFIX = "busy: "


def admin_call_sync(
    path: str,
    cmd: str,
    args: dict | None = None,
    on_stream: Callable[[Any], Any] | None = None,
    timeout: float | None = None,
    fds: tuple[int, ...] = (),
) -> Any:
    """Send one request to the daemon at `path` and return its result; each progress item
    goes to `on_stream` as it arrives. `fds`: open files passed with the request (SCM_RIGHTS),
    for a request that reads them (`artifact push`). Raises AdminError for the daemon's refusals (and for
    no answer within `timeout` seconds), AdminUnavailable when it cannot be reached. A
    "busy" answer (meshd.io.admin's admission: nothing was done) is retried for a while."""
    give_up = time.monotonic() + (timeout if timeout is not None else FULL_QUEUE_PATIENCE_S)
    while True:
        left = None if timeout is None else max(give_up - time.monotonic(), 0.001)
        try:
            return _call_sync(path, cmd, args, on_stream, left, timeout, fds)
        except AdminError as exc:
            if not exc.message.startswith(BUSY_PREFIX) or time.monotonic() + BUSY_RETRY_S >= give_up:
                raise
        time.sleep(BUSY_RETRY_S)


def _call_sync(path: str, cmd: str, args: dict | None, on_stream: Callable[[Any], Any] | None,
               timeout: float | None, said: float | None, fds: tuple[int, ...] = ()) -> Any:
    """One attempt within `timeout` (what is left of the caller's `said` timeout)."""
    request = encode_request(cmd, args or {})
    deadline = None if timeout is None else time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        try:
            _connect(conn, path, timeout, deadline)
        except socket.timeout:
            raise AdminError(f"no answer from meshd at {path} within {said:g} s") from None
        except OSError as exc:
            raise AdminUnavailable(unreachable_message(path, exc)) from None
        unsent: OSError | None = None
        try:
            if fds:  # the files ride on the request's first byte
                conn.sendmsg([request[:1]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                request = request[1:]
            conn.sendall(request)
        except socket.timeout:
            raise AdminError(f"no answer from meshd at {path} within {said:g} s") from None
        except OSError as exc:
            # A full daemon answers "busy" and closes at once, maybe before our request is
            # in: its answer is still there to read (and retried on, as any busy answer).
            unsent = exc
        reply = Reply()
        streamed = 0
        while True:
            if deadline is not None:
                conn.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                data = conn.recv(RECEIVE_CHUNK)
            except socket.timeout:
                raise AdminError(f"no answer from meshd at {path} within {said:g} s") from None
            except OSError as exc:
                if unsent is not None:
                    raise AdminUnavailable(f"meshd at {path} closed the connection: {unsent}") from None
                raise AdminUnavailable(f"meshd at {path} dropped the connection: {exc}") from None
            if not data:
                if unsent is not None:
                    raise AdminUnavailable(f"meshd at {path} closed the connection: {unsent}")
                if streamed:
                    raise AdminUnavailable(ENDED_STREAM.format(path=path))
                raise AdminUnavailable(f"meshd at {path} closed the connection without an answer; "
                                       "it may have stopped")
            items, done = reply.receive(data)
            streamed += len(items)
            for item in items if on_stream is not None else ():
                on_stream(item)
            if done:
                return reply.result
