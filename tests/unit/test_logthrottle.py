"""meshd.io.logthrottle: a flood of one message costs a line every EVERY seconds, with a count."""

from __future__ import annotations

import logging

from meshd.io import logthrottle
from meshd.io.logthrottle import RepeatThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def record(msg: str, level: int = logging.INFO, name: str = "meshd.peer") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_a_repeated_message_passes_once_per_period_with_the_count_held_back():
    clock = Clock()
    gate = RepeatThrottle(every=10.0, clock=clock)
    passed = [gate.filter(record("peer TLS handshake failed")) for _ in range(1000)]
    assert passed.count(True) == 1 and passed[0]
    clock.now += 10.0
    later = record("peer TLS handshake failed")
    assert gate.filter(later) and later.suppressed == 999
    fresh = record("peer TLS handshake failed")
    clock.now += 10.0
    assert gate.filter(fresh) and not hasattr(fresh, "suppressed")  # nothing was held back since


def test_other_messages_and_errors_are_not_held_back():
    gate = RepeatThrottle(every=10.0, clock=Clock())
    assert gate.filter(record("a")) and gate.filter(record("b")) and gate.filter(record("a", name="meshd.other"))
    assert not gate.filter(record("a"))
    assert all(gate.filter(record("a", level=logging.ERROR)) for _ in range(5))


def test_memory_is_bounded_by_the_number_of_messages(monkeypatch):
    monkeypatch.setattr(logthrottle, "MAX_MESSAGES", 8)
    gate = RepeatThrottle(every=10.0, clock=Clock())
    for i in range(100):
        gate.filter(record(f"message {i}"))
    assert len(gate._messages) == 8


def test_the_peer_and_admin_loggers_are_throttled_once():
    from meshd.io import admin, peer
    for logger in (peer.log, admin.log):
        assert sum(isinstance(f, RepeatThrottle) for f in logger.filters) == 1
    assert logthrottle.throttle(peer.log) is peer.log and len(peer.log.filters) == 1
