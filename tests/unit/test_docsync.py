"""meshd.io.docsync: replicas syncing over real TCP connections on loopback, with durable stores;
cut, changed on both sides, reconnected."""

from __future__ import annotations

from functools import partial

import pytest
import trio
import trio.testing

from crdt.document import MeshDocument
from crdt.epoch import Epoch
from crdt.schema import AppEdit, AppSiteStatus, AuditRecord, DroppedAudit, SiteSummary
from crdt.sync import EPOCH, FULL, STATE, UPDATE, WANT, encode_message
from meshd.io.crdtstore import DocumentStore
from meshd.io.docsync import DocumentHub
from tests.doclink import link


def audit(n: int, site: str) -> AuditRecord:
    return AuditRecord(audit_id=f"{site}/{n}", ts=float(n), actor="ops", action="deploy", target="web", site=site)


def audits(hub_or_doc) -> set[str]:
    doc = getattr(hub_or_doc, "document", hub_or_doc)
    return {r.audit_id for r in doc.records(AuditRecord)}


def durable_hub(path) -> DocumentHub:
    store = DocumentStore(path)
    return DocumentHub(store.open(), store)


async def wait_equal(*hubs: DocumentHub, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while len({frozenset(audits(h)) for h in hubs}) != 1:
            await trio.sleep(0.01)


def test_three_replicas_in_a_line_converge_by_store_and_forward_and_keep_it_on_disk(tmp_path):
    async def main():
        a, b, c = (durable_hub(tmp_path / name) for name in "abc")
        async with trio.open_nursery() as nursery:
            await nursery.start(link, a, b)
            await nursery.start(link, b, c)  # a and c never talk: b passes the news on
            for n in range(200):
                await a.write([audit(n, "a")])
            await c.write([audit(0, "c")])
            await wait_equal(a, b, c)
            nursery.cancel_scope.cancel()
    trio.run(main)
    for name in "abc":  # what each replica took is in its own store
        assert len(audits(DocumentStore(tmp_path / name).open())) == 201


def test_cut_both_sides_change_then_reconnect_converge_sending_about_the_minimal_deltas():
    async def main():
        a, b = DocumentHub(MeshDocument(), None), DocumentHub(MeshDocument(), None)
        async with trio.open_nursery() as nursery:
            cut = await nursery.start(link, a, b)
            for n in range(100):
                await a.write([audit(n, "a")])
            await wait_equal(a, b)
            cut.cancel()  # the link goes down
            with trio.fail_after(5):
                while a.sessions or b.sessions:
                    await trio.sleep(0.01)
            before_a, before_b = a.document.state_vector(), b.document.state_vector()
            for n in range(100, 1100):
                await a.write([audit(n, "a")])
            for n in range(1000):
                await b.write([audit(n, "b")])
            assert len(audits(a)) == 1100 and len(audits(b)) == 1100  # each kept working alone
            minimal = len(a.document.delta_since(before_b)) + len(b.document.delta_since(before_a))
            await nursery.start(link, a, b)
            await wait_equal(a, b)
            assert len(audits(a)) == 2100
            sent = sum(s.payload_out for hub in (a, b) for s in hub.live_sessions())
            assert sent <= 1.5 * minimal, (sent, minimal)
            nursery.cancel_scope.cancel()
    trio.run(main)


def test_a_malformed_message_ends_only_that_session_and_changes_nothing():
    async def main():
        hub = DocumentHub(MeshDocument(), None)
        await hub.write([audit(1, "a")])
        before = hub.document.full_update()
        left, right = trio.testing.memory_stream_pair()
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(hub.run_session, right, "rogue")
                await left.send_all(encode_message(UPDATE, b"\x80\x80\x80\x7f"))
        assert hub.document.full_update() == before and hub.sessions == {}
    trio.run(main)


class SlowTlsLikeStream(trio.abc.Stream):
    """A byte stream that sends in small timed chunks and, like a TLS stream, is broken for
    good once a send is cancelled half-way."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.broken = False

    async def send_all(self, data) -> None:
        if self.broken:
            raise trio.BrokenResourceError
        view = memoryview(bytes(data))
        try:
            for start in range(0, len(view), 16384):
                await self.inner.send_all(view[start:start + 16384])
                await trio.sleep(0.002)
        except trio.Cancelled:
            self.broken = True
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None) -> bytes:
        if self.broken:
            raise trio.BrokenResourceError
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_a_catch_up_longer_than_the_resync_interval_is_not_cut_short():
    """The resync timer only bounds the wait for the next message: it never cancels a send
    in progress (which breaks a TLS stream and restarts the catch-up from scratch)."""
    async def main():
        a, b = DocumentHub(MeshDocument(), None), DocumentHub(MeshDocument(), None)
        for start in range(0, 3000, 500):
            await a.write([audit(n, "a") for n in range(start, start + 500)])
        left, right = trio.testing.memory_stream_pair()
        left, right = SlowTlsLikeStream(left), SlowTlsLikeStream(right)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(a.run_session, left, "b", resync_interval=0.02))
            nursery.start_soon(partial(b.run_session, right, "a", resync_interval=0.02))
            await wait_equal(a, b, timeout=20)
            assert not (left.broken or right.broken) and len(a.sessions) == len(b.sessions) == 1
            nursery.cancel_scope.cancel()
    trio.run(main)


# --- epochs: compaction and adoption ---------------------------------------------------------

DAY = 86400.0
RETENTION = 30 * DAY
T0 = 1_800_000_000.0


class WallClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def timed_audit(site: str, seq: int, ts: float) -> AuditRecord:
    return AuditRecord(audit_id=f"{site}/{seq}", ts=ts, actor="ops", action="deploy", target="web", site=site)


def web_edit(edit_id: str, version: int, base: str, ts: float, site: str) -> AppEdit:
    return AppEdit(edit_id=edit_id, app="web", version=version, base=base, site=site, actor="ops", ts=ts,
                   spec='[app]\nname = "web"\n', targets=(site,), replicas=version)


def clocked_hub(path, clock: WallClock) -> DocumentHub:
    store = DocumentStore(path)
    return DocumentHub(store.open(), store, wall_clock=clock, retention=RETENTION)


def records_of(hub_or_doc) -> set:
    doc = getattr(hub_or_doc, "document", hub_or_doc)
    return set(doc.all_records())


async def wait_same_records(*hubs: DocumentHub, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while len({(h.document.epoch, frozenset(records_of(h))) for h in hubs}) != 1:
            await trio.sleep(0.01)


@pytest.mark.parametrize("away_compacts_too", [False, True])
def test_a_replica_away_past_the_retention_converges_with_one_that_compacted(tmp_path, away_compacts_too):
    """Site a compacts while site b is cut off for 45 days (retention 30) and keeps writing;
    after the reconnect both hold the same records on one epoch, b's writes included, the
    summary of dropped audit is right, and both stores reopen to it."""
    clock = WallClock(T0)

    async def main():
        a, b = clocked_hub(tmp_path / "a", clock), clocked_hub(tmp_path / "b", clock)
        async with trio.open_nursery() as nursery:
            cut = await nursery.start(partial(link, resync_interval=0.2), a, b)
            for n in range(1, 11):  # day n: audit, status and summary overwrites, an edit of web
                clock.now = T0 + n * DAY
                await a.write([timed_audit("a", n, clock.now),
                               SiteSummary(site="a", nodes=3, ready=3, leader="n1", addresses=("198.18.0.1:7700",),
                                           ts=clock.now),
                               AppSiteStatus(app="web", site="a", edit_id=f"w{n}", version=n, desired=n,
                                             running=n, ts=clock.now),
                               web_edit(f"w{n}", n, f"w{n - 1}" if n > 1 else "", clock.now, "a")])
            await wait_same_records(a, b)
            cut.cancel()
            with trio.fail_after(5):
                while a.sessions or b.sessions:
                    await trio.sleep(0.01)
            for n in range(11, 56):  # 45 days apart, both keep writing
                clock.now = T0 + n * DAY
                await a.write([timed_audit("a", n, clock.now),
                               AppSiteStatus(app="web", site="a", edit_id="w10", version=10, desired=3,
                                             running=n % 4, ts=clock.now)])
                await b.write([timed_audit("b", n - 10, clock.now),
                               AppSiteStatus(app="web", site="b", edit_id="v11", version=11, desired=1,
                                             running=1, ts=clock.now)])
            await b.write([web_edit("v11", 11, "w10", clock.now, "b")])  # b changed web while away
            await a.compact("test")
            assert a.document.epoch.generation == 1 and a.store.epoch == a.document.epoch
            if away_compacts_too:
                await b.compact("test")
            await nursery.start(partial(link, resync_interval=0.2), a, b)
            await wait_same_records(a, b)
            # the common epoch syncs by deltas again
            await b.write([timed_audit("b", 46, clock.now)])
            with trio.fail_after(10):
                while ("audit", "b/46") not in {(r.ROOT, r.key) for r in records_of(a)}:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        return a.document.epoch, records_of(a)

    final_epoch, final = trio.run(main)
    by_key = {(r.ROOT, r.key): r for r in final}
    horizon = T0 + 55 * DAY - RETENTION  # day 25
    # a's audit of days 1-24 went (day 25 is not older than the horizon), b's of days 11-24
    assert by_key[("audit_dropped", "a")] == DroppedAudit(site="a", upto_seq=24, count=24, first_ts=T0 + DAY,
                                                          last_ts=T0 + 24 * DAY)
    assert by_key[("audit_dropped", "b")] == DroppedAudit(site="b", upto_seq=14, count=14, first_ts=T0 + 11 * DAY,
                                                          last_ts=T0 + 24 * DAY)
    assert {k for k in by_key if k[0] == "audit"} == (
        {("audit", f"a/{n}") for n in range(25, 56)} | {("audit", f"b/{n}") for n in range(15, 47)})
    assert all(r.ts >= horizon for r in final if isinstance(r, AuditRecord))
    # b's change of web won and is kept; a's old edits went (older than 30 days), bar none needed
    assert {r.edit_id for r in final if isinstance(r, AppEdit)} == {"v11"}
    assert by_key[("app_status", "web@b")].version == 11 and ("app_status", "web@a") in by_key
    for name in "ab":  # both stores reopen to the same records, on the surviving epoch
        store = DocumentStore(tmp_path / name)
        reopened = store.open()
        assert reopened.epoch == final_epoch and store.epoch == final_epoch
        assert records_of(reopened) == final
        store.close()


def test_a_write_during_a_compaction_is_kept_and_stored_in_the_new_epoch(tmp_path):
    clock = WallClock(T0)

    async def main():
        hub = clocked_hub(tmp_path, clock)
        await hub.write([timed_audit("a", n, T0) for n in range(1, 2001)])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.compact, "test")
            await trio.sleep(0)  # the rebuild runs on a worker thread: write meanwhile
            for n in range(2001, 2051):
                await hub.write([timed_audit("a", n, T0)])
        assert hub.document.epoch.generation == 1
        assert len(audits(hub)) == 2050
        await hub.write([timed_audit("a", 2051, T0)])
        hub.store.close()
    trio.run(main)
    assert len(audits(DocumentStore(tmp_path).open())) == 2051


def test_a_hostile_whole_document_ends_the_session_and_changes_nothing(tmp_path):
    """A peer claiming a higher epoch and sending junk as its document: refused whole."""
    from pycrdt import Map
    clock = WallClock(T0)

    async def main():
        hub = clocked_hub(tmp_path, clock)
        await hub.write([timed_audit("a", 1, T0)])
        before, epoch_before = hub.document.full_update(), hub.document.epoch
        junk = MeshDocument(client_id=9)
        junk.doc.get("audit", type=Map)["a/2"] = "not a record"
        left, right = trio.testing.memory_stream_pair()
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(hub.run_session, right, "rogue")
                hostile = Epoch(7, b"\x07" * 16).encode()
                await left.send_all(encode_message(EPOCH, hostile))
                with trio.fail_after(2):  # it asks for that epoch's document
                    assert (await left.receive_some(65536))[0] in (EPOCH, STATE, WANT)
                await left.send_all(encode_message(FULL, hostile + junk.full_update()))
        assert hub.document.full_update() == before and hub.document.epoch == epoch_before
        assert hub.sessions == {} and hub.store.epoch == epoch_before
        assert Epoch(7, b"\x07" * 16) in hub.refused_epochs  # and it is not asked for again
        hub.store.close()
    trio.run(main)


async def compacted_once(hub: DocumentHub) -> None:
    """Wait for the hub's first compaction, then make sure no second one follows (nothing due)."""
    with trio.fail_after(5):
        while hub.document.epoch.generation == 0:
            await trio.sleep(0.01)
    await trio.sleep(0.1)
    assert hub.document.epoch.generation == 1


def test_the_compaction_loop_compacts_only_when_due_and_allowed(tmp_path):
    clock = WallClock(T0)

    async def main():
        hub = clocked_hub(tmp_path, clock)
        await hub.write([timed_audit("a", n, T0 + n) for n in range(1, 10)])
        allowed = [False]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.compaction_loop, lambda: allowed[0], 0.01)
            clock.now = T0 + 40 * DAY  # records 10 days past the retention: due
            await trio.sleep(0.1)
            assert hub.document.epoch.generation == 0  # not the leader: not allowed
            allowed[0] = True
            await compacted_once(hub)
            nursery.cancel_scope.cancel()
        assert audits(hub) == {"a/9"} and hub.last_change["dropped_audit"] == 8
        hub.store.close()
    trio.run(main)


