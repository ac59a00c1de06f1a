"""mDNS discovery helpers: TXT parsing and record matching (tables), and the legacy unicast
probe against a real zeroconf responder on loopback (real packets)."""

from __future__ import annotations

import socket

import pytest
from zeroconf import DNSAddress, DNSService, DNSText
from zeroconf.const import _CLASS_IN, _TYPE_A, _TYPE_SRV, _TYPE_TXT

from meshd.io.mdns import SERVICE_TYPE, Candidate, Discovery, _txt_properties, candidates_from_records


def txt(*entries: bytes) -> bytes:
    return b"".join(bytes([len(e)]) + e for e in entries)


@pytest.mark.parametrize("raw,expected", [
    (txt(b"id=n1", b"site=a"), {"id": "n1", "site": "a"}),
    (txt(b"flag", b"site=a"), {"site": "a"}),  # a key without "=" carries no value we use
    (txt(b"k=a=b"), {"k": "a=b"}),
    (txt(b"bad=\xff", b"site=a"), {"site": "a"}),  # not UTF-8: skipped
    (txt(b"id=n1") + b"\x09site=a", {"id": "n1"}),  # a length that runs past the end stops parsing
    (b"", {}),
])
def test_txt_properties(raw, expected):
    assert _txt_properties(raw) == expected


NAME = f"abc.{SERVICE_TYPE}"


def records(host="meshd-abc.local.", ip="198.18.0.7", port=7700, props=(b"id=n1", b"site=a", b"fp=ff")):
    return [
        DNSService(NAME, _TYPE_SRV, _CLASS_IN, 120, 0, 0, port, host),
        DNSText(NAME, _TYPE_TXT, _CLASS_IN, 4500, txt(*props)),
        DNSAddress(host, _TYPE_A, _CLASS_IN, 120, socket.inet_aton(ip)),
    ]


def test_candidate_from_a_complete_answer():
    assert candidates_from_records(records()) == [Candidate("n1", "a", "198.18.0.7:7700", "ff")]


@pytest.mark.parametrize("recs", [
    records()[:2],  # no address record
    records()[::2],  # no TXT
    records(props=(b"site=a",)),  # no node id
    records(props=(b"id=n1",)),  # no site
    [records()[0], records()[1], DNSAddress("other.local.", _TYPE_A, _CLASS_IN, 120, socket.inet_aton("1.2.3.4"))],
])
def test_incomplete_answers_give_no_candidate(recs):
    assert candidates_from_records(recs) == []


def test_probe_finds_a_real_responder_on_loopback():
    responder = Discovery(advertise_ip="127.0.0.1", node_id="aa" * 16, site="probe-site", peer_port=4242,
                          fingerprint="f" * 32, version="test")
    seeker = Discovery(advertise_ip="127.0.0.1", node_id="bb" * 16, site="probe-site", peer_port=4343,
                       fingerprint="e" * 32, version="test")
    try:
        responder.announce()
        found = []
        for _ in range(10):  # the responder may still be announcing itself
            found = [c for c in seeker.probe(window=0.3) if c.node_id == "aa" * 16]
            if found:
                break
        assert found == [Candidate("aa" * 16, "probe-site", "127.0.0.1:4242", "f" * 32)]
        assert Candidate("aa" * 16, "probe-site", "127.0.0.1:4242", "f" * 32) in seeker.candidates("probe-site")
        assert all(c.node_id != "bb" * 16 for c in seeker.probe(window=0.2)), "a node never finds itself"
    finally:
        responder.close()
        seeker.close()
