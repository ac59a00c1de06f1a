"""Artifact pieces over the peer port: serving them, and one connection that fetches them.

Conversation (after the peer port's mutual TLS; the caller's certificate must be a mesh
member's, not revoked: a site pulls from another site, members share inside one):
    fetcher -> {"type": "pieces_hello", "digest": "sha256:..."}
    server  -> {"type": "pieces_ready", "manifest": {...}, "have": "all" | [piece indices]}
               or {"type": "error", "error": reason}
then the connection carries meshd.artifacts.piecewire's requests and answers until the
fetcher closes it.

Invariants:
- A server sends only verified bytes: of a blob its store holds complete, or the pieces of
  a fetch in progress here that its PieceFetch accepted (`have`, at the time of the
  request). A request for anything else is answered with a refusal; the connection ends.
- Every piece sent is counted against this node's upload limit before it is sent.
- What a fetcher receives is believed by nobody here: the service hands every piece to its
  PieceFetch, which checks it against the piece list.
"""

from __future__ import annotations

import logging
import ssl
from typing import Callable

import trio

from meshd.artifacts import piecewire as W
from meshd.artifacts.manifest import digest_problem
from meshd.artifacts.ratelimit import UploadLimit
from meshd.io import peer
from meshd.io.artifactstore import ArtifactStore
from meshd.io.logthrottle import throttle

log = throttle(logging.getLogger("meshd.artifacts"))

# A piece is sent in chunks of this size, each waiting for the upload limit: a 1 MiB piece is
# spread over the second a slow limit gives it instead of leaving in one burst.
SEND_CHUNK = 64 * 1024
# A fetcher that sends no request for this long is gone; its place goes to others.
IDLE_TIMEOUT = 60.0
# A piece answer that has not arrived after this long: the peer or its link is stuck (a
# 16 MiB piece at 1 Mbit/s takes two minutes; the pieces of a thin link are 1 MiB).
ANSWER_TIMEOUT = 120.0
RECEIVE_CHUNK = 256 * 1024


# An artifact being fetched here: its signed manifest and the pieces verified so far (a live
# view: it grows while the fetch goes on).
InProgress = Callable[[str], "tuple[dict, frozenset[int]] | None"]


async def serve_pieces(conn: peer.FramedStream, stream: trio.abc.Stream, hello: dict, store: ArtifactStore,
                       limit: UploadLimit, counts: dict[str, int], in_progress: InProgress = lambda digest: None) -> None:
    """Serve one fetcher the pieces of an artifact this node holds complete, or the verified
    pieces of one it is fetching (`in_progress`); the bytes sent are added to
    `counts["served_bytes"]`."""
    digest = hello.get("digest")
    problem = digest_problem(digest)
    if problem:
        raise peer.PeerError(f"pieces_hello: {problem}")
    assert isinstance(digest, str)
    manifest = store.manifest_document(digest) if store.holds(digest) else None
    piece_list = store.piece_list(digest)
    partial = None
    if manifest is None or piece_list is None:
        fetching = in_progress(digest)
        piece_list = store.partial_pieces(digest)
        if fetching is None or piece_list is None:
            raise peer.PeerError(f"this node does not hold {digest[:19]}...")
        manifest, partial = fetching[0], fetching[1]
    body = manifest.get("body", {})
    piece_size, size = body.get("piece_size"), body.get("size")
    if not isinstance(piece_size, int) or not isinstance(size, int) or piece_size <= 0:
        raise peer.PeerError(f"this node's manifest of {digest[:19]}... is damaged")
    await conn.send({"type": "pieces_ready", "manifest": manifest,
                     "have": "all" if partial is None else sorted(partial)})
    decoder = W.RequestDecoder()
    try:
        pending = decoder.feed(conn.take_buffered())
    except W.PieceWireError as e:
        raise peer.PeerError(f"bad piece request: {e}") from None
    while True:
        while not pending:
            with trio.fail_after(IDLE_TIMEOUT):
                data = await stream.receive_some(RECEIVE_CHUNK)
            if not data:
                return
            try:
                pending = decoder.feed(data)
            except W.PieceWireError as e:
                raise peer.PeerError(f"bad piece request: {e}") from None
        request = pending.pop(0)
        if isinstance(request, W.WantList):
            await _send(stream, W.piece_list(piece_list), limit)
            continue
        index = request.index
        if not 0 <= index * piece_size < size:
            await stream.send_all(W.refusal(f"there is no piece {index}"))
            return
        if partial is not None and not store.holds(digest):
            fetching = in_progress(digest)
            if fetching is None or index not in fetching[1]:
                await stream.send_all(W.refusal(f"piece {index} is not verified here yet"))
                return
        length = min(piece_size, size - index * piece_size)
        try:
            data = await trio.to_thread.run_sync(store.read_piece, digest, index * piece_size, length)
        except OSError:  # the fetch here just ended (its file became the blob) or the disk failed
            data = b""
        if len(data) != length:
            await stream.send_all(W.refusal(f"piece {index} cannot be read here"))
            return
        await stream.send_all(W.piece_header(index, length))
        await _send(stream, data, limit)
        counts["served_bytes"] = counts.get("served_bytes", 0) + length


async def _send(stream: trio.abc.Stream, data: bytes, limit: UploadLimit) -> None:
    view = memoryview(data)
    while view:
        chunk, view = view[:SEND_CHUNK], view[SEND_CHUNK:]
        wait = limit.delay(trio.current_time(), len(chunk))
        if wait:
            await trio.sleep(wait)
        await stream.send_all(chunk)


class PieceConnection:
    """One connection to a holder, fetching pieces of one artifact."""

    def __init__(self, conn: peer.FramedStream, ready: dict, max_body: int) -> None:
        self.conn = conn
        self.stream = conn.stream
        self.manifest = ready.get("manifest")
        have = ready.get("have")
        self.have: frozenset[int] | None = None if have == "all" else frozenset(
            i for i in (have if isinstance(have, list) else []) if isinstance(i, int))
        self._decoder = W.AnswerDecoder(max_body)
        self._pending = self._decoder.feed(conn.take_buffered())

    @classmethod
    async def open(cls, address: str, context: ssl.SSLContext, digest: str, max_body: int,
                   expect: Callable[[dict | None], bool] | None = None) -> "PieceConnection":
        conn = await peer.open_peer(address, context, expect=expect)
        try:
            await conn.send({"type": "pieces_hello", "digest": digest})
            ready = await conn.receive()
            if ready.get("type") != "pieces_ready":
                raise peer.PeerError(str(ready.get("error") or "the peer did not offer the pieces"))
            return cls(conn, ready, max_body)
        except BaseException:
            await conn.aclose()
            raise

    async def ask_list(self) -> None:
        await self.stream.send_all(W.want_list())

    async def ask_piece(self, index: int) -> None:
        await self.stream.send_all(W.want_piece(index))

    async def answer(self) -> W.PieceList | W.Piece | W.Refusal:
        with trio.fail_after(ANSWER_TIMEOUT):
            while not self._pending:
                data = await self.stream.receive_some(RECEIVE_CHUNK)
                if not data:
                    raise peer.PeerError("the peer closed the connection")
                self._pending = self._decoder.feed(data)
        return self._pending.pop(0)

    async def aclose(self) -> None:
        await self.conn.aclose()
