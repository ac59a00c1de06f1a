"""meshd.io.docsync: replicas syncing over real TCP connections on loopback, with durable stores;
cut, changed on both sides, reconnected."""

from __future__ import annotations

from functools import partial

import trio
import trio.testing

from crdt.document import MeshDocument
from crdt.schema import AuditRecord
from crdt.sync import UPDATE, encode_message
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
