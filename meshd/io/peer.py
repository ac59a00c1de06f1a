"""The peer port: framed JSON over mutual TLS (meshd.io.tls) for joins and member calls.

Three conversations exist:
- join: `join_hello` (the token's site) -> `challenge` (fresh nonce, X25519 key) ->
  `join_request` (token proof, signature) -> `welcome` (sealed: Raft secret and partners) or
  `refused` (a reason). With a token the member's site issued for a site that has no members
  yet, the sealed welcome says `founder: true` and carries, instead of the Raft secret, what
  the joiner needs to found that site in this mesh: a certificate for it, the root key and
  the root-signed trust documents (see meshd.admission).
- member call: `member_hello` -> `challenge` -> `member_call` (HMAC with a key derived from
  the site secret over nonce and call) -> `stream` frames and a final `result`/`error`.
- beats: `beat_hello`, then a `beat` frame every beat period for as long as the caller is a
  non-voter following this node; nothing is answered. A member of this site proves who it
  is by its client certificate alone (it names the node). This is how the leader knows a
  non-voter is alive without a Raft commit per beat.
- artifact pieces: `pieces_hello` (a digest) -> `pieces_ready`, then the connection carries
  meshd.artifacts.piecewire's requests and raw pieces (meshd.io.artifactpeer). Like sync,
  any member of the mesh that is not revoked may fetch: a site pulls from another.
- document sync: `sync_hello` (the caller's site) -> `sync_ready`, then the connection carries
  crdt.sync's binary messages both ways until either side ends it (meshd.io.docsync). Any
  member of the mesh may sync, whatever its site: its client certificate must chain to the
  mesh root, name this mesh, and belong to a node not revoked anywhere we know of.

Invariants:
- Anything that is not a well-formed frame of a known type gets one `error` frame with the
  reason, and the connection is closed; the listener keeps serving others.
- A connection that says nothing for HANDSHAKE_TIMEOUT is dropped (slow-loris guard).
- Nonces are single-use: a challenge lives only for one connection.
- Every connection is TLS 1.3; bytes that are not a TLS handshake end the connection. A member
  call is served only to a client certificate of a current member whose node id is the one
  the call names (and whose HMAC with the site secret checks out).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import select
import socket
import ssl
import struct
from typing import Any, AsyncIterator, Awaitable, Callable

import trio

from meshd import tokens
from meshd.io.logthrottle import throttle
from meshd.io.wakeup import sleep_slot
from meshd.wire import PEER_MAX_FRAME, FrameDecoder, FrameError, encode_frame

# Junk, failed handshakes and refused conversations are logged per connection: throttled, so a
# flood costs a line per message every ten seconds (meshd.io.logthrottle).
log = throttle(logging.getLogger("meshd.peer"))

# A peer that has not finished its handshake step within this time is dropped: generous for
# a device on a lossy link, short enough that idle sockets cannot pile up.
HANDSHAKE_TIMEOUT = 10.0
# Calls a member may make with its certificate alone: asking for the current site secret,
# which a member that missed a rotation (it was down) no longer knows.
CERTIFICATE_ONLY_CALLS = frozenset({"site_secret"})
# At most this many peer connections are served at once, and this many from one host (a
# member keeps a few: beats, a sync session, calls; joins are one at a time). Beyond either a
# new connection is closed at accept, before its TLS handshake costs anything, so a flood
# from a few hosts cannot take the places members need. Loopback is one host for every
# daemon of a machine (tests, a demo): it counts only against the total.
MAX_PEER_CONNECTIONS = 256
MAX_PEER_CONNECTIONS_PER_HOST = 32


class PeerAdmission:
    """Which new peer connections are served (pure): bounded in total and per host."""

    def __init__(self, total: int = MAX_PEER_CONNECTIONS, per_host: int = MAX_PEER_CONNECTIONS_PER_HOST) -> None:
        self.total, self.per_host = total, per_host
        self.open: dict[str, int] = {}
        self.refused = 0  # since the caller last reported them

    def admit(self, host: str) -> bool:
        loopback = host in ("127.0.0.1", "::1")
        if sum(self.open.values()) >= self.total or (not loopback and self.open.get(host, 0) >= self.per_host):
            self.refused += 1
            return False
        self.open[host] = self.open.get(host, 0) + 1
        return True

    def release(self, host: str) -> None:
        left = self.open.get(host, 0) - 1
        if left > 0:
            self.open[host] = left
        else:
            self.open.pop(host, None)


class PeerError(Exception):
    """The peer refused, or spoke out of turn; the message is a reason to show."""


class FramedStream:
    def __init__(self, stream: trio.abc.Stream, max_frame: int = PEER_MAX_FRAME):
        self.stream = stream
        self._decoder = FrameDecoder(max_frame)
        self._pending: list[dict] = []
        self._max_frame = max_frame

    async def send(self, obj: dict) -> None:
        await self.stream.send_all(encode_frame(obj, max_frame=self._max_frame))

    async def receive(self, timeout: float = HANDSHAKE_TIMEOUT) -> dict:
        with trio.fail_after(timeout):
            while not self._pending:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise PeerError("peer closed the connection")
                self._pending.extend(self._decoder.feed(data))
        return self._pending.pop(0)

    def has_frame(self) -> bool:
        """A whole frame is already here: `receive` returns it without reading."""
        return bool(self._pending)

    def take_buffered(self) -> bytes:
        """The bytes received after the last frame: the start of what follows in another
        codec (the document sync after `sync_ready`)."""
        if self._pending:
            raise PeerError("frames arrived where the sync stream should start")
        return self._decoder.take_buffered()

    async def aclose(self) -> None:
        with trio.move_on_after(1):
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the peer went away mid-close (TLS close_notify): nothing left to do


# Linux `struct tcp_info` (linux/tcp.h): the bytes asked for, and where `tcpi_last_data_recv`
# (milliseconds since the last data segment arrived, at the kernel's jiffy resolution) sits;
# the layout is fixed ABI since Linux 2.6.
TCP_INFO_SIZE = 104
TCP_INFO_LAST_DATA_RECV = 52


class Arrivals:
    """What the kernel knows of one TCP connection's incoming side, asked without waiting on
    it: whether bytes are waiting to be read, and how long ago data last arrived. This lets a
    reader come to the connection on its own schedule (the leader reads non-voters' beats at
    shared instants, meshd.io.beatlines) and still date the news to its arrival."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        inner = getattr(stream, "transport_stream", stream)  # a TLS stream: the socket under it
        self._socket = getattr(inner, "socket", None)
        self._poll = None
        if self._socket is not None:
            self._poll = select.poll()
            self._poll.register(self._socket.fileno(), select.POLLIN)

    def readable(self) -> bool:
        """Bytes (or the end of the stream) are waiting: a read now does not wait for the peer.
        True where the stream has no socket to ask (the caller then reads, and may wait)."""
        if self._poll is None:
            return True
        try:
            return bool(self._poll.poll(0))
        except OSError:
            return True  # let the read find the error

    def last_data_age(self) -> float | None:
        """Seconds since data last arrived on the connection (TCP_INFO), None where the
        platform does not say."""
        if self._socket is None or not hasattr(socket, "TCP_INFO"):
            return None
        try:
            info = self._socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
        except OSError:
            return None
        if len(info) < TCP_INFO_LAST_DATA_RECV + 4:
            return None
        return struct.unpack_from("I", info, TCP_INFO_LAST_DATA_RECV)[0] / 1000.0


