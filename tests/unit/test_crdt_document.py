"""crdt.document: validated writes, tolerant reads, deterministic app winners and conflicts, and
convergence of replicas under any order, duplication and loss of updates."""

from __future__ import annotations

import gc
import itertools
import json
import weakref

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Map

from crdt.document import MAX_UPDATE_BYTES, MeshDocument, SyncError, resolve
from crdt.schema import AppEdit, AuditRecord, SchemaError, SiteSummary
from crdt.updatecheck import check_update

SPEC = '[app]\nname = "web"\n'


def edit(doc: MeshDocument, edit_id: str, site: str, ts: float, app: str = "web", replicas: int = 1,
         stopped: bool = False) -> bytes:
    return doc.put(doc.new_app_edit(edit_id=edit_id, app=app, site=site, actor="ops", ts=ts, spec=SPEC,
                                    targets=(site,), replicas=replicas, stopped=stopped))


def sync(a: MeshDocument, b: MeshDocument) -> None:
    a.apply(b.delta_since(a.state_vector()))
    b.apply(a.delta_since(b.state_vector()))


def test_a_refused_write_changes_nothing():
    doc = MeshDocument()
    good = AuditRecord(audit_id="a/1", ts=1.0, actor="ops", action="deploy", target="web", site="a")
    bad = AuditRecord(audit_id="a/2", ts=1.0, actor="ops", action="deploy", target="web", site="A B")
    before = doc.state_vector()
    with pytest.raises(SchemaError):
        doc.put_many([good, bad])
    assert doc.state_vector() == before
    assert doc.records(AuditRecord) == []


def test_a_write_returns_the_minimal_delta_that_brings_another_replica_up_to_date():
    a, b = MeshDocument(), MeshDocument()
    update = edit(a, "a/1", "a", 1.0)
    b.apply(update)
    assert b.app("web").winner == a.app("web").winner
    assert len(update) < 200


def test_sequential_edits_chain_and_the_last_wins_without_conflict():
    a, b = MeshDocument(), MeshDocument()
    edit(a, "a/1", "a", 1.0)
    sync(a, b)
    edit(b, "b/1", "a", 2.0, replicas=5)
    sync(a, b)
    edit(a, "a/2", "a", 3.0, replicas=7)
    sync(a, b)
    for doc in (a, b):
        app = doc.app("web")
        assert (app.winner.edit_id, app.winner.version, app.winner.replicas) == ("a/2", 3, 7)
        assert app.losers == ()


def test_two_cut_off_sites_editing_one_app_agree_on_the_winner_and_both_name_the_loser():
    a, b = MeshDocument(), MeshDocument()
    edit(a, "a/1", "a", 1.0)
    sync(a, b)
    edit(a, "a/2", "a", 10.0, replicas=2)  # cut off: both edit version 2
    edit(b, "b/1", "b", 11.0, replicas=9)
    sync(a, b)
    for doc in (a, b):
        app = doc.app("web")
        assert app.winner.edit_id == "b/1"  # same version: the later timestamp wins
        assert [e.edit_id for e in app.losers] == ["a/2"]


def test_more_edits_on_one_side_outrank_a_later_single_edit_on_the_other():
    a, b = MeshDocument(), MeshDocument()
    edit(a, "a/1", "a", 1.0)
    sync(a, b)
    edit(a, "a/2", "a", 2.0)
    edit(a, "a/3", "a", 3.0)  # version 3
    edit(b, "b/1", "b", 99.0)  # version 2, later clock
    sync(a, b)
    for doc in (a, b):
        assert doc.app("web").winner.edit_id == "a/3"
        assert [e.edit_id for e in doc.app("web").losers] == ["b/1"]


def test_resolve_survives_a_forged_cycle_of_bases():
    x = AppEdit(edit_id="x", app="web", version=2, base="y", site="a", actor="o", ts=1.0, spec="", targets=("a",),
                replicas=1)
    y = AppEdit(edit_id="y", app="web", version=1, base="x", site="a", actor="o", ts=1.0, spec="", targets=("a",),
                replicas=1)
    assert resolve([x, y]).winner == x and resolve([x, y]).losers == ()


