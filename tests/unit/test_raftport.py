"""The Raft port under hostile traffic (meshd.io.raftport): a real meshd Raft node (its own
pysyncobj conf, encrypted TCP on loopback) attacked over real sockets. Each of these held a
connection (or the listener) hostage with pysyncobj's own transport."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time

import pytest
from pysyncobj import SyncObjException

from meshd.io import raftport
from meshd.io.ports import free_port
from meshd.io.raft import BIND_TRIES, RaftNode, make_conf
from meshd.io.snapshots import SnapshotStore

STEP_TIMEOUT = 10.0


@pytest.fixture
def node(tmp_path):
    address = f"127.0.0.1:{free_port('127.0.0.1')}"
    store = SnapshotStore()
    conf = make_conf(data_dir=tmp_path / "a", password="site secret", bind_address=address, min_timeout=0.3,
                     max_timeout=0.6, append_period=0.05, snapshots=store)
    raft = RaftNode(address, [], conf, lambda command, result: None, lambda: None, tick=0.05, snapshots=store)
    deadline = time.monotonic() + STEP_TIMEOUT
    while not raft.raft._isLeader():
        assert time.monotonic() < deadline, "no leader"
        time.sleep(0.02)
    try:
        yield raft, address
    finally:
        raft.close()


def _connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=STEP_TIMEOUT)
    return sock


def _cut(sock: socket.socket, within: float) -> bool:
    """Whether the node closes `sock` within `within` seconds."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_a_peer_announcing_a_huge_message_is_cut_at_once(node):
    _raft, address = node
    sock = _connect(address)
    sock.sendall(struct.pack("i", 2**31 - 1) + b"x" * 65536)  # "2 GiB follow"
    assert _cut(sock, 2.0)
    negative = _connect(address)
    negative.sendall(struct.pack("i", -5) + b"x" * 16)
    assert _cut(negative, 2.0)


def test_a_flood_of_cut_peers_logs_one_line_not_one_per_connection(node, caplog):
    _raft, address = node
    for throttle in raftport.log.filters:  # forget the lines the earlier tests let through
        throttle._messages.clear()
    with caplog.at_level("INFO", logger="meshd.raft"):
        for _ in range(5):
            sock = _connect(address)
            sock.sendall(struct.pack("i", 2**31 - 1))
            assert _cut(sock, 2.0)
            sock.close()
    cut_lines = [r for r in caplog.records if r.getMessage().startswith("raft peer cut")]
    assert len(cut_lines) == 1


def test_a_message_within_the_bound_is_buffered_until_complete(node):
    """Not cut for its size: only for not being from a holder of the site secret."""
    _raft, address = node
    sock = _connect(address)
    sock.sendall(struct.pack("i", 1024 * 1024))
    sock.sendall(b"x" * 512 * 1024)
    assert not _cut(sock, 0.5)  # half a legitimate-size message: waited for
    sock.sendall(b"x" * 512 * 1024)
    assert _cut(sock, 2.0)  # complete, and junk: cut


def test_silent_and_surplus_unauthenticated_connections_are_cut(node, monkeypatch):
    monkeypatch.setattr(raftport, "UNKNOWN_TIMEOUT", 3.0)
    _raft, address = node
    socks = [_connect(address) for _ in range(raftport.MAX_UNKNOWN_PER_HOST + 4)]
    time.sleep(0.5)
    open_now = [s for s in socks if not _cut(s, 0.05)]
    assert len(open_now) == raftport.MAX_UNKNOWN_PER_HOST  # the surplus from this host went at once
    assert all(_cut(s, 5.0) for s in open_now)  # the rest once silent past the timeout


def test_the_node_keeps_working_through_the_attacks(node):
    raft, address = node
    junk = [_connect(address) for _ in range(20)]
    big = _connect(address)
    big.sendall(struct.pack("i", 2**31 - 1))
    time.sleep(0.3)
    assert raft.raft._isLeader()
    for sock in junk + [big]:
        sock.close()


RUN_OUT_OF_DESCRIPTORS = r'''
import resource, select, sys
from pysyncobj.poller import createPoller
from meshd.io.raftport import SiteTcpServer
resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))
poller = createPoller("auto")
kept = []
server = SiteTcpServer(poller, "127.0.0.1", int(sys.argv[1]), onNewConnection=kept.append)
server.bind()
print("bound", flush=True)
while not select.select([sys.stdin], [], [], 0)[0]:  # serve until the test says stop
    poller.poll(0.05)  # the connections it keeps run the process out of descriptors
print("listening" if server._TcpServer__socket.fileno() >= 0 and server._TcpServer__fileno is not None
      else "closed", len(kept), flush=True)
'''


def test_running_out_of_file_descriptors_does_not_close_the_listener(tmp_path):
    port = free_port("127.0.0.1")
    child = subprocess.Popen([sys.executable, "-c", RUN_OUT_OF_DESCRIPTORS, str(port)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "bound"
        flood, failures = [], 0
        while len(flood) < 80 and failures < 5:  # far beyond the 32 descriptors it may hold
            try:
                flood.append(socket.create_connection(("127.0.0.1", port), timeout=0.5))
            except OSError:
                failures += 1
        time.sleep(0.5)
        for sock in flood:
            sock.close()
        late = socket.create_connection(("127.0.0.1", port), timeout=2)  # still accepted
        late.close()
        out, _ = child.communicate("stop\n", timeout=15)
    finally:
        child.kill()
    verdict = out.split()
    assert verdict[0] == "listening", out
    assert 15 <= int(verdict[1]) < 32  # it ran out: it took what its descriptors allowed, and no more


def test_a_raft_port_taken_after_the_start_up_check_fails_the_start_instead_of_spinning(tmp_path):
    """pysyncobj retried its bind forever on the caller's thread (the trio loop): a port taken
    between the start-up check and the bind wedged the daemon until its watchdog killed it."""
    with socket.socket() as holder:  # an outgoing connection's local port would do the same
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        address = f"127.0.0.1:{holder.getsockname()[1]}"
        store = SnapshotStore()
        conf = make_conf(data_dir=tmp_path / "a", password="site secret", bind_address=address, min_timeout=0.3,
                         max_timeout=0.6, append_period=0.05, snapshots=store)
        started = time.monotonic()
        with pytest.raises(SyncObjException):
            RaftNode(address, [], conf, lambda command, result: None, lambda: None, tick=0.05, snapshots=store)
        assert time.monotonic() - started < BIND_TRIES * conf.bindRetryTime + 5  # gave up, far from the watchdog
