"""Refused joins into the audit (meshd.node.refusals): at once, then counted per source
window, bounded however many sources try, and recorded by the state machine with the
address and the reason."""

from __future__ import annotations

from meshd import commands as cmds
from meshd import sitestate
from meshd.node.effects import Commit
from meshd.node.refusals import MAX_SOURCES, OTHER_SOURCES, RECORD_WINDOW, Refusals, claimed
from meshd.state import SiteState


def records(effects):
    assert all(isinstance(e, Commit) for e in effects), effects
    return [e.command for e in effects]


def test_first_refusal_of_a_source_is_recorded_at_once():
    core = Refusals(actor="n2")
    [record] = records(core.refused("intruder (node ab)", "198.18.0.9:40001", "token proof does not match", 0.0))
    assert record == cmds.RecordRefusal(action="join-refused", target="intruder (node ab)", source="198.18.0.9:40001",
                                        reason="token proof does not match", count=1, actor="n2")


def test_a_retrying_source_is_counted_and_recorded_once_per_window():
    core = Refusals(actor="n2")
    core.refused("x", "198.18.0.9:40001", "first", 0.0)
    for i in range(99):  # new ports, same host: one source
        assert core.refused("x", f"198.18.0.9:{40002 + i}", f"again {i}", 1.0 + i * 0.1) == []
    assert core.next_flush() == RECORD_WINDOW
    assert core.flush_due(RECORD_WINDOW - 0.01) == []
    [record] = records(core.flush_due(RECORD_WINDOW))
    assert record.count == 99 and record.reason == "again 98" and record.source == "198.18.0.9:40100"
    # The window closed: the next attempt is news again.
    assert len(records(core.refused("x", "198.18.0.9:1", "later", RECORD_WINDOW + 1))) == 1


def test_a_window_with_one_refusal_leaves_nothing_to_flush():
    core = Refusals(actor="n2")
    core.refused("x", "198.18.0.9:1", "once", 0.0)
    assert core.next_flush() is None and core.flush_due(RECORD_WINDOW * 2) == []


def test_many_sources_share_one_entry_beyond_the_bound():
    core = Refusals(actor="n2")
    first = []
    for i in range(MAX_SOURCES + 50):
        first += records(core.refused("x", f"10.0.{i // 256}.{i % 256}:7", "junk", 0.0))
    # Every tracked source once, then one entry for all the others; nothing is unaccounted.
    assert len(first) == MAX_SOURCES + 1 and first[-1].source == OTHER_SOURCES
    [rest] = records(core.flush_due(RECORD_WINDOW))
    assert rest.source == OTHER_SOURCES and rest.count == 49
    assert len(core.windows) == 0


def test_what_a_joiner_claims_is_bounded_and_printable():
    assert claimed({"name": "cam-7", "node_id": "ab" * 16}) == f"cam-7 (node {'ab' * 16})"
    assert claimed({"name": "x\n\x1b[31m" + "y" * 500}) == "x??[31m" + "y" * 56
    assert claimed("junk") == "?" and claimed({}) == "?"
    [record] = records(Refusals(actor="n2").refused("t", "h:1", "r\x00" * 1000, 0.0))
    assert len(record.reason) <= cmds.MAX_AUDIT_REASON and "\x00" not in record.reason


def test_the_state_machine_audits_who_from_where_and_why():
    state = SiteState(site="lab")
    wire = cmds.encode(cmds.RecordRefusal(action="join-refused", target="cam-7 (node ab)", source="198.18.0.9:4",
                                          reason="node was revoked and may never be admitted again", count=3,
                                          actor="n2"), cmds.Envelope(ts=10.0))
    sitestate.apply(state, wire)
    [audit] = state.audit
    assert (audit.actor, audit.action, audit.target) == ("n2", "join-refused", "cam-7 (node ab)")
    assert audit.reason == "node was revoked and may never be admitted again from 198.18.0.9:4 (3 times)"