def test_the_compaction_loop_forgets_an_app_stopped_two_retentions_ago(tmp_path):
    clock = WallClock(T0)
    stop = AppEdit(edit_id="e2", app="web", version=2, base="e1", site="a", actor="ops", ts=T0 + 10, spec="",
                   targets=(), replicas=0, stopped=True)
    status = AppSiteStatus(app="web", site="a", edit_id="e2", version=2, desired=0, running=0, ts=T0 + 11)
    kept = AppEdit(edit_id="k1", app="kept", version=1, base="", site="a", actor="ops", ts=T0, spec="",
                   targets=("a",), replicas=1)

    async def main():
        hub = clocked_hub(tmp_path, clock)
        await hub.write([stop, status, kept])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.compaction_loop, lambda: True, 0.01)
            clock.now = T0 + 2 * RETENTION + 1  # past two retentions, within the slack: not due yet
            await trio.sleep(0.1)
            assert hub.document.epoch.generation == 0
            clock.now = T0 + 2 * RETENTION + 3 * DAY + 11
            await compacted_once(hub)
            nursery.cancel_scope.cancel()
        assert set(hub.document.apps()) == {"kept"} and hub.document.records(AppSiteStatus) == []
        assert hub.last_change["forgotten_apps"] == 1 and hub.last_change["dropped_statuses"] == 1
        hub.store.close()
        reopened = DocumentStore(tmp_path).open()  # and it stays forgotten on disk
        assert set(reopened.apps()) == {"kept"}
    trio.run(main)
