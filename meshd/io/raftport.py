"""The Raft port held against hostile traffic: pysyncobj's TCP connection and server, with
the limits an edge LAN needs (anyone on it can connect to the port).

pysyncobj reads whatever a peer sends into one buffer (`bytes +=`, quadratic) until the
message length the peer announced has arrived, keeps connections that never send a message
forever, and closes its listener for good when `accept` fails (file descriptors ran out).
Here:
- `SiteTcpConnection` refuses a message whose announced length is negative or beyond
  MAX_RAFT_MESSAGE as soon as its 4-byte header is in (the peer is cut, nothing is buffered
  beyond it), and buffers in a bytearray (linear).
- `SiteTcpServer` survives a failed `accept`: on running out of file descriptors it uses a
  reserved descriptor to take the waiting connection off the queue and close it, so the
  listener neither closes nor spins, and says so in the log at most once per LOG_EVERY.
- The `meshd.raft` logger is throttled (meshd.io.logthrottle): a flood of cut peers costs a
  line every ten seconds, not a line per connection.
- `UnauthenticatedLimits` decides which connections that have not yet sent a message the
  site secret opens (pysyncobj's "unknown" connections) must go: beyond MAX_UNKNOWN_PER_HOST
  from one host or MAX_UNKNOWN in total at once, or older than UNKNOWN_TIMEOUT.

Invariants:
- A connection that opened a message with the site secret (a member) is never limited or
  timed out here: members keep their long-lived links (meshd.io.raft: connectionTimeout).
- Limits cost O(unknown connections) per check; nothing grows with what peers announce.
- The pure part (`UnauthenticatedLimits`) takes `now`; the socket work stays in the two
  pysyncobj subclasses.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import socket
import struct
import zlib
from dataclasses import dataclass, field

from pysyncobj import tcp_server
from pysyncobj.monotonic import monotonic as raft_clock
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.tcp_connection import TcpConnection

from meshd.io.logthrottle import throttle

# Anyone who can reach the port can cause these lines (a cut peer, a refused connection), so
# each message is let through at most once per logthrottle.EVERY, with the count held back.
log = throttle(logging.getLogger("meshd.raft"))

# The largest message a member sends: an append-entries batch (pysyncobj's 64 KiB batch
# bound, plus one command, which the admin socket and peer port bound at 1 MiB) or a
# snapshot part (logCompactionBatchSize, 64 KiB). 16 MiB leaves ample room and stops a
# peer announcing 2 GiB from making this node buffer it.
MAX_RAFT_MESSAGE = 16 * 1024 * 1024
# Connections that have not shown the site secret yet. A member opens one or two links to
# each other member; a site has a few dozen members; a restart storm reconnects all at once.
MAX_UNKNOWN = 128
MAX_UNKNOWN_PER_HOST = 8  # one host's members (a lab's namespaces aside, one) reconnecting
# A member's first message follows its connect within a round trip (the address and its
# encryption handshake); a connection silent this long is not a member.
UNKNOWN_TIMEOUT = 5.0
# Log the refusals of a flood at most this often (each line says how many).
LOG_EVERY = 10.0
# Accept failures that mean "no descriptor or memory left now", not a broken listener.
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class SiteTcpConnection(TcpConnection):
    """pysyncobj's connection with the announced length checked before buffering."""

    def _TcpConnection__processRead(self) -> bool:  # overrides the name-mangled private method
        try:
            incoming = self._TcpConnection__socket.recv(self._TcpConnection__recvBufferSize)
        except socket.error as e:
            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                self.disconnect()
            return False
        if not incoming:
            self.disconnect()
            return False
        buffer = self._TcpConnection__readBuffer
        if not isinstance(buffer, bytearray):  # pysyncobj resets it to bytes() on (re)connect
            buffer = self._TcpConnection__readBuffer = bytearray(buffer)
        buffer += incoming
        if len(buffer) >= 4:
            announced = struct.unpack("i", buffer[:4])[0]
            if not 0 <= announced <= MAX_RAFT_MESSAGE:
                log.info("raft peer cut: it announced a message of %d bytes (limit %d)", announced,
                         MAX_RAFT_MESSAGE, extra={"peer": self.peer_host()})
                self.disconnect()
                return False
        return True

    def _TcpConnection__processParseMessage(self):
        """pysyncobj's parsing (decrypt, check the stamp and key, unpickle), on the bytearray."""
        buffer = self._TcpConnection__readBuffer
        if len(buffer) < 4:
            return None
        length = struct.unpack("i", buffer[:4])[0]
        if len(buffer) - 4 < length:
            return None
        data = bytes(buffer[4:4 + length])
        try:
            if self.encryptor:
                stamp = self.encryptor.extract_timestamp(data)
                assert stamp >= self.recvLastTimestamp
                self.recvLastTimestamp = stamp
                data = self.encryptor.decrypt(data)
            message = pickle.loads(zlib.decompress(data))
            if self.recvRandKey:
                rand_key, message = message
                assert rand_key == self.recvRandKey
        except Exception:  # not from a holder of the site secret, or damaged: cut, as pysyncobj does
            self.disconnect()
            return None
        del buffer[:4 + length]
        return message

    def peer_host(self) -> str:
        sock = self._TcpConnection__socket
        try:
            return str(sock.getpeername()[0]) if sock is not None else "?"
        except OSError:
            return "?"


