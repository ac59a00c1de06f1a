"""The trio side of document sync: a node's replica (document + durable store) and the sync
sessions it runs with other replicas over byte streams (crdt.sync does the deciding).

`DocumentHub` owns the node's replica. Local writes and updates from peers both go through it:
validated (local) or checked (remote), applied, appended to the durable log (fsync), and only
then acknowledged or pushed to the other sessions (store and forward: a site that hears from
another passes the news on to every site it talks to).

Invariants:
- An update is on disk before anyone hears of it: `write` returns, and a remote update is
  forwarded, only after `DocumentStore.append` returned. The disk work (fsync, snapshots)
  runs on a worker thread, one step at a time; the document itself stays on the trio thread.
- A session never sends an update back to the session it came from.
- A malformed message ends its session (the byte stream cannot be trusted after it); the
  document is unchanged by it and every other session goes on.
- Each session's outbox is bounded (OUTBOX_MESSAGES): a peer too slow to keep up is dropped
  and catches up by state vector when it reconnects, instead of holding memory hostage.
"""

from __future__ import annotations

import logging
from typing import Callable

import trio

from crdt.document import MeshDocument, SyncError
from crdt.schema import Record
from crdt.sync import Message, SyncDecoder, SyncSession
from meshd.io.crdtstore import DocumentStore

log = logging.getLogger("meshd.docsync")

# Pushed updates waiting for one slow peer; past this the session is ended (it resyncs by
# state vector on reconnect, which sends the same changes once, compacted).
OUTBOX_MESSAGES = 1024
# Each side re-sends its state vector this often, repairing any push lost on the way; small
# next to how long a site may be cut off, large next to a state vector's cost (bytes).
RESYNC_INTERVAL = 30.0
READ_SIZE = 65536
# Each side sends its state vector every resync interval, so a session that heard nothing
# for this many intervals lost its peer (a cut link keeps TCP quiet for many minutes).
SILENCE_INTERVALS = 2.5
# ... but never less than this: a peer applying and storing a large catch-up (10,000 changes
# after a long cut) may not read or write for seconds, and dropping it then restarts the
# catch-up from the start.
MIN_SILENCE = 10.0


class SessionEnded(Exception):
    pass


