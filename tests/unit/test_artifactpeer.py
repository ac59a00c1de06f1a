"""meshd.io.artifactpeer: a server sends only verified bytes of what it holds; junk ends the
conversation with a reason (over in-memory streams; the TLS under it is the peer port's)."""

import os

import pytest
import trio
import trio.testing

from meshd.artifacts import piecewire as W
from meshd.artifacts.ratelimit import UploadLimit
from meshd.io import peer
from meshd.io.artifactpeer import serve_pieces
from meshd.io.artifactstore import ArtifactStore
from tests.unit.test_artifactstore import push


def serve(store, hello, send: bytes, in_progress=lambda digest: None):
    """Run the server against a client that sends `send` and then closes; what it answered."""
    async def main():
        client, server = trio.testing.memory_stream_pair()
        counts: dict = {}
        failure = None
        async with trio.open_nursery() as nursery:
            async def run_server():
                nonlocal failure
                try:
                    await serve_pieces(peer.FramedStream(server), server, hello, store, UploadLimit(0), counts,
                                       in_progress)
                except peer.PeerError as e:
                    failure = str(e)
                await server.aclose()
            nursery.start_soon(run_server)
            framed = peer.FramedStream(client)
            ready = await framed.receive()
            await client.send_all(send)
            await client.send_eof()
            received = framed.take_buffered()
            while data := await client.receive_some(1 << 20):
                received += data
        return ready, received, failure, counts
    return trio.run(main)


@pytest.fixture
def held(tmp_path):
    store = ArtifactStore(tmp_path / "data")
    data = os.urandom((1 << 20) + 10)
    return store, push(store, tmp_path, data), data


def test_pieces_and_the_piece_list_are_served(held):
    store, got, data = held
    ready, received, failure, counts = serve(store, {"digest": got.digest}, W.want_list() + W.want_piece(1))
    assert ready["type"] == "pieces_ready" and ready["have"] == "all" and failure is None
    answers = W.AnswerDecoder(1 << 20).feed(received)
    assert answers == [W.PieceList(got.piece_list), W.Piece(1, data[1 << 20:])]
    assert counts["served_bytes"] == 10


def test_junk_and_pieces_out_of_range_end_the_conversation(held):
    store, got, _ = held
    _, received, failure, _ = serve(store, {"digest": got.digest}, b"Xjunk")
    assert failure and "bad piece request" in failure
    _, received, failure, _ = serve(store, {"digest": got.digest}, W.want_piece(7))
    assert W.AnswerDecoder(1 << 20).feed(received) == [W.Refusal("there is no piece 7")]


def test_what_is_not_held_is_not_offered(tmp_path):
    store = ArtifactStore(tmp_path / "data")
    for hello, reason in (({"digest": "sha256:" + "0" * 64}, "does not hold"), ({"digest": "../x"}, "not a digest")):
        async def main():
            client, server = trio.testing.memory_stream_pair()
            with pytest.raises(peer.PeerError, match=reason):
                await serve_pieces(peer.FramedStream(server), server, hello, store, UploadLimit(0), {})
        trio.run(main)


def test_a_fetch_in_progress_serves_only_the_pieces_it_verified(tmp_path):
    from meshd.artifacts import pieces as P
    from tests.unit.test_artifactstore import manifest_for
    data = os.urandom(3 << 20)
    piece_list = P.piece_list_of(data, 1 << 20)
    manifest = manifest_for(data, piece_list)
    store = ArtifactStore(tmp_path / "data")
    store.begin_fetch(manifest, piece_list, P.piece_digests(piece_list, manifest))
    store.write_piece(manifest.digest, 1 << 20, data[1 << 20:2 << 20])
    have = frozenset({1})
    ready, received, _, _ = serve(store, {"digest": manifest.digest}, W.want_list() + W.want_piece(1) + W.want_piece(2),
                                  lambda digest: (dict(manifest.document), have))
    answers = W.AnswerDecoder(1 << 20).feed(received)
    assert ready["have"] == [1] and ready["manifest"]["body"]["digest"] == manifest.digest
    assert answers == [W.PieceList(piece_list), W.Piece(1, data[1 << 20:2 << 20]),
                       W.Refusal("piece 2 is not verified here yet")]