class SiteTcpServer(tcp_server.TcpServer):
    """pysyncobj's listener, which keeps listening when descriptors run out."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._reserve = _open_reserve()
        self._dropped = 0
        self._logged_at = float("-inf")

    def _TcpServer__onNewConnection(self, descr, event) -> None:
        if not event & POLL_EVENT_TYPE.READ:
            if event & POLL_EVENT_TYPE.ERROR:
                self.unbind()
            return
        listener = self._TcpServer__socket
        try:
            sock, _addr = listener.accept()
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ECONNABORTED, errno.EINTR):
                return
            if e.errno in OUT_OF_RESOURCES:
                self._shed(listener, e)
                return
            log.warning("raft listener failed; it is opened again", extra={"reason": str(e)})
            self.unbind()  # the transport binds again on its next tick
            return
        try:
            for option, value in ((socket.SO_SNDBUF, self._TcpServer__sendBufferSize),
                                  (socket.SO_RCVBUF, self._TcpServer__recvBufferSize)):
                sock.setsockopt(socket.SOL_SOCKET, option, value)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            conn = SiteTcpConnection(poller=self._TcpServer__poller, socket=sock,
                                     timeout=self._TcpServer__connectionTimeout,
                                     sendBufferSize=self._TcpServer__sendBufferSize,
                                     recvBufferSize=self._TcpServer__recvBufferSize,
                                     keepalive=self._TcpServer__keepalive)
        except OSError:
            sock.close()
            return
        self._TcpServer__onNewConnectionCallback(conn)

    def _shed(self, listener: socket.socket, error: OSError) -> None:
        """No descriptor left: free the reserve, take the waiting connection off the queue
        and close it, take the reserve back. The listener stays open and quiet."""
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
        try:
            sock, _addr = listener.accept()
            sock.close()
        except OSError:
            pass
        self._reserve = _open_reserve()
        self._dropped += 1
        now = raft_clock()
        if now - self._logged_at >= LOG_EVERY:
            self._logged_at = now
            log.warning("raft port out of file descriptors: refusing connections",
                        extra={"reason": str(error), "refused": self._dropped})
            self._dropped = 0


def _open_reserve() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return None


@dataclass
class UnauthenticatedLimits:
    """Which connections that have not shown the site secret yet must go (pure)."""

    opened: dict[object, tuple[str, float]] = field(default_factory=dict)  # connection -> (host, opened at)
    refused: int = 0  # since the last log line
    logged_at: float = float("-inf")

    def admit(self, conn: object, host: str, now: float) -> bool:
        """Whether a new unauthenticated connection from `host` may stay."""
        same_host = sum(1 for h, _ in self.opened.values() if h == host)
        if len(self.opened) >= MAX_UNKNOWN or same_host >= MAX_UNKNOWN_PER_HOST:
            self.refused += 1
            return False
        self.opened[conn] = (host, now)
        return True

    def settled(self, conn: object) -> None:
        """It authenticated, or it closed: no longer counted."""
        self.opened.pop(conn, None)

    def expired(self, now: float) -> list[object]:
        """The connections silent past UNKNOWN_TIMEOUT (they are forgotten here)."""
        old = [conn for conn, (_host, at) in self.opened.items() if now - at >= UNKNOWN_TIMEOUT]
        for conn in old:
            del self.opened[conn]
        return old

    def report_due(self, now: float) -> int:
        """How many were refused since the last report, when a report is due (else 0)."""
        if not self.refused or now - self.logged_at < LOG_EVERY:
            return 0
        count, self.refused, self.logged_at = self.refused, 0, now
        return count