def test_junk_from_a_foreign_writer_is_listed_as_invalid_and_never_read_as_a_record():
    good = MeshDocument()
    edit(good, "a/1", "a", 1.0)
    rogue = MeshDocument()
    rogue.apply(good.full_update())
    raw = rogue.doc.get("app_edits", type=Map)
    raw["junk"] = json.dumps({"edit_id": "junk", "app": "web", "version": 2**40})  # missing fields
    raw["a/9"] = json.dumps(good.app("web").winner.to_plain())  # a record under a key not its own
    raw["nested"] = Map({"edit_id": "nested"})
    raw["number"] = 5
    raw["text"] = "{not json"
    raw["fields"] = good.app("web").winner.to_plain()  # fields, not the record's text
    good.apply(rogue.delta_since(good.state_vector()))
    assert [e.edit_id for e in good.app_edits()] == ["a/1"]
    reasons = {key: reason for root, key, reason in good.invalid()}
    assert set(reasons) == {"junk", "a/9", "nested", "number", "text", "fields"}
    assert "not under its own key" in reasons["a/9"]
    assert "missing" in reasons["junk"]
    assert "not JSON" in reasons["text"] and "JSON text" in reasons["fields"]


@pytest.mark.parametrize("update", [b"", b"\x01\x02garbage", bytes(range(256))])
def test_a_malformed_update_is_refused_and_changes_nothing(update):
    doc = MeshDocument()
    edit(doc, "a/1", "a", 1.0)
    before = doc.full_update()
    with pytest.raises(SyncError):
        doc.apply(update)
    assert doc.full_update() == before


def test_an_oversized_update_is_refused_before_parsing():
    with pytest.raises(SyncError, match="over the"):
        MeshDocument().apply(b"\x00" * (MAX_UPDATE_BYTES + 1))


@given(st.binary(max_size=300))
def test_any_bytes_as_update_or_state_vector_give_a_sync_error_or_nothing(data):
    doc = MeshDocument()
    edit(doc, "a/1", "a", 1.0)
    for op in (doc.apply, doc.delta_since):
        try:
            op(data)
        except SyncError:
            pass
    assert doc.app("web").winner.edit_id == "a/1"


# --- convergence ------------------------------------------------------------------------

SITES = ("a", "b", "c")
operations = st.lists(st.tuples(st.sampled_from(range(3)), st.sampled_from(["edit", "stop", "audit", "site"]),
                                st.sampled_from(["web", "db"]), st.integers(0, 5)), min_size=1, max_size=25)


@settings(max_examples=60, deadline=None)
@given(operations, st.randoms(use_true_random=False), st.floats(0, 0.5), st.floats(0, 0.5))
def test_replicas_converge_under_any_order_duplication_and_loss(ops, rnd, loss, duplication):
    docs = [MeshDocument(client_id=i + 1) for i in range(3)]
    in_flight: list[tuple[int, bytes]] = []  # (to, update)
    counter = itertools.count()
    for clock, (i, op, app, n) in enumerate(ops):
        doc, site = docs[i], SITES[i]
        if op in ("edit", "stop"):
            update = edit(doc, f"{site}/{next(counter)}", site, float(clock), app=app, replicas=n,
                          stopped=op == "stop")
        elif op == "audit":
            update = doc.put(AuditRecord(audit_id=f"{site}/{next(counter)}", ts=float(clock), actor="ops",
                                         action="deploy", target=app, site=site))
        else:
            update = doc.put(SiteSummary(site=site, nodes=n, ready=n, leader=None, addresses=(), ts=float(clock)))
        for j in range(3):
            if j != i and rnd.random() >= loss:
                in_flight.append((j, update))
                if rnd.random() < duplication:
                    in_flight.append((j, update))
        # deliver a random part of what is in flight, in random order
        rnd.shuffle(in_flight)
        keep = rnd.randint(0, len(in_flight))
        for j, update in in_flight[keep:]:
            docs[j].apply(update)
        del in_flight[keep:]
    for j, update in in_flight:  # late arrivals, after everything else
        docs[j].apply(update)
    for x, y in itertools.combinations(docs, 2):  # the periodic state-vector exchange repairs losses
        sync(x, y)
    for x, y in itertools.combinations(docs, 2):
        sync(x, y)
    first = docs[0]
    for other in docs[1:]:
        assert other.apps() == first.apps()
        assert other.records(AuditRecord) == first.records(AuditRecord)
        assert other.records(SiteSummary) == first.records(SiteSummary)
        assert other.invalid() == []


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 6), st.integers(0, 6), st.integers(0, 6))
def test_lacking_counts_the_items_a_delta_would_carry(only_left, shared, only_right):
    left, right = MeshDocument(client_id=1), MeshDocument(client_id=2)
    for n in range(shared):
        right.apply(left.put(AuditRecord(audit_id=f"s/{n}", ts=1.0, actor="a", action="b", target="c", site="s")))
    for n in range(only_left):
        left.put(AuditRecord(audit_id=f"l/{n}", ts=1.0, actor="a", action="b", target="c", site="l"))
    for n in range(only_right):
        right.put(AuditRecord(audit_id=f"r/{n}", ts=1.0, actor="a", action="b", target="c", site="r"))
    assert left.lacking(right.state_vector()) == check_update(left.delta_since(right.state_vector()))[0] == only_left
    assert left.lacking(b"") == shared + only_left
    with pytest.raises(SyncError):
        left.lacking(b"\x05\x01")


