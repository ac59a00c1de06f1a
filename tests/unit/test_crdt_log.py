"""crdt.log: the durable store's byte format; a torn or corrupt tail ends the valid log."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crdt.epoch import ZERO_EPOCH, Epoch
from crdt.log import RECORD_HEADER, LogError, decode_log, decode_snapshot, encode_record, encode_snapshot


@given(st.lists(st.binary(max_size=100), max_size=10))
def test_records_read_back_in_order(payloads):
    data = b"".join(encode_record(p) for p in payloads)
    assert decode_log(data) == (payloads, len(data))


@given(st.lists(st.binary(min_size=1, max_size=50), min_size=1, max_size=6), st.data())
def test_a_crash_mid_append_leaves_every_whole_record_before_it(payloads, data):
    whole = b"".join(encode_record(p) for p in payloads[:-1])
    last = encode_record(payloads[-1])
    cut = data.draw(st.integers(0, len(last) - 1))
    assert decode_log(whole + last[:cut]) == (payloads[:-1], len(whole))


def test_a_flipped_bit_ends_the_valid_prefix_at_that_record():
    records = [encode_record(b"one"), encode_record(b"two"), encode_record(b"three")]
    data = bytearray(b"".join(records))
    data[len(records[0]) + RECORD_HEADER] ^= 0x01  # in "two"'s payload
    assert decode_log(bytes(data)) == ([b"one"], len(records[0]))


def test_snapshots_round_trip_and_refuse_anything_torn_or_foreign():
    epoch = Epoch(7, bytes(range(16)))
    blob = encode_snapshot(b"document", epoch)
    assert decode_snapshot(blob) == (epoch, b"document")
    assert decode_snapshot(encode_snapshot(b"document")) == (ZERO_EPOCH, b"document")
    for bad, reason in [(blob[:-1], "checksum"), (b"junk", "not a meshd"), (b"X" + blob[1:], "not a meshd"),
                        (blob[:12] + bytes([blob[12] ^ 1]) + blob[13:], "checksum")]:  # a bit of the epoch
        with pytest.raises(LogError, match=reason):
            decode_snapshot(bad)


def test_a_snapshot_written_before_epochs_is_of_epoch_zero():
    payload = b"document"
    old = b"MESHDOC1" + struct.pack(">I", zlib.crc32(payload)) + payload
    assert decode_snapshot(old) == (ZERO_EPOCH, payload)
