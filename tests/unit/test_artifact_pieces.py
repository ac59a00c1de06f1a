"""meshd.artifacts.pieces: any order and loss of pieces ends with the exact bytes or a refusal."""

import hashlib
import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings, strategies as st

from meshd.artifacts import pieces as P
from meshd.artifacts.manifest import open_manifest, piece_count, pieces_digest, public_hex, sign_manifest

KEY = Ed25519PrivateKey.generate()
PIECE = 1 << 20


def manifest_of(data: bytes):
    piece_list = P.piece_list_of(data, PIECE)
    doc = sign_manifest(KEY, mesh="m", digest="sha256:" + hashlib.sha256(data).hexdigest(), size=len(data),
                        name="a.bin", pieces=pieces_digest(piece_list), pushed_by="t", pushed_at=1.0)
    return open_manifest(doc, mesh="m", trusted={public_hex(KEY): "root"}), piece_list


DATA = os.urandom(3 * PIECE + 123)
MANIFEST, PIECE_LIST = manifest_of(DATA)


def fetch(have=()):
    return P.PieceFetch(MANIFEST, P.piece_digests(PIECE_LIST, MANIFEST), have)


def chunk(i):
    return DATA[i * PIECE:(i + 1) * PIECE]


def test_the_piece_list_must_be_the_manifests():
    assert len(P.piece_digests(PIECE_LIST, MANIFEST)) == 4
    with pytest.raises(P.PieceError, match="lying or damaged"):
        P.piece_digests(bytes(len(PIECE_LIST)), MANIFEST)
    with pytest.raises(P.PieceError, match="4 pieces"):
        P.piece_digests(PIECE_LIST[:-1], MANIFEST)


def test_pieces_are_spread_over_peers_then_the_end_game_doubles_up():
    f = fetch()
    f.add_peer("a")
    f.add_peer("b")
    assert [f.next_piece("a", 0), f.next_piece("b", 0), f.next_piece("a", 0), f.next_piece("b", 0)] == [0, 1, 2, 3]
    assert f.next_piece("a", 0) is None  # two in flight each
    assert f.received("a", 0, chunk(0)) == P.Accepted(0, 0)
    assert f.next_piece("a", 0) == 1  # end game: b's piece 1 asked of a too
    assert f.received("a", 1, chunk(1)) == P.Accepted(1, PIECE)
    assert f.received("b", 1, chunk(1)) == P.Duplicate(1)
    assert f.progress == pytest.approx(2 * PIECE / len(DATA))


def test_a_lying_peer_is_banned_and_its_piece_comes_from_another():
    f = fetch()
    f.add_peer("liar")
    f.add_peer("honest")
    assert f.next_piece("liar", 0) == 0
    outcome = f.received("liar", 0, b"x" * PIECE)
    assert isinstance(outcome, P.Rejected) and "wrong digest" in outcome.reason
    assert f.next_piece("liar", 0) is None
    assert f.next_piece("honest", 0) == 0
    f.add_peer("liar")  # told again that it holds it: still banned
    assert f.next_piece("liar", 0) is None


def test_a_truncated_piece_is_refused():
    f = fetch()
    f.add_peer("a")
    f.next_piece("a", 0)
    outcome = f.received("a", 0, chunk(0)[:-1])
    assert isinstance(outcome, P.Rejected) and "bytes for piece 0" in outcome.reason


def test_a_broken_transfer_is_retried_later_then_given_up():
    f = fetch()
    f.add_peer("a")
    for n in range(P.MAX_FAILURES):
        assert f.next_piece("a", n * 10.0) == 0
        f.failed("a", 0, "cut", n * 10.0)
        assert f.next_piece("a", n * 10.0 + 0.1) is None
    assert "kept breaking" in f.stuck(1000.0)


def test_a_partial_holder_is_asked_only_for_what_it_has_and_resume_skips_pieces():
    f = fetch(have={0, 1})
    f.add_peer("p", have={3})
    assert f.next_piece("p", 0) == 3
    assert f.next_piece("p", 0) is None
    f.received("p", 3, chunk(3))
    assert f.stuck(0) == "no peer can send the missing pieces: they hold other pieces"
    assert fetch().stuck(0) == "no member of the site holds it"


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_order_and_loss_ends_with_the_exact_bytes_or_a_refusal(data):
    size = data.draw(st.integers(0, 5 * 64))
    piece = 64
    content = bytes((i * 7 + size) % 251 for i in range(size))
    piece_list = P.piece_list_of(content, piece)

    class Small:  # a manifest with a small piece size, so that many pieces are drawn
        pass
    m = Small()
    m.size, m.piece_size, m.piece_count, m.pieces = size, piece, piece_count(size, piece), \
        pieces_digest(piece_list)
    f = P.PieceFetch(m, P.piece_digests(piece_list, m), start=data.draw(st.integers(0, 100)))
    peers = data.draw(st.lists(st.sampled_from(["honest", "liar", "flaky", "partial"]), min_size=1, max_size=4,
                               unique=True))
    partial_has = data.draw(st.sets(st.integers(0, max(0, m.piece_count - 1))))
    for p in peers:
        f.add_peer(p, have=partial_has if p == "partial" else None)
    out = bytearray(size)
    in_flight: list[tuple[str, int]] = []
    now = 0.0
    for _ in range(2000):
        if f.done or f.stuck(now):
            break
        for p in peers:
            i = f.next_piece(p, now)
            if i is not None:
                in_flight.append((p, i))
        if not in_flight:
            now += P.RETRY_DELAY
            continue
        p, i = in_flight.pop(data.draw(st.integers(0, len(in_flight) - 1)))
        fate = data.draw(st.sampled_from(["deliver", "deliver", "lose"]))
        if fate == "lose" or (p == "flaky" and data.draw(st.booleans())):
            f.failed(p, i, "cut", now)
            continue
        body = content[i * piece:(i + 1) * piece]
        if p == "liar" and body:
            body = bytes([body[0] ^ 1]) + body[1:]
        outcome = f.received(p, i, body)
        if isinstance(outcome, P.Accepted):
            out[outcome.offset:outcome.offset + len(body)] = body
        now += 0.01
    if f.done:
        assert bytes(out) == content
    else:
        assert f.stuck(now) is not None
        assert "honest" not in peers or f.peers["honest"].failures >= P.MAX_FAILURES


def test_fetches_that_start_apart_ask_for_different_pieces():
    a, b = P.PieceFetch(MANIFEST, P.piece_digests(PIECE_LIST, MANIFEST), start=0), \
        P.PieceFetch(MANIFEST, P.piece_digests(PIECE_LIST, MANIFEST), start=2)
    a.add_peer("origin")
    b.add_peer("origin")
    assert [a.next_piece("origin", 0), a.next_piece("origin", 0)] == [0, 1]
    assert [b.next_piece("origin", 0), b.next_piece("origin", 0)] == [2, 3]