def test_changed_entries_parse_in_slices_and_read_the_same():
    source = MeshDocument()
    for n in range(30):
        edit(source, f"a/{n}", "a", float(n))
    sliced, whole = MeshDocument(), MeshDocument()
    for doc in (sliced, whole):
        doc.apply(source.full_update())
    left = [sliced.parse_pending(7) for _ in range(6)]
    assert left == [23, 16, 9, 2, 0, 0]
    assert sliced.app_edits() == whole.app_edits() and sliced.apps() == whole.apps()


def test_a_small_write_stays_small_after_many_overwrites():
    """The update a write returns carries that write, not the document's history of
    overwrites (its whole delete set), so the durable log and every peer get what changed."""
    from crdt.schema import SiteSummary
    doc = MeshDocument(client_id=7)
    first = None
    for i in range(3000):  # one record overwritten between new ones: a delete set of 3,000 ranges
        update = doc.put(SiteSummary(site="s0", nodes=i, ready=i, leader="n1", ts=1.0 + i, addresses=()))
        doc.put(SiteSummary(site=f"new{i}", nodes=i, ready=i, leader="n1", ts=1.0 + i, addresses=()))
        first = first or len(update)
    last = doc.put(SiteSummary(site="s0", nodes=1, ready=1, leader="n1", ts=9999.0, addresses=()))
    assert len(last) < 2 * first, (first, len(last))
    other = MeshDocument(client_id=8)
    other.apply(doc.full_update())
    assert other.get(SiteSummary, "s0").ts == 9999.0
    assert doc.put_many([]) == b"\x00\x00"


def test_a_delta_that_brings_only_known_deletions_changes_nothing_and_a_new_deletion_does():
    a, b = MeshDocument(), MeshDocument()
    for n in range(20):  # overwrites of one record: a delete set on both sides once synced
        a.put(SiteSummary(site="a", nodes=n + 1, ready=1, leader="n1", addresses=(), ts=float(n)))
    sync(a, b)
    # The periodic anti-entropy round: a's delta for b carries a's whole delete set again.
    again = a.delta_since(b.state_vector())
    assert check_update(again)[1] > 0
    assert b.apply(again) is False
    assert a.apply(b.delta_since(a.state_vector())) is False
    # A deletion alone (no new item): b's state vector does not move, but b has changed.
    a.doc.get(SiteSummary.ROOT, type=Map).pop("a")  # as compaction removes a record
    deletion = a.delta_since(b.state_vector())
    vector = b.state_vector()
    assert b.apply(deletion) is True
    assert b.state_vector() == vector and b.records(SiteSummary) == []
    assert b.apply(deletion) is False  # and once more: nothing new


def test_a_document_nobody_holds_is_freed_with_its_history():
    # A compaction replaces the whole document; the old one (and its pycrdt Doc, history and
    # all) must go once the last reference to it does. pycrdt keeps observers in Rust, out
    # of the garbage collector's sight: one that refers back to the document keeps it alive.
    doc = MeshDocument()
    edit(doc, "a/1", "a", 1.0)
    doc.put(SiteSummary(site="a", nodes=1, ready=1, leader="n1", addresses=(), ts=1.0))
    assert doc.records(SiteSummary)  # its observers have run
    gone = weakref.ref(doc)
    del doc
    gc.collect()
    assert gone() is None
