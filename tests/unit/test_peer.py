"""meshd.io.peer.PeerAdmission: which new peer connections are served, before any TLS."""

from __future__ import annotations

from meshd.io.peer import PeerAdmission


def test_bounded_per_host_and_in_total_and_released():
    admission = PeerAdmission(total=4, per_host=2)
    assert [admission.admit("10.0.0.9") for _ in range(3)] == [True, True, False]
    assert admission.admit("10.0.0.8") and admission.admit("10.0.0.7")
    assert not admission.admit("10.0.0.6")  # the total
    assert admission.refused == 2
    admission.release("10.0.0.9")
    assert admission.admit("10.0.0.9")
    for _ in range(5):
        admission.release("10.0.0.9")  # more releases than admissions change nothing below zero
    assert "10.0.0.9" not in admission.open


def test_the_machines_own_loopback_counts_only_against_the_total():
    admission = PeerAdmission(total=4, per_host=1)
    assert all(admission.admit("127.0.0.1") for _ in range(4))
    assert not admission.admit("127.0.0.1")
    other = PeerAdmission(total=4, per_host=1)
    assert other.admit("127.0.0.2") and not other.admit("127.0.0.2")  # another loopback address: a host
