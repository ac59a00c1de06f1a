"""Tests of meshd.wire: the length-prefixed JSON frame codec."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.wire import (
    ADMIN_MAX_FRAME,
    MAX_NESTING_DEPTH,
    PEER_MAX_FRAME,
    FrameDecoder,
    FrameError,
    decode_body,
    encode_frame,
    nesting_depth,
)


def frame_of(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def nested(depth: int) -> bytes:
    return b"[" * (depth - 1) + b"{}" + b"]" * (depth - 1)


def test_limits_are_ordered():
    assert 0 < ADMIN_MAX_FRAME < PEER_MAX_FRAME


def test_encode_layout():
    frame = encode_frame({"cmd": "status"})
    assert frame[:4] == struct.pack(">I", len(frame) - 4)
    assert json.loads(frame[4:]) == {"cmd": "status"}


@pytest.mark.parametrize(
    "obj",
    [
        {},
        {"cmd": "status", "args": {}},
        {"text": "grüße ✓ 🛰"},
        {"lone": "\ud800"},  # a surrogate a peer sent as an escape must be re-encodable
        {"n": [1, -2, 3.5, 1e300, None, True, False]},
        {"deep": json.loads(nested(MAX_NESTING_DEPTH - 1))},
    ],
)
def test_round_trip_examples(obj):
    assert FrameDecoder(ADMIN_MAX_FRAME).feed(encode_frame(obj)) == [obj]


@pytest.mark.parametrize(
    "obj, reason",
    [
        ([1, 2], "not list"),
        ("text", "not str"),
        ({"x": float("nan")}, "cannot encode"),
        ({"x": float("inf")}, "cannot encode"),
        ({"x": {1, 2}}, "cannot encode"),
        ({"x": object()}, "cannot encode"),
        ({"x": "y" * 200}, "exceeds limit 100"),
        ({"x": json.loads(nested(MAX_NESTING_DEPTH))}, "levels deep"),
    ],
)
def test_encode_refusals(obj, reason):
    with pytest.raises(FrameError) as excinfo:
        encode_frame(obj, max_frame=100)
    assert reason in excinfo.value.reason


def test_encode_at_exact_limit():
    frame = encode_frame({"x": ""})
    body_len = len(frame) - 4
    assert encode_frame({"x": ""}, max_frame=body_len) == frame
    with pytest.raises(FrameError, match="exceeds limit"):
        encode_frame({"x": ""}, max_frame=body_len - 1)


JUNK = [
    pytest.param(frame_of(b"hello"), "not valid JSON", id="not-json"),
    pytest.param(frame_of(b""), "not valid JSON", id="empty-body"),
    pytest.param(frame_of(b"{\"a\": 1"), "not valid JSON", id="truncated-json"),
    pytest.param(frame_of(b"{} {}"), "not valid JSON", id="two-values"),
    pytest.param(frame_of(b"\xff\xfe{}"), "not valid UTF-8", id="bad-utf8"),
    pytest.param(frame_of(b'{"a": "\xc3"}'), "not valid UTF-8", id="cut-utf8"),
    pytest.param(frame_of(b"[1, 2]"), "JSON array, not an object", id="array"),
    pytest.param(frame_of(b'"str"'), "JSON string, not an object", id="string"),
    pytest.param(frame_of(b"42"), "JSON number, not an object", id="number"),
    pytest.param(frame_of(b"true"), "JSON boolean, not an object", id="boolean"),
    pytest.param(frame_of(b"null"), "JSON null, not an object", id="null"),
    pytest.param(frame_of(b'{"x": NaN}'), "NaN is not valid JSON", id="nan"),
    pytest.param(frame_of(b'{"x": -Infinity}'), "-Infinity is not valid JSON", id="inf"),
    pytest.param(frame_of(b'{"x": ' + b"9" * 5000 + b"}"), "not valid JSON", id="huge-int"),
    pytest.param(frame_of(nested(MAX_NESTING_DEPTH + 1)), "levels deep", id="too-deep"),
    pytest.param(frame_of(b"[" * 100_000), "levels deep", id="very-deep-unclosed"),
    pytest.param(struct.pack(">I", ADMIN_MAX_FRAME + 1), "exceeds limit", id="oversized"),
    pytest.param(b"\xff\xff\xff\xff", "exceeds limit", id="max-length-field"),
]


@pytest.mark.parametrize("data, reason", JUNK)
def test_junk_is_refused_with_reason(data, reason):
    decoder = FrameDecoder(ADMIN_MAX_FRAME)
    with pytest.raises(FrameError) as excinfo:
        decoder.feed(data)
    assert reason in excinfo.value.reason
    assert decoder.failed is excinfo.value


@pytest.mark.parametrize("data, reason", JUNK)
def test_decoder_stays_failed(data, reason):
    decoder = FrameDecoder(ADMIN_MAX_FRAME)
    with pytest.raises(FrameError):
        decoder.feed(data)
    with pytest.raises(FrameError, match="already failed"):
        decoder.feed(encode_frame({"ok": True}))


def test_oversized_refused_from_header_alone():
    decoder = FrameDecoder(1000)
    assert decoder.feed(struct.pack(">I", 1000)) == []  # at the limit: wait for the body
    assert decoder.buffered == 4

    decoder = FrameDecoder(1000)
    with pytest.raises(FrameError, match="frame of 1001 bytes exceeds limit 1000"):
        decoder.feed(struct.pack(">I", 1001))
    assert decoder.buffered == 0


def test_nesting_at_limit_accepted():
    body = nested(MAX_NESTING_DEPTH)
    assert decode_body(b'{"x": ' + body[1:-1] + b"}") == {"x": json.loads(body[1:-1])}


@pytest.mark.parametrize(
    "text, depth",
    [
        ("1", 0),
        ("{}", 1),
        ('{"a": [1, {"b": []}]}', 4),
        ('{"a": "[[[[{{{{"}', 1),
        ('{"a\\"[[": "\\\\", "b": ["]"]}', 2),
        ("[[[", 3),
    ],
)
def test_nesting_depth(text, depth):
    assert nesting_depth(text) == depth


def test_frames_split_across_feeds():
    frames = encode_frame({"a": 1}) + encode_frame({"b": 2}) + encode_frame({"c": 3})
    decoder = FrameDecoder(100)
    got = []
    for byte in frames:
        got += decoder.feed(bytes([byte]))
    assert got == [{"a": 1}, {"b": 2}, {"c": 3}]
    assert decoder.buffered == 0


def test_partial_frame_is_buffered():
    frame = encode_frame({"a": 1})
    decoder = FrameDecoder(100)
    assert decoder.feed(frame[:-1]) == []
    assert decoder.buffered == len(frame) - 1
    assert decoder.feed(frame[-1:]) == [{"a": 1}]


# --- properties ---------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=5)


@settings(max_examples=200, deadline=None)
@given(
    objs=st.lists(json_objects, min_size=1, max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=10),
)
def test_round_trip_with_arbitrary_chunking(objs, cuts):
    stream = b"".join(encode_frame(obj) for obj in objs)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)])]
    decoder = FrameDecoder(PEER_MAX_FRAME)
    got = []
    for chunk in chunks:
        got += decoder.feed(chunk)
    assert got == objs
    assert decoder.buffered == 0


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=64), max_size=8), max_frame=st.integers(0, 64))
def test_arbitrary_bytes_raise_only_frame_error(chunks, max_frame):
    decoder = FrameDecoder(max_frame)
    for chunk in chunks:
        try:
            frames = decoder.feed(chunk)
        except FrameError:
            assert decoder.failed is not None
            continue
        assert all(isinstance(frame, dict) for frame in frames)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=64) | st.text(alphabet='{}[]":,\\ 0aNn', max_size=64).map(str.encode))
def test_arbitrary_frame_bodies_raise_only_frame_error(body):
    decoder = FrameDecoder(ADMIN_MAX_FRAME)
    try:
        frames = decoder.feed(frame_of(body))
    except FrameError:
        return
    assert len(frames) == 1 and isinstance(frames[0], dict)
