"""The node's replica of the mesh document, and its sync with the rest of the mesh.

Every member keeps a durable replica (meshd.io.crdtstore under `<data-dir>/mesh`) and sync
sessions (meshd.io.docsync) on the peer port (meshd.io.peer, `sync_hello`, mutual TLS):
- a follower keeps one session with its site's leader;
- the leader keeps one session with each other site it knows of (from the sites' summaries in
  the document, leader's address first), unless that site already talks to it;
- every node keeps a session with each static `--peer` (how a site first reaches the mesh).
Sessions that end are redialled with backoff (DIAL_BACKOFF_FIRST doubling to DIAL_BACKOFF_MAX,
DIAL_BACKOFF_SLOW once a link has been down for DIAL_FAST_FOR).
Updates travel on by store and forward: what a leader hears from another site reaches its
followers, and the other way round.

While this node leads its site it also closes the gap between the document and the site's
Raft state (the decisions are meshd.meshstate's): it takes in every app edit the document
decided and the site has not (a deploy or stop through Raft, so placement follows), and it
publishes the site's own edits, audit records, summary, members and per-app progress. Trust
travels the same way: revocations made in other sites join the site's list, and a policy
bundle that outranks the site's replaces it (each verified with the mesh root first).

The replica is compacted (crdt.compaction: history, and audit records and superseded or
losing app edits older than `--document-retention`, dropped) by the leader of each site when
it is due, into a new epoch; every other replica takes that epoch through its sessions
(a full state transfer, then deltas again: crdt.sync, meshd.io.docsync).

Invariants:
- The document is only touched on the trio thread; disk work runs on a worker thread, and an
  update is on disk before it is acknowledged or passed on (docsync).
- A peer that is not a member of this mesh, or is revoked, gets no session (the TLS
  certificate decides, meshd.io.context.NodeContext.sync_member).
- Nothing here stops a workload because another site is unreachable: a site only ever acts on
  edits, never on silence.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from typing import TYPE_CHECKING, Any

import trio

from attestation.policy import open_policy
from attestation.policy import rank as policy_rank
from attestation.revocation import open_revocations, sign_revocation, sign_revocations
from attestation.signed import AttestationError
from crdt.document import MeshDocument
from crdt.schema import (AppEdit, AppSiteStatus, ArtifactHolding, DroppedAudit, NodeSummary, Record, RolloutControl, SchemaError,
                         SignedRecord, SiteSummary)
from crdt.schema import AuditRecord as DocAuditRecord
from crdt.sync import SyncSession
from meshd import meshstate, waves
from meshd.artifacts import sites as artifact_sites
from meshd.commands import AddArtifact, AdoptPolicy, AdoptRevocations, Ok, Refused, SubmitApp
from meshd.fleethealth import HealthWindow
from meshd.node import trust
from meshd.node.meshing import Meshing, TakeIn, readers
from meshd.io import peer
from meshd.io.crdtstore import DocumentStore
from meshd.io.logthrottle import throttle
from meshd.io.diskspace import DiskFull
from meshd.io.docsync import DocumentHub
from meshd.io.raft import CommandFailed
from meshd.io.wakeup import sleep_slot
from meshd.state import ADMIN_LEFT, ADMIN_REVOKED
from meshd.wire import FrameError

if TYPE_CHECKING:
    from meshd.io.context import NodeContext

# Throttled: a full disk, or a peer that keeps reconnecting, would otherwise cost a line a pass.
log = throttle(logging.getLogger("meshd.mesh"))

# Redial: quickly at first (a blip), then every DIAL_BACKOFF_MAX at most while the link has
# been down for less than DIAL_FAST_FOR (most cuts are short, and converging after one waits
# about this long for the session: ~4 TCP SYNs a second, ~240 B/s), then every
# DIAL_BACKOFF_SLOW (a link down for days costs a SYN every two seconds). Jittered: sites do
# not redial in step.
DIAL_BACKOFF_FIRST = 0.1
DIAL_BACKOFF_MAX = 0.25
DIAL_FAST_FOR = 600.0
DIAL_BACKOFF_SLOW = 2.0
# A session that lasted this long was a working link: the next dial starts from the first backoff.
STABLE_SESSION = 10.0
# Which sessions to keep is looked at on every change of role or document, and this often anyway
# (a safety net: each look wakes the idle loop).
DIAL_CHECK_PERIOD = 5.0
# A peer's site that is synced through another route is looked at again this often: when that
# route goes, this session takes over within it.
ROUTE_CHECK_PERIOD = 1.0
# The leader looks for edits to take in and records to publish on every change, and this often anyway.
PUBLISH_SAFETY_PERIOD = 5.0
# Records parsed between two looks at other work: a 10,000-change catch-up is 20,000 records
# (about 0.3 s of parsing); in slices of this many, the admin socket, heartbeats and sessions
# wait a few milliseconds at most.
PARSE_SLICE = 500
# App edits taken in per Raft round (committed concurrently): enough to fill a round trip,
# few enough that a site that loses quorum half-way has not queued thousands of commands.
TAKE_IN_IN_FLIGHT = 64
# Records per document write when publishing a backlog (audit after a long cut): one fsync
# each, and updates small enough to pass on without delaying other sessions.
PUBLISH_BATCH = 500
# A site heard from (a sync message, or its summary refreshed) within this many sync intervals
# counts as reachable; its leader refreshes the summary once per interval.
REACHABLE_INTERVALS = 3
# A new session waits this long before it asks for anything: two ends that dialed each other
# at once (after a cut both do) see both sessions start within a round trip, and the one they
# end must not have carried a catch-up already. Longer than a round trip between sites, short
# next to the time a catch-up takes.
SESSION_SETTLE = 0.1
# How long one dial may take (TCP + TLS + hello) before the next address is tried.
DIAL_TIMEOUT = 5.0


async def wait_any(listeners: list, timeout: float, *, slot: bool = False) -> None:
    """Return when any Wakeup listener is notified, or after `timeout` (with `slot`: at the
    next slot of that period, meshd.io.wakeup.next_slot)."""
    deadline = trio.current_time() + timeout
    async with trio.open_nursery() as nursery:
        async def one(listener) -> None:
            if slot:
                await listener.wait_slot(timeout)
            else:
                await listener.wait_until(deadline)
            nursery.cancel_scope.cancel()
        for listener in listeners:
            nursery.start_soon(one, listener)


class _Link:
    """One live session: the site of its peer, which link it serves, who dialed it (site, node
    id), when it started here (serial), the session itself and how to end it."""

    def __init__(self, site: str, key: str, dialer: tuple[str, str], serial: int, session: SyncSession,
                 scope: trio.CancelScope) -> None:
        self.site, self.key, self.dialer, self.serial = site, key, dialer, serial
        self.session, self.scope = session, scope

    def rank(self) -> tuple:
        """Which of two sessions of one link both ends keep: the one dialed by the smaller
        end (both ends agree on that, whatever order they saw them start in), else the older."""
        return (self.dialer, self.serial)


class MeshSync:
    def __init__(self, ctx: "NodeContext") -> None:
        self.ctx = ctx
        self.store: DocumentStore | None = None
        self.hub: DocumentHub | None = None
        self.changed: Any = None  # Wakeup: the document changed (remote update or local write)
        self.heard: dict[str, float] = {}  # site -> trio time of its last news
        self._summary_ts: dict[str, float] = {}
        self._bad_manifests: set[str] = set()  # digests whose published manifest the catalog refused
        self._bad_records: set[str] = set()  # signed records that do not verify (reported once)
        # What to take in from the document and publish to it for apps (meshd.node.meshing)
        self.meshing = Meshing()
        self.health = HealthWindow()  # members' resource samples, for their published health figures
        self._health_written: dict[str, float] = {}  # node id -> trio time its summary was last written
        self._links: list[_Link] = []  # live sessions (one per link is kept)
        self._link_serial = 0
        self.address_sites: dict[str, str] = {}  # static peer address -> its site, once dialled
        # site -> (bytes sent on the wire, update bytes before compression) by ended sessions
        self._ended_sent: dict[str, tuple[int, int]] = {}
        self._ended_received: dict[str, int] = {}  # bytes on the wire, per site, of ended sessions

    # --- the replica -----------------------------------------------------------------------

    @property
    def document(self) -> MeshDocument | None:
        """The replica's document: the hub's, which a compaction or an adoption replaces."""
        return self.hub.document if self.hub is not None else None

    def open(self) -> None:
        """Load the replica from disk (at start, before any task runs)."""
        from meshd.io.wakeup import Wakeup
        self.changed = Wakeup()
        self.store = DocumentStore(self.ctx.data_dir / "mesh")
        # A fresh client id per start: pycrdt must never see one writer's clock reused.
        document = self.store.open(MeshDocument(client_id=secrets.randbits(52)))
        self.hub = DocumentHub(document, self.store, retention=self.ctx.config.document_retention)
        self.hub.on_remote_update = self._remote_update
        self.hub.on_epoch_change = self._epoch_changed
        log.info("mesh document loaded", extra={"replayed": self.store.replayed, "epoch": str(document.epoch),
                                                "apps": len(document.apps())})

    def _epoch_changed(self) -> None:
        """The document was compacted or another replica's epoch adopted (docsync)."""
        change = self.hub.last_change if self.hub is not None else None
        if change:
            self.ctx.event("sync", f"mesh document {change['what']} into epoch {change['epoch']} "
                                   f"({change.get('dropped_audit', 0)} audit records and "
                                   f"{change.get('dropped_edits', 0)} app edits dropped, "
                                   f"{change.get('forgotten_apps', 0)} stopped apps forgotten)",
                           epoch=change["epoch"])
        self.changed.notify()

    async def compaction_loop(self) -> None:
        """Compact the replica when it is due, while this node leads its site (followers and
        other sites take its epoch through their sessions; docsync.DocumentHub.compaction_loop)."""
        assert self.hub is not None
        d = self.ctx
        await self.hub.compaction_loop(lambda: d.raft is not None and d.raft.status.role == "leader")

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    async def write(self, records: list[Record]) -> None:
        """Durably write local records and pass them on; raises SchemaError (nothing written)."""
        assert self.hub is not None
        await self.hub.write(records)
        self.changed.notify()

    def _remote_update(self, session: SyncSession) -> None:
        assert self.document is not None
        now = trio.current_time()
        site = self.site_of(session)
        if site:
            self.heard[site] = now
        for summary in self.document.records(SiteSummary):
            if self._summary_ts.get(summary.site) != summary.ts:
                if summary.site in self._summary_ts:  # refreshed since we looked: that site is alive
                    self.heard[summary.site] = now
                self._summary_ts[summary.site] = summary.ts
        self.changed.notify()

    # --- sessions --------------------------------------------------------------------------

    async def serve(self, conn: peer.FramedStream, stream: trio.abc.Stream, named: tuple[str, str]) -> None:
        """The peer port's side of a `sync_hello` (meshd.io.peer)."""
        d = self.ctx
        await conn.send({"type": "sync_ready", "site": d.membership.site, "node": d.config.name})
        await self._run(stream, named, initial=conn.take_buffered(), dialed=False)

    async def _dial(self, address: str) -> float:
        """One sync session with the member at `address`; returns how long it lasted."""
        d = self.ctx
        with trio.fail_after(DIAL_TIMEOUT):
            conn = await peer.open_peer(address, d.tls.client_context(),
                                        expect=lambda cert: d.sync_member(cert) is not None)
        try:
            named = d.sync_member(conn.stream.getpeercert())
            if named is None:  # revoked since open_peer checked it
                raise peer.PeerError("the peer may no longer sync with this mesh")
            if named[0] != d.membership.site and named[0] in self.connected_sites():
                # that site reached us while this dial hung (a SYN lost in the cut is resent
                # seconds later): one session per site, and the one running is mid-catch-up
                return 0.0
            with trio.fail_after(DIAL_TIMEOUT):
                await conn.send({"type": "sync_hello", "site": d.membership.site, "node": d.config.name})
                answer = await conn.receive()
            if answer.get("type") != "sync_ready":
                raise peer.PeerError(str(answer.get("error") or "the peer did not accept a sync session"))
            started = trio.current_time()
            self.address_sites[address] = named[0]
            await self._run(conn.stream, named, initial=conn.take_buffered(), dialed=True)
            return trio.current_time() - started
        finally:
            await conn.aclose()

    async def _run(self, stream: trio.abc.Stream, named: tuple[str, str], initial: bytes, dialed: bool) -> None:
        assert self.hub is not None
        site, node_id = named
        own_site = self.ctx.membership.site
        # One session per other site, one per member of our own: two leaders that dial each
        # other at once (or a static --peer next to a learnt route) would carry every change
        # twice. Both ends keep the same one (_Link.rank), and a session that loses is ended
        # as it starts, before it sends anything: the catch-up crosses the link once.
        link_key = site if site != own_site else f"{site}/{node_id}"
        dialer = (own_site, self.ctx.identity.node_id) if dialed else (site, node_id)
        serial = self._link_serial
        self._link_serial += 1
        scope = trio.CancelScope()
        links: list[_Link] = []

        def started(session: SyncSession) -> None:
            first = site not in self.connected_sites()
            link = _Link(site, link_key, dialer, serial, session, scope)
            links.append(link)
            self._links.append(link)
            same = sorted((other for other in self._links if other.key == link_key), key=_Link.rank)
            for extra in same[1:]:
                log.debug("a second session of one link ended", extra={"site": extra.site, "link": extra.key})
                extra.scope.cancel()
            if first and site != own_site:
                self.ctx.event("sync", f"sync with site {site} up", site=site, peer=node_id)

        try:
            with scope:
                await self.hub.run_session(stream, f"{site}/{node_id[:12]}",
                                           resync_interval=self.ctx.config.sync_interval, initial=initial,
                                           on_start=started, settle=SESSION_SETTLE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            for link in links:
                self._links.remove(link)
                session = link.session
                wire, payload = self._ended_sent.get(site, (0, 0))
                self._ended_sent[site] = (wire + session.bytes_out, payload + session.payload_out)
                self._ended_received[site] = self._ended_received.get(site, 0) + session.bytes_in
                if session.last_sync is not None:
                    self.heard[site] = max(self.heard.get(site, -math.inf), session.last_sync)
                if site not in self.connected_sites() and site != own_site:
                    self.ctx.event("sync", f"sync with site {site} down", site=site, peer=node_id)

    def connected_sites(self) -> set[str]:
        return {link.site for link in self._links}

    def site_of(self, session: SyncSession) -> str | None:
        """The site of the peer at the other end of a live session."""
        return next((link.site for link in self._links if link.session is session), None)

    def _targets(self) -> dict[str, list[str]]:
        """The sessions this node should keep: key -> addresses to try, in order."""
        d = self.ctx
        assert self.document is not None
        own_address = f"{d.advertise_ip}:{d.peer_port}"
        wanted: dict[str, list[str]] = {f"peer:{p}": [p] for p in d.config.peers if p != own_address}
        raft = d.raft.status if d.raft else None
        if raft is None:
            return wanted
        own_site = d.membership.site
        if raft.role == "leader":
            connected = self.connected_sites()
            for summary in self.document.records(SiteSummary):
                if summary.site != own_site and summary.addresses and summary.site not in connected:
                    wanted[f"site:{summary.site}"] = list(summary.addresses)
        else:
            leader = d.leader_name
            state = d.snapshot()
            for node in state.nodes.values():
                if node.name == leader and node.node_id != d.identity.node_id \
                        and node.admin not in (ADMIN_LEFT, ADMIN_REVOKED):
                    wanted[f"leader:{node.node_id}"] = [node.address]
        return wanted

    async def dial_loop(self) -> None:
        """Keep the sessions `_targets` names; redial with backoff."""
        d = self.ctx
        running: dict[str, trio.CancelScope] = {}
        changes = [d.state_changed.listener(), self.changed.listener()]
        async with trio.open_nursery() as nursery:
            while True:
                wanted = self._targets()
                for key in list(running):
                    if key not in wanted and not key.startswith("site:"):
                        running.pop(key).cancel()
                for key, addresses in wanted.items():
                    if key not in running or running[key].cancel_called:
                        running[key] = await nursery.start(self._keep_session, key, addresses)
                await wait_any(changes, DIAL_CHECK_PERIOD, slot=True)

    async def _keep_session(self, key: str, addresses: list[str], task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            backoff = DIAL_BACKOFF_FIRST
            down_since = trio.current_time()
            while True:
                if key.startswith("site:"):
                    site = key[5:]
                    if site in self.connected_sites():
                        break  # that site reached us (or another route did): nothing to keep
                    addresses = self._targets().get(key, addresses)
                elif key.startswith("peer:") and self.address_sites.get(addresses[0]) in self.connected_sites() - {
                        self.ctx.membership.site}:
                    await sleep_slot(ROUTE_CHECK_PERIOD)  # that site is synced through another route
                    continue
                for address in addresses:
                    try:
                        lasted = await self._dial(address)
                    except (OSError, peer.PeerError, trio.TooSlowError, trio.BrokenResourceError,
                            trio.ClosedResourceError, FrameError) as e:  # the peer refused, vanished or babbled
                        log.debug("sync dial failed", extra={"peer": address, "reason": str(e) or type(e).__name__})
                        continue
                    if lasted >= STABLE_SESSION:
                        backoff, down_since = DIAL_BACKOFF_FIRST, trio.current_time()
                    break
                await trio.sleep(backoff * (0.5 + secrets.randbelow(1000) / 1000))
                cap = DIAL_BACKOFF_MAX if trio.current_time() - down_since < DIAL_FAST_FOR else DIAL_BACKOFF_SLOW
                backoff = min(backoff * 2, cap)
            scope.cancel()

    # --- leader: document <-> site --------------------------------------------------------

    async def leader_loop(self) -> None:
        d = self.ctx
        changes = [d.state_changed.listener(), self.changed.listener()]
        while True:
            # A rollout's next wave opens when a soak ends: a pass is due then, news or not.
            wait, slot = PUBLISH_SAFETY_PERIOD, True
            if self.meshing.rollout_wake is not None:
                wake = max(0.05, self.meshing.rollout_wake - time.time() + 0.05)
                if wake < wait:
                    wait, slot = wake, False
            await wait_any(changes, wait, slot=slot)
            if d.raft is None or d.raft.status.role != "leader":
                continue
            try:
                await self._take_in()
                await self._publish()
                await self._purge()
            except CommandFailed as e:
                log.info("mesh duty interrupted", extra={"reason": str(e)})
                await trio.sleep(0.1)

    @staticmethod
    def _site_trust(state, opener, document):
        """(the site's root-signed document opened, the root public key), or None: no trust
        root yet, or a document that does not verify (nothing to merge with)."""
        if not state.trust_root or not document:
            return None
        root = bytes.fromhex(state.trust_root)
        try:
            return opener(document, root), root
        except (AttestationError, ValueError) as e:
            log.error("the site's trust document does not verify", extra={"reason": str(e)})
            return None

    def _report_refused(self, refused) -> None:
        for key, reason in refused:
            if key not in self._bad_records:
                self._bad_records.add(key)
                self.ctx.event("sync", f"{key} refused: {reason}", record=key)

    async def _take_in_trust(self, state) -> None:
        """Revocations and the policy made in other sites (the document's signed records read once)."""
        assert self.document is not None
        records = self.document.records(SignedRecord)
        await self._take_in_revocations(state, records)
        await self._take_in_policy(state, records)

    async def _take_in_policy(self, state, records: list[SignedRecord]) -> None:
        """A policy bundle made in another site that outranks the site's (a Raft commit)."""
        d = self.ctx
        opened = self._site_trust(state, open_policy, state.policy)
        if opened is None:
            return
        current, root = opened
        found = meshstate.policies_in_document(records, root, d.membership.mesh_id)
        self._report_refused(found.refused)
        best = meshstate.policy_to_take_in(policy_rank(state.policy, current), found)
        if best is None:
            return
        result = await d.commit(AdoptPolicy(policy=best.signed, site=best.site, actor=f"site {best.site}"))
        if isinstance(result, Refused):
            log.info("policy from another site not taken in", extra={"reason": result.text})

    async def _take_in_revocations(self, state, records: list[SignedRecord]) -> None:
        """Revocations made in other sites join the site's list (a Raft commit); our members
        they name are expelled, and cut off like after a local revoke."""
        d = self.ctx
        opened = self._site_trust(state, open_revocations, state.revocations)
        if opened is None:
            return
        listed, root = opened
        incoming = meshstate.revocations_to_take_in(listed, records, root, d.membership.mesh_id)
        self._report_refused(incoming.refused)
        root_key = d.root_signing_key()
        if not incoming.entries or root_key is None:
            return
        signed = sign_revocations(root_key, listed.with_entries(list(incoming.entries)))
        result = await d.commit(AdoptRevocations(revocations=signed, sites=tuple(incoming.sites),
                                                 actor=f"site {', '.join(incoming.sites)}"))
        await d.execute(trust.after_adoption(state, result, signed, d.identity.node_id, d.config.name))

    def _revocations_to_publish(self, state) -> list[Record]:
        """The site's revocations the document lacks, each signed on its own by the root."""
        d = self.ctx
        document = self.document
        assert document is not None and d.membership is not None
        opened = self._site_trust(state, open_revocations, state.revocations)
        root_key = d.root_signing_key()
        if opened is None or root_key is None:
            return []
        listed, _ = opened
        missing = meshstate.revocations_to_publish(listed, lambda key: document.get(SignedRecord, key) is not None)
        now = time.time()
        return [meshstate.revocation_record(sign_revocation(root_key, d.membership.mesh_id, entry), listed.number,
                                            state.site, now) for entry in missing]

    async def _take_in(self) -> None:
        d = self.ctx
        assert self.document is not None
        while self.document.parse_pending(PARSE_SLICE):  # a catch-up's records, a slice at a time
            await trio.sleep(0)
        state = d.snapshot()  # one view for the pass: what it commits shows in the next one
        now = time.time()
        await self._take_in_trust(state)
        await self._take_in_manifests(state)
        commands, told = self.meshing.take_in(state, self.document, now)
        for emit in told:
            d.event(emit.kind, emit.message, **emit.data)
        failed: list[CommandFailed] = []

        async def take_in(item: TakeIn) -> None:
            try:
                result = await d.commit(item.command)
            except CommandFailed as e:
                failed.append(e)
                return
            if isinstance(result, Refused) and item.edit is None:  # a rollout move raced another change
                log.info("rollout move not taken", extra={"reason": result.text})
            for emit in self.meshing.taken(item, result):
                d.event(emit.kind, emit.message, **emit.data)

        # Edits of different apps are independent: many in flight at once (Raft keeps their
        # order) instead of one round trip each, so a catch-up of thousands is seconds less.
        for start in range(0, len(commands), TAKE_IN_IN_FLIGHT):
            async with trio.open_nursery() as nursery:
                for item in commands[start:start + TAKE_IN_IN_FLIGHT]:
                    nursery.start_soon(take_in, item)
            if failed:
                raise failed[0]

    async def _take_in_manifests(self, state) -> None:
        """Manifests of artifacts this site's apps pin, published by the sites that hold them;
        the catalog checks each (a refused one is told once)."""
        assert self.document is not None
        for manifest in artifact_sites.manifests_to_take_in(state, self.document.records(ArtifactHolding)):
            digest = str(manifest.get("body", {}).get("digest", ""))
            if digest in self._bad_manifests:
                continue
            result = await self.ctx.commit(AddArtifact(manifest=manifest, actor=f"sync@{self.ctx.config.name}"))
            if isinstance(result, Refused):
                self._bad_manifests.add(digest)
                self.ctx.event("artifact", f"manifest of {digest[:19]}... from the mesh document refused: "
                                           f"{result.text}", digest=digest)

    def rollout(self, app: str) -> tuple[AppEdit, waves.RolloutView] | None:
        """The app's current edit and its rollout across sites as this replica shows it, when
        that edit has an `[app.rollout]`; else None."""
        document = self.document
        resolution = document.app(app) if document is not None else None
        if resolution is None or resolution.winner.stopped:
            return None
        winner = resolution.winner
        plan = self.meshing.plans.plan(winner.edit_id, winner.spec, winner.stopped)
        if plan is None:
            return None
        return winner, meshstate.rollout_view(winner, plan, self._status_of, self._controls_of, time.time())

    def hold_for_wave(self, command: SubmitApp) -> SubmitApp:
        """A deploy made here, held when its rollout does not start with this site."""
        return meshstate.hold_for_wave(self.ctx.snapshot(), command, self._status_of, self._controls_of, time.time())

    def controls(self, edit: AppEdit) -> list[RolloutControl]:
        """Every pause, resume and cancel of the edit's rollout the replica holds."""
        return [c for site in edit.targets for c in self._controls_of(edit.edit_id, site)]

    def _status_of(self, app: str, site: str) -> AppSiteStatus | None:
        assert self.document is not None
        return readers(self.document)[0](app, site)

    def _controls_of(self, edit_id: str, site: str) -> list[RolloutControl]:
        assert self.document is not None
        return readers(self.document)[1](edit_id, site)

    async def _publish(self) -> None:
        d = self.ctx
        document = self.document
        assert document is not None
        state = d.snapshot()
        now = time.time()
        facts = meshstate.SiteFacts(d.config.name, self._addresses(state))
        term = d.raft.status.term if d.raft is not None else None
        records: list[Record] = self.meshing.publish(state, document, facts, term, now, trio.current_time(),
                                                     d.config.sync_interval)
        records += self._revocations_to_publish(state)
        records += artifact_sites.holdings_to_publish(state, lambda key: document.get(ArtifactHolding, key), now)
        if state.policy and document.get(SignedRecord, meshstate.policy_key(state.policy)) is None:
            records.append(meshstate.policy_record(state.policy, state.site, now))
        self.health.observe(state, trio.current_time())
        at = trio.current_time()
        for node in meshstate.node_summaries(state, facts, now, lambda node_id: self.health.health(state, node_id, at)):
            if meshstate.node_summary_due(document.get(NodeSummary, node.key), node,
                                          at - self._health_written.get(node.key, -math.inf)):
                records.append(node)
                self._health_written[node.key] = at
        for start in range(0, len(records), PUBLISH_BATCH):
            try:
                await self.write(records[start:start + PUBLISH_BATCH])
            except SchemaError as e:  # a record this site made is not valid: a bug, but never fatal
                log.error("record not published", extra={"reason": e.reason})
            except DiskFull as e:  # published again at the next pass, once there is room
                log.warning("site records not published", extra={"reason": str(e)})
                break

    async def _purge(self) -> None:
        """Forget the stopped apps whose retention ran out (meshstate.apps_to_purge decides),
        and the site's audit records the document holds once they are older than its retention
        (meshstate.audit_to_trim)."""
        document = self.document
        assert document is not None
        command = meshstate.apps_to_purge(self.ctx.snapshot(), time.time(), self.ctx.config.stopped_app_retention,
                                          lambda edit_id: document.get(AppEdit, edit_id) is not None)
        if command is not None:
            result = await self.ctx.commit(command)
            if isinstance(result, Ok) and result.fields.get("purged"):
                log.info("stopped apps forgotten", extra={"apps": len(result.fields["purged"])})
        state = self.ctx.snapshot()
        summed = document.get(DroppedAudit, state.site)
        trim = meshstate.audit_to_trim(state, time.time(), self.ctx.config.document_retention,
                                       lambda key: document.get(DocAuditRecord, key) is not None,
                                       summed.upto_seq if summed is not None else 0)
        if trim is not None:
            result = await self.ctx.commit(trim)
            if isinstance(result, Refused):
                log.warning("site audit not trimmed", extra={"reason": result.text})
            elif result.fields.get("trimmed"):
                log.info("published site audit forgotten", extra={"records": result.fields["trimmed"]})

    def _addresses(self, state) -> tuple[str, ...]:
        """Peer addresses other sites may dial: this leader first, then ready members."""
        d = self.ctx
        own = f"{d.advertise_ip}:{d.peer_port}"
        others = sorted(n.address for n in state.nodes.values()
                        if n.state == "ready" and n.address != own and n.admin not in (ADMIN_LEFT, ADMIN_REVOKED))
        return tuple([own] + others)[:16]

    # --- views for meshctl ----------------------------------------------------------------

    def sent_by_site(self) -> dict[str, tuple[int, int]]:
        """(bytes on the wire, update bytes before compression) sent to each site since this
        daemon started, ended and live sessions."""
        totals = dict(self._ended_sent)
        for link in self._links:
            wire, payload = totals.get(link.site, (0, 0))
            totals[link.site] = (wire + link.session.bytes_out, payload + link.session.payload_out)
        return totals

    def received_by_site(self) -> dict[str, int]:
        """Bytes on the wire received from each site since this daemon started."""
        totals = dict(self._ended_received)
        for link in self._links:
            totals[link.site] = totals.get(link.site, 0) + link.session.bytes_in
        return totals

    def last_heard(self, site: str) -> float | None:
        """Trio time of the last news from `site` (live sessions count as now-ish)."""
        times = [self.heard[site]] if site in self.heard else []
        times += [link.session.last_sync for link in self._links
                  if link.site == site and link.session.last_sync is not None]
        return max(times) if times else None