def member_key(site_secret: str) -> bytes:
    return hashlib.sha256(b"meshd-member-rpc-v1\0" + site_secret.encode()).digest()


def call_mac(key: bytes, nonce: bytes, node_id: str, call: dict) -> str:
    return hmac.new(key, nonce + node_id.encode() + b"\0" + tokens.canonical(call), hashlib.sha256).hexdigest()


# --- server side ----------------------------------------------------------------------------

# (connection, its join_hello, the address it came from "ip:port")
JoinHandler = Callable[[FramedStream, dict, str], Awaitable[None]]
# (connection, the TLS stream under it, (site, node id) named by the verified certificate)
SyncHandler = Callable[[FramedStream, trio.abc.Stream, tuple[str, str]], Awaitable[None]]
# (the call, a sender of stream items, the authenticated caller's node id) -> the result
CallHandler = Callable[[dict, Callable[[dict], Awaitable[None]], str], Awaitable[Any]]
# (connection, the TLS stream under it, its pieces_hello) (meshd.io.artifactpeer)
PiecesHandler = Callable[[FramedStream, trio.abc.Stream, dict], Awaitable[None]]
# (connection, node id named by the verified member certificate)
BeatHandler = Callable[[FramedStream, str], Awaitable[None]]


async def serve_peer_connection(stream: trio.SocketStream, *, on_join: JoinHandler,
                                on_member_call: CallHandler, member_secret: Callable[[], str | None],
                                is_member: Callable[[str], bool], tls: Callable[[], ssl.SSLContext | None],
                                cert_member: Callable[[dict | None], tuple[str, str] | None],
                                track: Callable[[str, str], Any],
                                on_sync: SyncHandler | None = None,
                                sync_member: Callable[[dict | None], tuple[str, str] | None] | None = None,
                                on_beats: BeatHandler | None = None,
                                on_pieces: PiecesHandler | None = None) -> None:
    """One peer connection: TLS, then a join or one member call.

    `cert_member(peer certificate)` names the (site, node id) of the member of this site a
    verified client certificate belongs to; `track(site, node_id)` is a context manager under
    which a member's call or sync session runs (so that revoking the member can cut it).
    `sync_member(peer certificate)` names the (site, node id) of a mesh member of any site
    that may sync, and `on_sync` runs the sync."""
    context = tls()
    if context is None:
        await stream.aclose()  # no member certificate yet: nothing to serve
        return
    secure = trio.SSLStream(stream, context, server_side=True)
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await secure.do_handshake()
    except (trio.BrokenResourceError, trio.TooSlowError, trio.ClosedResourceError) as e:
        log.info("peer TLS handshake failed", extra={"reason": str(e.__cause__ or e) or type(e).__name__,
                                                     "peer": _peer_name(stream)})
        await trio.aclose_forcefully(secure)
        return
    conn = FramedStream(secure)
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):  # a peer that connects and says nothing goes
            hello = await conn.receive()
        kind = hello.get("type")
        if kind == "join_hello":
            await on_join(conn, hello, _peer_name(stream))
        elif kind == "member_hello":
            named = cert_member(secure.getpeercert())
            if named is None:
                raise PeerError("member calls need a valid member certificate of this mesh")
            with track(*named):
                await _serve_member_call(conn, on_member_call, member_secret, is_member, named[1])
        elif kind == "beat_hello" and on_beats is not None:
            named = cert_member(secure.getpeercert())
            if named is None:
                raise PeerError("beats need a valid member certificate of this site")
            with track(*named):
                await on_beats(conn, named[1])
        elif kind == "pieces_hello" and on_pieces is not None and sync_member is not None:
            named = sync_member(secure.getpeercert())
            if named is None:
                raise PeerError("artifact pieces need the certificate of a member of this mesh that is not revoked")
            with track(*named):
                await on_pieces(conn, secure, hello)
        elif kind == "sync_hello" and on_sync is not None and sync_member is not None:
            named = sync_member(secure.getpeercert())
            if named is None:
                raise PeerError("document sync needs the certificate of a member of this mesh that is not revoked")
            with track(*named):
                await on_sync(conn, secure, named)
        else:
            raise PeerError(f"unknown message type {kind!r}")
    except FrameError as e:
        await _refuse(conn, f"bad frame: {e}")
        log.warning("peer sent a bad frame", extra={"reason": str(e), "peer": _peer_name(stream)})
    except PeerError as e:
        await _refuse(conn, str(e))
        log.info("peer conversation refused", extra={"reason": str(e), "peer": _peer_name(stream)})
    except trio.TooSlowError:
        await _refuse(conn, "handshake timed out")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await conn.aclose()


