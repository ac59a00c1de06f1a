"""The trio side of document sync: a node's replica (document + durable store) and the sync
sessions it runs with other replicas over byte streams (crdt.sync does the deciding), and the
replica's moves to a new epoch (crdt.epoch): compacting it, or adopting another replica's.

`DocumentHub` owns the node's replica. Local writes and updates from peers both go through it:
validated (local) or checked (remote), applied, appended to the durable log (fsync), and only
then acknowledged or pushed to the other sessions (store and forward: a site that hears from
another passes the news on to every site it talks to).

An epoch change (`compact`, or a whole document from a peer of a higher epoch) builds the new
document on a worker thread from the records as they were (compaction: crdt.compaction.compact;
adoption: the peer's document checked whole, then our records merged into it by
crdt.compaction.merge); then, on the trio thread with the disk lock held, it carries over what
the old document took meanwhile, swaps the documents, rewrites the durable store
(DocumentStore.rewrite) and tells every session (`SyncSession.switched`).

Invariants:
- An update is on disk before anyone hears of it: `write` returns, and a remote update is
  forwarded, only after `DocumentStore.append` returned. The disk work (fsync, snapshots)
  runs on a worker thread, one step at a time; the document in use stays on the trio thread
  (a new epoch's document is built on a worker thread before anyone else can see it).
- Nothing acknowledged is lost by an epoch change: the new document holds every record of the
  old one (but what compaction drops) before the store is rewritten, and an update applied to
  the old document that was still waiting for the disk is then not appended to the new
  epoch's log (its records are already in the new snapshot), and writes made after the swap
  are appended only after the rewrite.
- On a full disk (meshd.io.diskspace) a local write is refused before the document takes it,
  and a session whose update cannot be stored ends: the peer still holds it and offers it
  again in its next session, once there is room. Compaction waits for room.
- One epoch change at a time; a refused adoption (malformed or junk-holding document) ends
  that session with the reason and changes nothing.
- A session never sends an update back to the session it came from.
- A malformed message ends its session (the byte stream cannot be trusted after it); the
  document is unchanged by it and every other session goes on.
- Each session's outbox is bounded (OUTBOX_MESSAGES): a peer too slow to keep up is dropped
  and catches up by state vector when it reconnects, instead of holding memory hostage.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any, Callable

import trio

from crdt import compaction
from crdt.document import MeshDocument, SyncError
from crdt.epoch import EPOCH_ID_BYTES, Epoch
from crdt.schema import RECORD_KINDS, Record
from crdt.sync import Message, SyncDecoder, SyncSession
from meshd.io.crdtstore import DocumentStore
from meshd.io.logthrottle import throttle
from meshd.io.memory import trim_heap
from meshd.io.diskspace import DiskFull, full_problem, is_full

# Throttled: a full disk, or a peer that keeps reconnecting, would otherwise cost a line a pass.
log = throttle(logging.getLogger("meshd.docsync"))

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
# A site's leader looks whether its replica is due for compaction this often
# (crdt.compaction.compaction_due): the look is a pass over the records (milliseconds); due
# means history of megabytes or records days past the retention, neither urgent to the minute.
COMPACTION_CHECK_PERIOD = 600.0
# ... or a quarter of the retention when that is shorter (records then expire within minutes),
# but no more often than this: the look is not free on a small board.
MIN_COMPACTION_CHECK_PERIOD = 30.0
# Refused epochs remembered: one hostile peer can announce a new one at every session, and
# then costs a refused document each; more than a few distinct ones are not a mistake.
REFUSED_EPOCHS_KEPT = 64
# Writer ids in pycrdt are 53-bit (what a float64 holds); a fresh one per document built.
CLIENT_ID_BITS = 52


class SessionEnded(Exception):
    pass


class DocumentHub:
    def __init__(self, document: MeshDocument, store: DocumentStore | None,
                 clock: Callable[[], float] = trio.current_time, *, wall_clock: Callable[[], float] = time.time,
                 retention: float = compaction.DEFAULT_RETENTION,
                 new_client_id: Callable[[], int] = lambda: secrets.randbits(CLIENT_ID_BITS),
                 new_epoch_id: Callable[[], bytes] = lambda: secrets.token_bytes(EPOCH_ID_BYTES)) -> None:
        self.document = document
        self.store = store
        self.clock = clock
        self.wall_clock = wall_clock  # record time stamps are wall-clock (time.time)
        self.retention = retention
        self.new_client_id, self.new_epoch_id = new_client_id, new_epoch_id
        self.sessions: dict[int, tuple[SyncSession, trio.MemorySendChannel]] = {}
        self._next_id = 0
        self._disk = trio.Lock()  # appends and compactions, in order, one at a time
        self._switching = trio.Lock()  # one epoch change at a time
        self.on_remote_update: Callable[[SyncSession], None] | None = None  # after one is applied and stored
        self.on_epoch_change: Callable[[], None] | None = None  # after the document was replaced
        # Update bytes taken since the epoch began, and the document's size then: how much
        # history the document carries (crdt.compaction.compaction_due).
        self.grown = 0
        self.epoch_base = (store.snapshot_bytes + store.log_bytes) if store is not None else 0
        self.last_change: dict[str, Any] | None = None  # the last epoch change, for meshctl document
        # Epochs whose document was refused (malformed, or junk in it), with the reason: not
        # asked for again (each ask costs the peer a whole document on the wire).
        self.refused_epochs: dict[Epoch, str] = {}

    # --- changes -------------------------------------------------------------------------

    async def write(self, records: list[Record]) -> bytes:
        """Validate, apply and persist local records, then push them; raises SchemaError or,
        on a full disk, DiskFull (and then nothing was written: the disk is asked before
        the document takes the records)."""
        document = self.document
        if self.store is not None:
            problem = full_problem(self.store.directory)
            if problem:
                raise DiskFull(problem)
        update = document.put_many(records)
        await self._persist_and_push(update, source=None, document=document)
        return update

    async def _persist_and_push(self, update: bytes, source: int | None, document: MeshDocument) -> None:
        if self.store is not None:
            store = self.store
            async with self._disk:
                if document is not self.document:
                    return  # of an epoch since replaced: the new snapshot holds its records
                await trio.to_thread.run_sync(store.append, update)
                if store.needs_compaction():
                    try:
                        await trio.to_thread.run_sync(store.compact_to, self.document.full_update())
                    except OSError as e:  # the log holds everything still: compact later
                        if not is_full(e):
                            raise
                        log.warning("document compaction postponed: the disk is full")
        elif document is not self.document:
            return
        self.grown += len(update)
        self._push(update, source)

    def _push(self, update: bytes, source: int | None) -> None:
        for session_id, (session, outbox) in list(self.sessions.items()):
            if session_id == source:
                continue
            self._send(session_id, session.push(update))

    def _send(self, session_id: int, messages: list[Message]) -> None:
        entry = self.sessions.get(session_id)
        if entry is None:
            return
        session, outbox = entry
        for message in messages:
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

    # --- epochs ----------------------------------------------------------------------------

    async def compact(self, reason: str = "asked") -> bool:
        """Rebuild the document from what compaction keeps into a new epoch and rewrite the
        store; returns False when another epoch change was under way (nothing done)."""
        if self._switching.locked():
            return False
        now, retention = self.wall_clock(), self.retention
        epoch = self.document.epoch.successor(self.new_epoch_id())
        client_id = self.new_client_id()
        stats: dict[str, Any] = {}

        def build(before: list[Record]) -> tuple[MeshDocument, list[bytes]]:
            document, kept = compaction.rebuild(before, now=now, retention=retention, client_id=client_id,
                                                epoch=epoch)
            stats.update(records=len(kept.records), dropped_edits=kept.dropped_edits,
                         dropped_audit=kept.dropped_audit, forgotten_apps=len(kept.forgotten_apps),
                         dropped_statuses=kept.dropped_statuses)
            return document, []

        await self._switch("compacted", build, reason=reason, stats=stats)
        return True

    async def adopt(self, epoch: Epoch, full_update: bytes, peer: str) -> None:
        """Move to a peer's higher epoch: its document, with our records merged into it.
        Raises SyncError (and changes nothing) when its document is refused."""
        async with self._switching:
            if epoch <= self.document.epoch:
                return  # we moved past it meanwhile (our peer will adopt ours)
            now, retention, client_id = self.wall_clock(), self.retention, self.new_client_id()
            stats: dict[str, Any] = {"from": peer}

            def build(before: list[Record]) -> tuple[MeshDocument, list[bytes]]:
                taken = compaction.adopt(before, full_update, epoch=epoch, now=now, retention=retention,
                                         client_id=client_id)
                stats.update(records=len(taken.merged.records), merged_in=taken.written, removed=taken.removed,
                             dropped_edits=taken.merged.dropped_edits, dropped_audit=taken.merged.dropped_audit,
                             forgotten_apps=len(taken.merged.forgotten_apps),
                             dropped_statuses=taken.merged.dropped_statuses)
                return taken.document, [taken.update] if taken.update else []

            await self._switch_locked("adopted", build, reason=f"epoch {epoch} of {peer}", stats=stats)

    def _refuse(self, epoch: Epoch, reason: str) -> None:
        self.refused_epochs[epoch] = reason
        while len(self.refused_epochs) > REFUSED_EPOCHS_KEPT:
            self.refused_epochs.pop(next(iter(self.refused_epochs)))
        log.warning("document of another epoch refused", extra={"epoch": str(epoch), "reason": reason})

    async def _switch(self, what: str, build, *, reason: str, stats: dict[str, Any]) -> None:
        async with self._switching:
            await self._switch_locked(what, build, reason=reason, stats=stats)

    async def _switch_locked(self, what: str, build: Callable[[list[Record]], tuple[MeshDocument, list[bytes]]],
                             *, reason: str, stats: dict[str, Any]) -> None:
        started = time.perf_counter()
        old = self.document
        before = old.all_records()
        # The old document keeps taking writes and updates (and storing them) while this runs.
        new, updates = await trio.to_thread.run_sync(build, before)
        async with self._disk:  # no append from here on until the store is rewritten
            carried = _carry_over(before, old.all_records(), new)
            if carried is not None:
                updates.append(carried)
            full = new.full_update()
            self.document = new
            for session_id, (session, _) in list(self.sessions.items()):
                self._send(session_id, session.switched(new))
            if self.store is not None:
                await trio.to_thread.run_sync(self.store.rewrite, new.epoch, full)
            history, self.grown, self.epoch_base = self.grown, 0, len(full)
        for update in updates:  # in the new snapshot, so on disk: peers of the new epoch get them
            self._push(update, None)
        self.last_change = {"what": what, "reason": reason, "at": self.wall_clock(), "from_epoch": str(old.epoch),
                            "epoch": str(new.epoch), "history_bytes": history, "bytes": len(full),
                            "seconds": round(time.perf_counter() - started, 3), **stats}
        log.info(f"document {what}", extra={k: v for k, v in self.last_change.items() if k != "what"})
        if self.on_epoch_change is not None:
            self.on_epoch_change()
        # The old document, its records and the rebuild's encodings are freed now: their pages
        # go back to the kernel at once (a few ms, off this thread), not at the next periodic
        # trim, or every compaction leaves a step of several MB in the daemon's RSS for minutes.
        del old, before  # this frame's references go before the trim
        await trio.to_thread.run_sync(trim_heap)

    async def compaction_loop(self, may_compact: Callable[[], bool], period: float | None = None) -> None:
        """Compact whenever crdt.compaction says it is due and `may_compact()` (this node
        leads its site: followers take their leader's epoch)."""
        if period is None:
            period = min(COMPACTION_CHECK_PERIOD, max(MIN_COMPACTION_CHECK_PERIOD, self.retention / 4))
        while True:
            await trio.sleep(period * (0.75 + secrets.randbelow(500) / 1000))  # sites not in step
            if not may_compact() or self._switching.locked():
                continue
            # a pass over every record (tens of ms for a month's): off the trio thread
            records, retention = self.document.all_records(), self.retention
            oldest = await trio.to_thread.run_sync(lambda: compaction.oldest_expiring(records, retention=retention))
            reason = compaction.compaction_due(now=self.wall_clock(), retention=self.retention, grown=self.grown,
                                               base=self.epoch_base, oldest=oldest)
            if reason is not None:
                await self.compact(reason)

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
        session = SyncSession(self.document, peer, refused=self.refused_epochs.__contains__)
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
                    for message in session.resync():  # our state vector again: repairs lost pushes
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
                    try:
                        await self._persist_and_push(applied, source=session_id, document=session.document)
                    except DiskFull as e:  # the peer keeps it, and offers it again next session
                        raise SessionEnded(f"this replica cannot store updates: {e}") from None
                    if self.on_remote_update is not None:
                        self.on_remote_update(session)
                adoption = session.take_adoption()
                if adoption is not None:
                    try:
                        await self.adopt(*adoption, peer=session.peer)
                    except SyncError as e:
                        self._refuse(adoption[0], e.reason)
                        raise SessionEnded(f"refused the document of epoch {adoption[0]}: {e.reason}") from None
                    session.last_sync = self.clock()
            data = b""


def _carry_over(before: list[Record], after: list[Record], new: MeshDocument) -> bytes | None:
    """Write into `new` what the old document took while `new` was being built (records in
    `after` that were not in `before`, or changed), each by crdt.compaction's rules against
    what `new` holds; returns that write's update, or None."""
    was = {(r.ROOT, r.key): r for r in before}
    kinds = {kind.ROOT: kind for kind in RECORD_KINDS}
    puts = []
    for record in after:
        old = was.get((record.ROOT, record.key))
        if old is record or old == record:
            continue
        held = new.get(kinds[record.ROOT], record.key)
        keep = record if held is None else compaction.newer(held, record)
        if keep != held:
            puts.append(keep)
    return new.put_many(puts) if puts else None
