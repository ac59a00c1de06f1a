"""meshd.artifacts.piecewire: any bytes give well-formed messages or one PieceWireError."""

import pytest
from hypothesis import given, strategies as st

from meshd.artifacts import piecewire as W


def test_answers_round_trip_in_any_cut():
    stream = W.piece_list(b"abc") + W.piece_header(7, 4) + b"wxyz" + W.refusal("not held")
    for cut in range(len(stream) + 1):
        decoder = W.AnswerDecoder(max_body=16)
        got = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert got == [W.PieceList(b"abc"), W.Piece(7, b"wxyz"), W.Refusal("not held")]


def test_requests_round_trip():
    decoder = W.RequestDecoder()
    stream = W.want_list() + W.want_piece(3) + W.want_piece(2**32 - 1)
    assert decoder.feed(stream[:3]) + decoder.feed(stream[3:]) == [W.WantList(), W.WantPiece(3),
                                                                   W.WantPiece(2**32 - 1)]


def test_an_oversized_answer_is_refused_at_its_header_and_the_decoder_stays_failed():
    decoder = W.AnswerDecoder(max_body=10)
    with pytest.raises(W.PieceWireError, match="more than the 10"):
        decoder.feed(W.piece_header(0, 11))
    with pytest.raises(W.PieceWireError, match="already failed"):
        decoder.feed(W.want_list())


@given(st.binary(max_size=64))
def test_junk_gives_messages_or_an_error(junk):
    for decoder in (W.AnswerDecoder(max_body=8), W.RequestDecoder()):
        try:
            for message in decoder.feed(junk):
                assert isinstance(message, (W.PieceList, W.Piece, W.Refusal, W.WantList, W.WantPiece))
        except W.PieceWireError:
            pass