def peer_host(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except (OSError, AttributeError):
        return "?"


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except (OSError, AttributeError):
        return "?"


async def _refuse(conn: FramedStream, reason: str) -> None:
    with trio.move_on_after(1):
        try:
            await conn.send({"type": "error", "error": reason})
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def _serve_member_call(conn: FramedStream, on_member_call: CallHandler,
                             member_secret: Callable[[], str | None], is_member: Callable[[str], bool],
                             cert_node_id: str) -> None:
    secret = member_secret()
    if secret is None:
        raise PeerError("this node is not a member of any site yet")
    nonce = os.urandom(32)
    await conn.send({"type": "challenge", "nonce": nonce.hex()})
    msg = await conn.receive()
    if msg.get("type") != "member_call":
        raise PeerError("expected member_call")
    node_id, call, mac = msg.get("node_id"), msg.get("call"), msg.get("mac")
    if not isinstance(node_id, str) or not isinstance(call, dict) or not isinstance(mac, str):
        raise PeerError("member_call needs node_id, call and mac")
    if node_id != cert_node_id:
        raise PeerError("member authentication failed: the call names another node than the certificate")
    if not is_member(node_id):
        raise PeerError("member authentication failed: not a current member")
    if call.get("call") not in CERTIFICATE_ONLY_CALLS and not hmac.compare_digest(
            call_mac(member_key(secret), nonce, node_id, call), mac):
        raise PeerError("member authentication failed")

    async def send_stream(item: dict) -> None:
        await conn.send({"type": "stream", "item": item})

    try:
        result = await on_member_call(call, send_stream, node_id)
    except PeerError as e:
        await conn.send({"type": "error", "error": str(e)})
        return
    await conn.send({"type": "result", "result": result})


# --- client side ----------------------------------------------------------------------------


async def open_peer(address: str, context: ssl.SSLContext, timeout: float = 3.0,
                    expect: Callable[[dict | None], bool] | None = None) -> FramedStream:
    """A TLS connection to a peer; `expect(server certificate)` must accept who answered."""
    host, _, port = address.rpartition(":")
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(host, int(port))
        secure = trio.SSLStream(stream, context, server_side=False)
        try:
            await secure.do_handshake()
        except trio.BrokenResourceError as e:
            await trio.aclose_forcefully(secure)
            raise PeerError(f"TLS with {address} failed: {e.__cause__ or e}") from None
    if expect is not None and not expect(secure.getpeercert()):
        await trio.aclose_forcefully(secure)
        raise PeerError(f"{address} is not the member it should be (certificate)")
    return FramedStream(secure)


async def member_call(address: str, *, node_id: str, site_secret: str, call: dict, context: ssl.SSLContext,
                      expect: Callable[[dict | None], bool] | None = None,
                      on_stream: Callable[[dict], Awaitable[None]] | None = None,
                      timeout: float | None = 10.0) -> Any:
    conn = await open_peer(address, context, expect=expect)
    try:
        return await _member_conversation(conn, node_id, site_secret, call, on_stream, timeout)
    except trio.BrokenResourceError as e:
        # Under TLS 1.3 a server that refuses our certificate says so on the first read.
        raise PeerError(f"{address} closed the connection ({e.__cause__ or 'refused'})") from None
    finally:
        await conn.aclose()


async def _member_conversation(conn: FramedStream, node_id: str, site_secret: str, call: dict,
                               on_stream: Callable[[dict], Awaitable[None]] | None, timeout: float | None) -> Any:
    await conn.send({"type": "member_hello"})
    challenge = await conn.receive()
    if challenge.get("type") != "challenge":
        raise PeerError(challenge.get("error") or "peer did not send a challenge")
    nonce = bytes.fromhex(challenge["nonce"])
    await conn.send({"type": "member_call", "node_id": node_id, "call": call,
                     "mac": call_mac(member_key(site_secret), nonce, node_id, call)})
    while True:
        msg = await conn.receive(timeout=timeout if timeout is not None else float("inf"))
        kind = msg.get("type")
        if kind == "stream" and on_stream is not None:
            await on_stream(msg.get("item", {}))
        elif kind == "result":
            return msg.get("result")
        elif kind == "error":
            raise PeerError(msg.get("error", "peer error"))


async def send_beats(address: str, context: ssl.SSLContext, *, period: float, keep_on: Callable[[], bool],
                     expect: Callable[[dict | None], bool] | None = None) -> None:
    """Beat to the member at `address` every `period` seconds while `keep_on()`; returns when
    it says stop, raises OSError, PeerError, TooSlowError or BrokenResourceError when the
    connection fails."""
    conn = await open_peer(address, context, expect=expect)
    try:
        await conn.send({"type": "beat_hello"})
        while keep_on():
            await conn.send({"type": "beat"})
            await sleep_slot(period)  # with the loop's other periodic waits (meshd.io.wakeup)
    finally:
        await conn.aclose()


async def aiter_frames(conn: FramedStream) -> AsyncIterator[dict]:
    while True:
        yield await conn.receive(timeout=float("inf"))
