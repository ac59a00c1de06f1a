"""crdt.sync: the message codec and the session protocol between two replicas."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crdt.document import MAX_UPDATE_BYTES, MeshDocument, SyncError
from crdt.schema import AuditRecord
from crdt.sync import (DELTA, DELTA_Z, EPOCH, HEADER_SIZE, STATE, UPDATE, UPDATE_Z, WANT, Message, SyncDecoder, SyncSession,
                       encode_message)


def audit(doc: MeshDocument, n: int, site: str) -> bytes:
    return doc.put(AuditRecord(audit_id=f"{site}/{n}", ts=float(n), actor="ops", action="deploy", target="web",
                               site=site))


def pump(a: SyncSession, b: SyncSession, messages_from_a: list[Message]) -> None:
    """Deliver messages back and forth through the byte codec until both sides are quiet."""
    queue = [(a, b, m) for m in messages_from_a]
    decoders = {id(a): SyncDecoder(), id(b): SyncDecoder()}
    while queue:
        sender, receiver, message = queue.pop(0)
        for decoded in decoders[id(receiver)].feed(message.encode()):
            replies, _ = receiver.receive(decoded, now=1.0)
            queue += [(receiver, sender, r) for r in replies]


def test_a_session_brings_both_sides_to_the_same_state_and_sends_only_what_is_missing():
    left, right = MeshDocument(), MeshDocument()
    for n in range(50):
        audit(left, n, "a")
    shared = left.full_update()
    right.apply(shared)  # both had these before the cut
    new_left = [audit(left, n, "a") for n in range(50, 60)]
    new_right = [audit(right, n, "b") for n in range(10)]
    a, b = SyncSession(left, "b"), SyncSession(right, "a")
    pump(a, b, a.open())
    pump(b, a, b.open())
    assert left.records(AuditRecord) == right.records(AuditRecord)
    assert len(left.records(AuditRecord)) == 70
    assert a.synced and b.synced and a.last_sync == 1.0
    minimal = sum(map(len, new_left)) + sum(map(len, new_right))
    assert a.payload_out + b.payload_out <= 1.5 * minimal
    assert a.payload_out < len(shared) / 2  # not the whole document again


def test_pushed_updates_are_applied_and_reported_for_forwarding():
    left, right = MeshDocument(), MeshDocument()
    a, b = SyncSession(left, "b"), SyncSession(right, "a")
    update = audit(left, 1, "a")
    [message] = a.push(update)
    replies, applied = b.receive(message, now=5.0)
    assert replies == [] and applied == update and b.last_sync == 5.0
    assert right.records(AuditRecord) == left.records(AuditRecord)


def test_a_malformed_update_in_a_session_is_refused_and_changes_nothing():
    doc = MeshDocument()
    audit(doc, 1, "a")
    before = doc.full_update()
    with pytest.raises(SyncError):
        SyncSession(doc, "x").receive(Message(UPDATE, b"\x80\x80\x80\x7f"), now=1.0)
    assert doc.full_update() == before


def test_messages_split_anywhere_decode_whole_and_in_order():
    stream = encode_message(STATE, b"sv") + encode_message(DELTA, b"x" * 1000) + encode_message(UPDATE, b"")
    for cut in range(len(stream) + 1):
        decoder = SyncDecoder()
        got = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert got == [Message(STATE, b"sv"), Message(DELTA, b"x" * 1000), Message(UPDATE, b"")]


@pytest.mark.parametrize("header, reason", [
    (bytes([42, 0, 0, 0, 1]), "unknown sync message type 42"),
    (bytes([EPOCH, 0, 0, 0, 25]), "over the limit"),  # an epoch is 24 bytes
    (bytes([UPDATE, 0xFF, 0xFF, 0xFF, 0xFF]), "over the limit"),
    (bytes([STATE, 0x01, 0, 0, 0]), "over the limit"),  # 16 MiB state vector
])
def test_a_bad_header_fails_the_stream_before_any_payload_is_buffered(header, reason):
    decoder = SyncDecoder()
    with pytest.raises(SyncError, match=reason):
        decoder.feed(header)
    with pytest.raises(SyncError):  # failed for good: the stream cannot be resynchronised
        decoder.feed(encode_message(STATE, b""))


def test_encoding_refuses_what_a_decoder_would_refuse():
    with pytest.raises(SyncError):
        encode_message(42, b"")
    with pytest.raises(SyncError):
        encode_message(WANT, b"x" * 25)
    with pytest.raises(SyncError):
        encode_message(STATE, b"x" * (2 * 1024 * 1024))


@given(st.binary(max_size=200))
def test_any_bytes_give_messages_or_a_sync_error(data):
    try:
        for message in SyncDecoder(max_message=1024).feed(data):
            assert len(message.payload) <= 1024 and message.size == HEADER_SIZE + len(message.payload)
    except SyncError:
        pass


def test_an_update_that_brings_nothing_new_is_not_passed_on():
    left, right = MeshDocument(), MeshDocument()
    update = audit(left, 1, "a")
    b = SyncSession(right, "a")
    assert b.receive(Message(UPDATE, update), now=1.0)[1] == update
    assert b.receive(Message(UPDATE, update), now=2.0)[1] is None  # a duplicate
    [delta] = SyncSession(left, "b").receive(Message(STATE, right.state_vector()), now=3.0)[0]
    assert b.receive(delta, now=3.0)[1] is None  # a resync with nothing missing


def test_a_session_awaits_the_answer_to_each_state_vector_it_sent():
    left, right = MeshDocument(), MeshDocument()
    audit(right, 1, "b")
    a, b = SyncSession(left, "b"), SyncSession(right, "a")
    assert not a.awaiting_delta
    first, second = a.open(), a.open()  # a resync before the first catch-up came back
    assert a.awaiting_delta and a.unanswered_states == 2
    [delta] = b.receive(first[0], now=1.0)[0]
    a.receive(delta, now=1.0)
    assert a.awaiting_delta  # the second is still out
    [delta] = b.receive(second[0], now=2.0)[0]
    a.receive(delta, now=2.0)
    assert not a.awaiting_delta and a.synced
    a.receive(b.push(audit(right, 2, "b"))[0], now=3.0)  # a pushed update answers no STATE
    assert not a.awaiting_delta


def test_large_deltas_and_updates_travel_compressed_and_arrive_whole():
    left, right = MeshDocument(), MeshDocument()
    for n in range(300):
        audit(left, n, "a")
    a, b = SyncSession(left, "b"), SyncSession(right, "a")
    [delta] = a.receive(b.open()[0], now=1.0)[0]
    assert delta.type == DELTA_Z and a.bytes_out < a.payload_out / 3, "records compress well"
    assert b.receive(delta, now=1.0)[1] is not None and b.payload_in == a.payload_out
    assert {r.audit_id for r in right.records(AuditRecord)} == {f"a/{n}" for n in range(300)}
    big = left.put(AuditRecord(audit_id="a/big", ts=1.0, actor="ops", action="deploy", target="web " * 200,
                               site="a"))  # one update over COMPRESS_MIN
    [pushed] = a.push(big)
    assert pushed.type == UPDATE_Z
    assert b.receive(pushed, now=2.0)[1] == big, "forwarded as the update itself, not as it travelled"
    [small] = a.push(audit(left, 1001, "a"))
    assert small.type == UPDATE, "a small update is not worth compressing"


@pytest.mark.parametrize("payload,reason", [
    (zlib.compress(b"\0" * (MAX_UPDATE_BYTES + 1)), "past the"),  # a decompression bomb
    (b"not zlib at all", "does not inflate"),
    (zlib.compress(b"\0" * 1000)[:-4], "cut short"),
    (zlib.compress(b"\0" * 1000) + b"junk", "followed by"),
])
def test_compressed_payloads_that_are_not_safe_are_refused_and_change_nothing(payload, reason):
    doc = MeshDocument()
    before = doc.full_update()
    with pytest.raises(SyncError, match=reason):
        SyncSession(doc, "x").receive(Message(UPDATE_Z, payload), now=1.0)
    assert doc.full_update() == before