class DocumentHub:
    def __init__(self, document: MeshDocument, store: DocumentStore | None,
                 clock: Callable[[], float] = trio.current_time) -> None:
        self.document = document
        self.store = store
        self.clock = clock
        self.sessions: dict[int, tuple[SyncSession, trio.MemorySendChannel]] = {}
        self._next_id = 0
        self._disk = trio.Lock()  # appends and compactions, in order, one at a time
        self.on_remote_update: Callable[[SyncSession], None] | None = None  # after one is applied and stored

    # --- changes -------------------------------------------------------------------------

    async def write(self, records: list[Record]) -> bytes:
        """Validate, apply and persist local records, then push them; raises SchemaError
        (and then nothing was written)."""
        update = self.document.put_many(records)
        await self._persist_and_push(update, source=None)
        return update

    async def _persist_and_push(self, update: bytes, source: int | None) -> None:
        if self.store is not None:
            store = self.store
            async with self._disk:
                await trio.to_thread.run_sync(store.append, update)
                if store.needs_compaction():
                    await trio.to_thread.run_sync(store.compact_to, self.document.full_update())
        for session_id, (session, outbox) in list(self.sessions.items()):
            if session_id == source:
                continue
            for message in session.push(update):
                try:
                    outbox.send_nowait(message)
                except trio.WouldBlock:
                    log.warning("sync peer too slow, dropping its session", extra={"peer": session.peer})
                    outbox.close()
                    self.sessions.pop(session_id, None)
                    break
                except trio.ClosedResourceError:
                    self.sessions.pop(session_id, None)
                    break

    # --- sessions ------------------------------------------------------------------------

    async def run_session(self, stream: trio.abc.Stream, peer: str,
                          resync_interval: float = RESYNC_INTERVAL, initial: bytes = b"",
                          on_start: Callable[[SyncSession], None] | None = None,
                          settle: float = 0.0) -> SyncSession:
        """Sync with the replica at the other end of `stream` until either side closes it,
        it misbehaves or it stays silent for SILENCE_INTERVALS resync intervals (at least
        MIN_SILENCE); returns the session (its counters) when it ends. `initial`: bytes of
        the stream already read;
        `settle`: how long to wait before opening (our state vector), so that a duplicate
        session the caller ends at start has exchanged nothing yet."""
        session = SyncSession(self.document, peer)
        if on_start is not None:
            on_start(session)
        send, receive = trio.open_memory_channel[Message](OUTBOX_MESSAGES)
        session_id = self._next_id
        self._next_id += 1
        self.sessions[session_id] = (session, send)
        ended = "closed"
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sender, stream, session, receive, resync_interval, nursery.cancel_scope,
                                   settle)
                try:
                    await self._receiver(stream, session, session_id, send, initial,
                                         max(resync_interval * SILENCE_INTERVALS, MIN_SILENCE))
                except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                    ended = str(e) or (repr(e.__cause__) if e.__cause__ else type(e).__name__)
                except SessionEnded as e:
                    ended = str(e)
                nursery.cancel_scope.cancel()
        finally:
            self.sessions.pop(session_id, None)
            send.close()
        log.info("sync session ended", extra={"peer": peer, "reason": ended})
        return session

    def live_sessions(self) -> list[SyncSession]:
        return [session for session, _ in self.sessions.values()]

    async def _sender(self, stream: trio.abc.Stream, session: SyncSession, outbox: trio.MemoryReceiveChannel,
                      resync_interval: float, scope: trio.CancelScope, settle: float) -> None:
        try:
            await trio.sleep(settle)
            for message in session.open():
                await stream.send_all(message.encode())
            next_resync = trio.current_time() + resync_interval
            while True:
                # Only the wait is bounded by the resync time, never a send: a send cancelled
                # half-way breaks the TLS stream (a large catch-up on a slow link takes longer
                # than a resync interval).
                message = None
                with trio.move_on_at(next_resync):
                    try:
                        message = await outbox.receive()
                    except trio.EndOfChannel:
                        raise SessionEnded("outbox closed (peer too slow)") from None
                if message is not None:
                    await stream.send_all(message.encode())
                    continue
                if not session.awaiting_delta:  # a catch-up on its way answers this one too
                    for message in session.open():  # our state vector again: repairs lost pushes
                        await stream.send_all(message.encode())
                next_resync = trio.current_time() + resync_interval
        except (trio.BrokenResourceError, trio.ClosedResourceError, SessionEnded):
            scope.cancel()

    async def _receiver(self, stream: trio.abc.Stream, session: SyncSession, session_id: int,
                        outbox: trio.MemorySendChannel, initial: bytes, silence: float) -> None:
        decoder = SyncDecoder()
        data = initial
        while True:
            if not data:
                with trio.move_on_after(silence):
                    data = await stream.receive_some(READ_SIZE)
                    if not data:
                        raise SessionEnded("closed by peer")
                if not data:
                    raise SessionEnded(f"peer silent for {silence:g}s")
            try:
                messages = decoder.feed(data)
            except SyncError as e:
                raise SessionEnded(f"malformed sync stream: {e.reason}") from None
            for message in messages:
                try:
                    replies, applied = session.receive(message, now=self.clock())
                except SyncError as e:
                    raise SessionEnded(f"refused a sync message: {e.reason}") from None
                for reply in replies:
                    try:
                        outbox.send_nowait(reply)
                    except trio.WouldBlock:
                        raise SessionEnded("peer too slow") from None
                if applied is not None:
                    await self._persist_and_push(applied, source=session_id)
                    if self.on_remote_update is not None:
                        self.on_remote_update(session)
            data = b""
