"""This node's artifacts: pushing a file into the mesh, fetching what its workloads need from
the members of its site that hold it (several at once, in verified pieces), serving its own
to them, and telling the site what it holds. The decisions are meshd.artifacts.plan's (what
to fetch, drop, report) and meshd.artifacts.pieces' (which piece from whom, what to believe).

Invariants:
- A workload is given an artifact only once the store holds it complete: every piece was
  checked against the manifest's piece list, and the whole against its digest and size.
- A manifest is signed by the mesh root (by this node when it is a voter, else by the site's
  leader, a voter) or comes signed by a release key of the policy; the site's catalog admits
  it only when it verifies (meshd.artifacts.catalog), whoever made it.
- A fetch that fails (no holder, every holder lying or gone) leaves the workload pending with
  the reason and is tried again; nothing half-fetched is ever used, and the partial file is
  resumed, not restarted, once a holder is back.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import time
from dataclasses import dataclass
from typing import Callable

import trio

from crdt.schema import ArtifactHolding
from meshd import commands as cmds
from meshd.artifacts import catalog, pieces
from meshd.artifacts import plan as planmod
from meshd.artifacts.manifest import Manifest, ManifestError, open_manifest, pieces_digest, sign_manifest
from meshd.artifacts.pieces import MAX_IN_FLIGHT_PER_PEER, PieceFetch
from meshd.artifacts.ratelimit import UploadLimit
from meshd.artifacts import piecewire as W
from meshd.io import peer
from meshd.io.artifactpeer import PieceConnection, serve_pieces
from meshd.io.artifactstore import ArtifactStore, ArtifactWait, StoreError
from meshd.io.raft import CommandFailed
from meshd.io.wakeup import Wakeup
from meshd.artifacts.sites import Source
from meshd.state import ArtifactRef

log = logging.getLogger("meshd.artifacts")

# The plan is looked at again this often when nothing woke it (a holder that appeared in a
# state change wakes it at once; this covers retries of failed fetches).
PLAN_PERIOD = 2.0
# Fetches run at once: each keeps a few connections busy; more only splits the same links.
MAX_FETCHES = 4
# How often a pending workload's reason ("fetching model 37 %") is refreshed.
PROGRESS_PERIOD = 1.0
# A member still fetching an artifact is asked again for the pieces it has by now this often
# (each ask is a connection; a piece of a thin uplink takes longer than this to arrive).
PARTIAL_REFRESH = 0.5
# A member asked to sign a manifest answers within this (a voter signs in microseconds).
SIGN_TIMEOUT = 10.0


@dataclass
class _Fetching:
    digest: str
    name: str
    manifest: dict  # its signed manifest, for the members that fetch from this one meanwhile
    core: PieceFetch | None = None
    reason: str = ""  # why it is not progressing, when it is not


class ArtifactService:
    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.store: ArtifactStore | None = None
        self.limit = UploadLimit(ctx.config.artifact_upload_mbps)
        self.news: Wakeup | None = None
        self._wants: dict[str, int] = {}  # digest -> workloads waiting for it or running with it
        self._fetching: dict[str, _Fetching] = {}
        self._waiting: dict[str, str] = {}  # digest -> why the plan cannot fetch it now
        self.counts = {"fetched_bytes": 0, "served_bytes": 0, "rejected_pieces": 0}

    def open(self) -> None:
        self.store = ArtifactStore(self.ctx.data_dir, quota=self.ctx.config.artifact_quota_mb * 2**20,
                                   pinned=self._pinned)
        self.news = Wakeup()

    def _pinned(self) -> frozenset[str]:
        state = self.ctx.snapshot()
        return frozenset(catalog.pins(state)) | frozenset(self._wants)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        assert self.store is not None and self.news is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._forward_state_changes)
            nursery.start_soon(self._plan_loop, nursery)
            task_status.started()

    async def _forward_state_changes(self) -> None:
        assert self.ctx.state_changed is not None and self.news is not None
        changes = self.ctx.state_changed.listener()
        while True:
            await changes.wait(3600)
            self.news.notify()

    # --- what workloads see --------------------------------------------------------------

    async def ready(self, refs: tuple[ArtifactRef, ...], on_reason: Callable[[str], None]) -> dict[str, str]:
        """The path of each artifact by name once all are held (fetching what is missing);
        `on_reason` hears why it still waits. Raises ArtifactWait for an artifact that is held
        but cannot be given (an archive that does not unpack safely)."""
        assert self.store is not None and self.news is not None
        for ref in refs:
            self._wants[ref.digest] = self._wants.get(ref.digest, 0) + 1
        try:
            self.news.notify()
            listener = self.news.listener()
            while True:
                missing = [r for r in refs if not self.store.holds(r.digest)]
                if not missing:
                    break
                on_reason(self._reason(missing))
                await listener.wait(PROGRESS_PERIOD)
            paths = {}
            for ref in refs:
                self.store.touch(ref.digest)
                if ref.unpack:
                    try:
                        paths[ref.name] = str(await trio.to_thread.run_sync(self.store.unpacked, ref.digest))
                    except StoreError as e:
                        raise ArtifactWait(f"artifact {ref.name}: {e}") from None
                else:
                    paths[ref.name] = str(self.store.blob(ref.digest))
            return paths
        finally:
            for ref in refs:
                left = self._wants.get(ref.digest, 0) - 1
                if left > 0:
                    self._wants[ref.digest] = left
                else:
                    self._wants.pop(ref.digest, None)

    def _reason(self, missing: list[ArtifactRef]) -> str:
        parts = []
        for ref in missing:
            fetch = self._fetching.get(ref.digest)
            if fetch is not None and fetch.core is not None and not fetch.reason:
                parts.append(f"fetching {ref.name} {int(fetch.core.progress * 100)} %")
            elif fetch is not None and fetch.reason:
                parts.append(f"fetching {ref.name}: {fetch.reason}")
            else:
                parts.append(f"waiting for artifact {ref.name}: "
                             f"{self._waiting.get(ref.digest, 'looking for a member that holds it')}")
        return "; ".join(parts)

    # --- the plan ------------------------------------------------------------------------

    async def _plan_loop(self, nursery: trio.Nursery) -> None:
        assert self.store is not None and self.news is not None and self.ctx.identity is not None
        listener = self.news.listener()
        while True:
            state = self.ctx.snapshot()
            if self.ctx.raft is not None and not self.ctx.recovering:
                try:
                    await self._plan_once(state, nursery)
                except OSError as e:  # the data dir's disk: looked at again at the next pass
                    log.warning("artifact store unreadable", extra={"reason": e.strerror or str(e)})
            await listener.wait_slot(PLAN_PERIOD)

    async def _plan_once(self, state, nursery: trio.Nursery) -> None:
        assert self.store is not None and self.ctx.identity is not None
        held = self.store.held_unchanged()  # a listing, on a thread, only when the store changed
        if held is None:
            held = await trio.to_thread.run_sync(self.store.held)
        document = self.ctx.mesh.document if self.ctx.mesh is not None else None
        holdings = document.records(ArtifactHolding) if document is not None else []
        decision = planmod.decide(state, self.ctx.identity.node_id, held, frozenset(self._wants), holdings)
        self._waiting = dict(decision.waiting)
        for digest in decision.drop:
            await trio.to_thread.run_sync(self.store.remove, digest)
            log.info("artifact removed from this node (the site forgot it)", extra={"digest": digest})
        if decision.report is not None:
            await self._report(decision.report)
        for fetch in decision.fetch:
            if fetch.manifest.digest not in self._fetching and len(self._fetching) < MAX_FETCHES:
                self._fetching[fetch.manifest.digest] = _Fetching(fetch.manifest.digest, fetch.manifest.name,
                                                                  dict(fetch.manifest.document))
                nursery.start_soon(self._fetch, fetch)

    async def _report(self, holdings: tuple[str, ...]) -> None:
        """Tell the site what this node holds: a heartbeat that moves no lease (seq 0)."""
        assert self.ctx.identity is not None and self.ctx.raft is not None
        command = cmds.Heartbeat(node_id=self.ctx.identity.node_id, seq=0, artifacts=holdings)
        try:
            result = await self.ctx.raft.submit(cmds.encode(command, cmds.Envelope(ts=time.time())), timeout=5.0)
            self.ctx.counted(command, result)
        except CommandFailed:
            self.ctx.counted(command, None)  # told again at the next look

    # --- fetching ------------------------------------------------------------------------

    async def _fetch(self, fetch: planmod.Fetch) -> None:
        manifest, entry = fetch.manifest, self._fetching[fetch.manifest.digest]
        assert self.store is not None and self.news is not None
        try:
            await self._fetch_from(manifest, entry, fetch.sources)
        except StoreError as e:
            entry.reason = str(e)
            log.warning("artifact fetch refused", extra={"digest": manifest.digest, "reason": str(e)})
            self.ctx.event("artifact", f"fetching {manifest.name} refused: {e}", digest=manifest.digest)
            await trio.sleep(PLAN_PERIOD * 5)  # a quota that is full stays full for a while
        except OSError as e:  # the data dir's disk (full, failing): the fetch is tried again later
            entry.reason = f"cannot write it here: {e.strerror or e}"
            log.warning("artifact fetch failed", extra={"digest": manifest.digest, "reason": entry.reason})
            await trio.sleep(PLAN_PERIOD * 5)
        finally:
            self._fetching.pop(manifest.digest, None)
            self.news.notify()

    async def _fetch_from(self, manifest: Manifest, entry: _Fetching, sources: tuple[Source, ...]) -> None:
        assert self.store is not None and self.news is not None
        piece_list = await self._piece_list(manifest, sources, entry)
        if piece_list is None:
            return
        digests = pieces.piece_digests(piece_list, manifest)
        have = await trio.to_thread.run_sync(self.store.begin_fetch, manifest, piece_list, digests)
        start = int.from_bytes(hashlib.sha256(f"{manifest.digest}/{self.ctx.identity.node_id}".encode()).digest()[:4],
                               "big")
        core = entry.core = PieceFetch(manifest, digests, have, start=start)
        for source in sources:
            core.add_peer(source.node_id)
        started, before = time.monotonic(), core.fetched_bytes
        async with trio.open_nursery() as nursery:
            for source in sources:
                nursery.start_soon(self._fetch_peer, manifest, core, source, entry)
        if not core.done:
            entry.reason = core.stuck(trio.current_time()) or "the holders went away"
            log.warning("artifact fetch did not complete", extra={"digest": manifest.digest, "reason": entry.reason})
            return
        await trio.to_thread.run_sync(self.store.finish_fetch, manifest)
        took = time.monotonic() - started
        log.info("artifact fetched", extra={"digest": manifest.digest, "artifact": manifest.name,
                                            "bytes": core.fetched_bytes - before, "seconds": round(took, 3),
                                            "peers": len(sources), "from_site": sources[0].site or None})
        self.ctx.event("artifact", f"fetched {manifest.name} ({manifest.size} bytes) in {took:.1f} s",
                       digest=manifest.digest)

    async def _piece_list(self, manifest: Manifest, sources: tuple[Source, ...], entry: _Fetching) -> bytes | None:
        """The piece list from the first holder whose list matches the manifest."""
        for node in sources:
            try:
                conn = await PieceConnection.open(node.address, self._client_context(), manifest.digest,
                                                  max_body=pieces.DIGEST_BYTES * manifest.piece_count,
                                                  expect=self._expect(node))
                try:
                    await conn.ask_list()
                    answer = await conn.answer()
                finally:
                    await conn.aclose()
                if isinstance(answer, W.PieceList):
                    pieces.piece_digests(answer.data, manifest)  # checked here: a liar's list is skipped
                    return answer.data
                entry.reason = f"{node.name}: {answer.reason if isinstance(answer, W.Refusal) else 'no list'}"
            except (OSError, peer.PeerError, trio.TooSlowError, W.PieceWireError, pieces.PieceError) as e:
                entry.reason = f"{node.name}: {e or type(e).__name__}"
                log.info("no piece list from a holder", extra={"node": node.name, "reason": entry.reason})
        return None

    def _client_context(self):
        return self.ctx.tls.client_context(verify_server=True)

    def _expect(self, source: Source) -> Callable[[dict | None], bool]:
        """The server's certificate must name the member we meant (of another site: one this
        node may connect to, neither revoked nor unknown)."""
        if not source.site:
            return self.ctx.cert_names(source.node_id)
        return lambda cert: self.ctx.sync_member(cert) == (source.site, source.node_id)

    async def _fetch_peer(self, manifest: Manifest, core: PieceFetch, node: Source, entry: _Fetching) -> None:
        """Fetch pieces from one holder for as long as it has some to give."""
        assert self.store is not None and self.news is not None
        node_id = node.node_id
        listener = self.news.listener()
        while not core.done:
            now = trio.current_time()
            state = core.peers.get(node_id)
            if state is None or state.banned or state.failures >= pieces.MAX_FAILURES:
                return
            if now < state.retry_at:
                await trio.sleep(state.retry_at - now)
                continue
            asked: list[int] = []
            try:
                conn = await PieceConnection.open(node.address, self._client_context(), manifest.digest,
                                                  max_body=manifest.piece_size, expect=self._expect(node))
            except (OSError, peer.PeerError, trio.TooSlowError) as e:
                core.failed(node_id, None, str(e), trio.current_time())
                continue
            core.add_peer(node_id, have=conn.have)  # a member still fetching it: what it has by now
            try:
                while not core.done:
                    while len(asked) < MAX_IN_FLIGHT_PER_PEER:
                        index = core.next_piece(node_id, trio.current_time())
                        if index is None:
                            break
                        await conn.ask_piece(index)
                        asked.append(index)
                    if not asked:
                        if conn.have is not None and len(conn.have) < core.count:
                            break  # a member still fetching it: ask again what it has by now
                        if core.stuck(trio.current_time()) or node_id not in core.peers:
                            return
                        await listener.wait(PROGRESS_PERIOD)  # others hold the rest in flight
                        continue
                    answer = await conn.answer()
                    index = asked.pop(0)
                    if isinstance(answer, W.Refusal):
                        core.failed(node_id, index, answer.reason, trio.current_time())
                        break
                    if not isinstance(answer, W.Piece) or answer.index != index:
                        outcome = core.received(node_id, index, b"")  # out of turn: a lying peer
                    else:
                        outcome = core.received(node_id, index, answer.data)
                    if isinstance(outcome, pieces.Accepted):
                        await trio.to_thread.run_sync(self.store.write_piece, manifest.digest, outcome.offset,
                                                      answer.data)
                        self.counts["fetched_bytes"] += len(answer.data)
                    elif isinstance(outcome, pieces.Rejected):
                        self.counts["rejected_pieces"] += 1
                        log.warning("a peer sent a bad artifact piece; it is not asked again for this fetch",
                                    extra={"node": node.name, "digest": manifest.digest, "reason": outcome.reason})
                        self.ctx.event("artifact", f"{node.name} sent a bad piece of {manifest.name}: "
                                                   f"{outcome.reason}", node=node.name, digest=manifest.digest)
                        return
                    self.news.notify()
            except (OSError, peer.PeerError, trio.TooSlowError, trio.BrokenResourceError, W.PieceWireError) as e:
                for index in asked:
                    core.failed(node_id, index, str(e), trio.current_time())
                if not asked:
                    core.failed(node_id, None, str(e) or type(e).__name__, trio.current_time())
            finally:
                with trio.CancelScope(shield=True):
                    await conn.aclose()
            if conn.have is not None and not core.done:
                await trio.sleep(PARTIAL_REFRESH)

    # --- serving -------------------------------------------------------------------------

    async def serve(self, conn: peer.FramedStream, stream: trio.abc.Stream, hello: dict) -> None:
        assert self.store is not None
        await serve_pieces(conn, stream, hello, self.store, self.limit, self.counts, self._in_progress)

    def _in_progress(self, digest: str) -> tuple[dict, frozenset[int]] | None:
        """A fetch going on here: its manifest and the pieces it verified (others fetch them)."""
        entry = self._fetching.get(digest)
        if entry is None or entry.core is None:
            return None
        return entry.manifest, frozenset(entry.core.have)

    # --- pushing -------------------------------------------------------------------------

    async def push(self, fd: int, name: str, actor: str, progress: Callable[[int, int], None],
                   manifest_document: dict | None = None) -> tuple[Manifest, cmds.AddArtifact]:
        """Store the open file `fd` and sign its manifest; the AddArtifact to commit. A given
        `manifest_document` (signed offline with a release key) must describe these bytes."""
        assert self.store is not None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise StoreError("not a regular file")
        token = trio.lowlevel.current_trio_token()

        def report(done: int, total: int) -> None:
            try:
                token.run_sync_soon(progress, done, total)
            except trio.RunFinishedError:
                pass
        got = await trio.to_thread.run_sync(self.store.ingest, fd, report)
        state = self.ctx.snapshot()
        if manifest_document is None:
            document = await self._sign(dict(mesh=state.mesh_id, digest=got.digest, size=got.size, name=name,
                                             pieces=pieces_digest(got.piece_list), pushed_by=actor,
                                             pushed_at=time.time()))
        else:
            document = manifest_document
        try:
            manifest = open_manifest(document, mesh=state.mesh_id, trusted=catalog.trusted_keys(state),
                                     digest=got.digest)
            if manifest.size != got.size or manifest.pieces != pieces_digest(got.piece_list):
                raise ManifestError("the manifest's size or piece list is not the file's")
        except ManifestError as e:
            if not self.store.holds(got.digest):  # bytes no manifest vouches for are not kept
                await trio.to_thread.run_sync(self.store.remove, got.digest)
            raise StoreError(str(e)) from None
        self.store.put_manifest(manifest)
        if self.news is not None:
            self.news.notify()
        return manifest, cmds.AddArtifact(manifest=dict(manifest.document), actor=actor)

    async def _sign(self, fields: dict) -> dict:
        """A manifest signed by the mesh root: here on a voter, else by the site's leader."""
        root_key = self.ctx.root_signing_key()
        if root_key is not None:
            return sign_manifest(root_key, **fields)
        state = self.ctx.snapshot()
        leader = next((n for n in state.nodes.values() if n.address == self.ctx.leader_peer_address(state)), None)
        if leader is None:
            raise StoreError("no leader to sign the manifest (a voter holds the mesh root key); try again")
        try:
            with trio.fail_after(SIGN_TIMEOUT):
                answer = await self.ctx.call_member(leader, {"call": "sign_artifact", "fields": fields})
        except (OSError, peer.PeerError, trio.TooSlowError) as e:
            raise StoreError(f"the leader {leader.name} did not sign the manifest: {e or type(e).__name__}") from None
        document = answer.get("manifest") if isinstance(answer, dict) else None
        if not isinstance(document, dict):
            raise StoreError(f"the leader {leader.name} did not sign the manifest")
        return document

    def sign_for_member(self, fields: object) -> dict:
        """A voter signs a member's manifest (the `sign_artifact` member call): the member
        hashed the bytes; every node that fetches them checks them against it."""
        root_key = self.ctx.root_signing_key()
        if root_key is None:
            raise peer.PeerError("this node is not a voter: it holds no mesh root key")
        if not isinstance(fields, dict) or set(fields) != {"mesh", "digest", "size", "name", "pieces", "pushed_by",
                                                           "pushed_at"}:
            raise peer.PeerError("sign_artifact needs mesh, digest, size, name, pieces, pushed_by, pushed_at")
        if fields["mesh"] != self.ctx.snapshot().mesh_id:
            raise peer.PeerError("sign_artifact: a manifest for another mesh")
        try:
            return sign_manifest(root_key, **fields)
        except (ManifestError, TypeError) as e:
            raise peer.PeerError(f"sign_artifact: {e}") from None
