"""meshd.io.healthcheck against real listeners and processes on this machine."""

from __future__ import annotations

import http.server
import os
import socket
import threading
import time

import pytest
import trio

from meshd.io.healthcheck import run_check
from meshd.io.ports import free_port
from meshd.state import HealthCheck


def check(kind: str, **changes) -> tuple[bool, str]:
    spec = HealthCheck(kind=kind, timeout_s=changes.pop("timeout_s", 1.0), **changes)
    return trio.run(run_check, spec, changes.get("cwd", os.getcwd()), dict(os.environ))


@pytest.fixture
def unused_port() -> int:
    return free_port()


@pytest.fixture
def http_server():
    """A real HTTP server on loopback: /ok answers 200, /moved 302, /broken 500."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            code = {"/ok": 200, "/moved": 302, "/broken": 500}.get(self.path, 404)
            self.send_response(code)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture
def raw_server():
    """A listener that answers each connection with `reply` (or nothing, and holds it)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    state = {"reply": b""}
    held = []

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.recv(4096)
            if state["reply"]:
                conn.sendall(state["reply"])
                conn.close()
            else:
                held.append(conn)

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1], state
    listener.close()
    for conn in held:
        conn.close()


def test_tcp_passes_on_a_listening_port_and_fails_on_a_closed_one(http_server, unused_port):
    assert check("tcp", port=http_server) == (True, "")
    passed, reason = check("tcp", port=unused_port)
    assert not passed and "Connection refused" in reason


def test_http_passes_on_2xx_and_3xx_and_fails_otherwise(http_server):
    assert check("http", port=http_server, path="/ok") == (True, "")
    assert check("http", port=http_server, path="/moved") == (True, "")
    assert check("http", port=http_server, path="/broken") == (False, "http /broken: status 500")
    assert check("http", port=http_server, path="/missing") == (False, "http /missing: status 404")


def test_http_junk_or_silence_fails_within_the_timeout(raw_server):
    port, state = raw_server
    state["reply"] = b"\x00" * 5000
    passed, reason = check("http", port=port, path="/")
    assert not passed and "not an HTTP answer" in reason
    state["reply"] = b""
    start = time.monotonic()
    assert check("http", port=port, path="/", timeout_s=0.3) == (False, "no answer within 0.3 s")
    assert time.monotonic() - start < 2.0


def test_exec_passes_on_status_0_and_a_hung_check_is_killed_with_its_children(tmp_path):
    assert check("exec", command=("true",)) == (True, "")
    assert check("exec", command=("sh", "-c", "exit 3")) == (False, "sh exited with status 3")
    marker = tmp_path / "child.pid"
    passed, reason = check("exec", command=("sh", "-c", f"sleep 30 & echo $! > {marker}; wait"), timeout_s=0.5)
    assert (passed, reason) == (False, "no answer within 0.5 s")
    child = int(marker.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the check's child outlived its timeout")
    assert check("exec", command=("/no/such/program",))[1].startswith("cannot execute '/no/such/program'")
