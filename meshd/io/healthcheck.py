"""Running one health check of a replica (`[app.health]`): a TCP connect or an HTTP GET on
the node's loopback, or a command in the replica's directory. Each returns (passed, reason)
within the check's `timeout_s`; nothing a workload answers (junk, a huge reply, a hang)
raises or waits longer. The verdict is meshd.health's.

Invariants:
- Only loopback is probed: a check sees what the workload serves on this node.
- An HTTP reply is read up to its status line only (at most MAX_STATUS_LINE bytes).
- An exec check's processes are all ended when it times out (it runs in its own session).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Mapping

import trio

from meshd.state import HealthCheck

LOOPBACK = "127.0.0.1"
# "HTTP/1.1 200 OK\r\n" and a long reason phrase; anything longer is not an HTTP status line.
MAX_STATUS_LINE = 1024
STATUS_LINE = re.compile(rb"^HTTP/\d(?:\.\d)? (\d{3})(?: |\r|\n|$)")


async def run_check(check: HealthCheck, cwd: Path, env: Mapping[str, str],
                    user: tuple[int, int] | None = None) -> tuple[bool, str]:
    """One check of `check.kind` (not `process`, which has none); an `exec` check runs as the
    workload does (`user`: its uid and gid; None: as the daemon)."""
    with trio.move_on_after(check.timeout_s) as scope:
        if check.kind == "tcp":
            return await _tcp(check.port)
        if check.kind == "http":
            return await _http(check.port, check.path)
        if check.kind == "exec":
            return await _exec(list(check.command), cwd, env, user)
        return False, f"unknown check kind {check.kind!r}"
    assert scope.cancelled_caught
    return False, f"no answer within {check.timeout_s:g} s"


async def _connect(port: int) -> trio.SocketStream:
    """A TCP connection to the loopback port (OSError with the connect's own errno)."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    try:
        await sock.connect((LOOPBACK, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def _tcp(port: int) -> tuple[bool, str]:
    try:
        stream = await _connect(port)
    except OSError as e:
        return False, f"tcp {LOOPBACK}:{port}: {e.strerror or e}"
    await stream.aclose()
    return True, ""


async def _http(port: int, path: str) -> tuple[bool, str]:
    try:
        stream = await _connect(port)
    except OSError as e:
        return False, f"http {LOOPBACK}:{port}: {e.strerror or e}"
    async with stream:
        try:
            await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: {LOOPBACK}:{port}\r\n"
                                  "User-Agent: meshd-health\r\nConnection: close\r\n\r\n".encode())
            head = b""
            while b"\n" not in head and len(head) < MAX_STATUS_LINE:
                data = await stream.receive_some(MAX_STATUS_LINE - len(head))
                if not data:
                    break
                head += data
        except (trio.BrokenResourceError, OSError) as e:
            return False, f"http {path}: connection failed ({e})"
    match = STATUS_LINE.match(head)
    if match is None:
        return False, f"http {path}: not an HTTP answer ({head[:40]!r})"
    status = int(match.group(1))
    if 200 <= status <= 399:
        return True, ""
    return False, f"http {path}: status {status}"


async def _exec(command: list[str], cwd: Path, env: Mapping[str, str],
                user: tuple[int, int] | None = None) -> tuple[bool, str]:
    who = {"user": user[0], "group": user[1], "extra_groups": [user[1]]} if user is not None else {}
    try:
        proc = await trio.lowlevel.open_process(command, cwd=str(cwd), env=dict(env), stdin=subprocess.DEVNULL,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                start_new_session=True, **who)
    except (OSError, ValueError) as e:
        return False, f"cannot execute {command[0]!r}: {getattr(e, 'strerror', None) or e}"
    try:
        code = await proc.wait()
    finally:
        if proc.returncode is None:  # timed out (cancelled): end its whole session
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            with trio.CancelScope(shield=True):
                await proc.wait()
    if code == 0:
        return True, ""
    return False, f"{command[0]} exited with status {code}" if code > 0 else \
        f"{command[0]} was killed by signal {-code}"
