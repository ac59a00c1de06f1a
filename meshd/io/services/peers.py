"""The peer port: joins of other nodes (meshd.node.admitting decides what a member answers),
member calls (re-attestation evidence, revocation notices, secret rotation, certificates,
remote logs), and document sync sessions; and who may keep a connection open
(meshd.node.access), looked at again whenever the site's state changes.

Invariants:
- A member that cannot decide a join (no state of its site yet, no root key, an unknown
  token) answers with a code that sends the joiner elsewhere, never with a verdict.
- A revocation notice is trusted for what it is, not for who brings it: the list must be
  signed by the mesh root and name this node.
- Revoking a member cuts its open calls and sync sessions (each runs in a cancel scope).
- A join refused by a verdict goes into the site's audit (meshd.node.refusals decides what
  and how often), recorded by a task of its own: the joiner's answer never waits on Raft.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import time
from typing import Any, Awaitable, Callable

import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from attestation.revocation import open_revocations
from attestation.signed import AttestationError
from attestation.tpm import TpmError
from meshd import admission, tokens
from meshd.commands import Refused
from meshd.io import peer
from meshd.io.beatlines import BEAT_SILENCE
from meshd.io.context import NodeContext
from meshd.io.logview import serve_local_logs
from meshd.io.raft import CommandFailed
from meshd.io.services.trust import valid_secret
from meshd.node import admitting
from meshd.node import effects as fx
from meshd.node.refusals import Refusals, claimed
from meshd.state import SiteState

log = logging.getLogger("meshd.daemon")

# Cutting connections follows every state change; this often also without one, as a safety net.
CUT_SAFETY_PERIOD = 5.0
# Refused peer connections (a flood) are logged at most this often, with their count.
REFUSED_REPORT_PERIOD = 10.0


def _is_root_key(root_key: str, trust_root: str) -> bool:
    """Whether `root_key` (hex raw Ed25519 private key) is the mesh root `trust_root` names."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    try:
        key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(root_key))
    except ValueError:
        return False
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return bool(trust_root) and public.hex() == trust_root


class PeerService:
    def __init__(self, ctx: NodeContext, *, voter_changes: Callable[[], list[fx.Effect]],
                 switch_secret: Callable[[str, int], Awaitable[bool]],
                 become_voter: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.ctx = ctx
        self.voter_changes = voter_changes  # the leader's: a new voter is added at once
        self.switch_secret = switch_secret  # the trust service's: a rotation handed to us
        self.become_voter = become_voter  # the trust service's: the site made us a voter
        self._member_scopes: dict[tuple[str, str], set[trio.CancelScope]] = {}  # open calls and sessions
        self.refusals = Refusals(actor=ctx.config.name)
        self._to_record: list[fx.Effect] = []  # refusals to commit into the audit, in order
        self._record_wakeup = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        ctx = self.ctx
        listeners = await trio.open_tcp_listeners(ctx.peer_port, host=ctx.listen_ip or None)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._serve, listeners)
            nursery.start_soon(self._cut_loop)
            nursery.start_soon(self._record_refusals_loop)
            task_status.started()

    async def _cut_loop(self) -> None:
        """Whenever the state changes, cut what a node that may no longer connect keeps open."""
        assert self.ctx.state_changed is not None
        changes = self.ctx.state_changed.listener()
        while True:
            await changes.wait_slot(CUT_SAFETY_PERIOD)
            self._cut_revoked(self.ctx.snapshot())

    def _refused(self, target: str, source: str, reason: str) -> None:
        """A join refused with a verdict: into the audit (soon, or with its window's count)."""
        self.ctx.metrics.joins.labels("refused").inc()
        effects = self.refusals.refused(target, source, reason, time.monotonic())
        if effects:
            self._to_record.extend(effects)
            self._record_wakeup.set()

    async def _record_refusals_loop(self) -> None:
        while True:
            due = self.refusals.next_flush()
            with trio.move_on_after(max(0.0, due - time.monotonic()) if due is not None else float("inf")):
                await self._record_wakeup.wait()
            self._record_wakeup = trio.Event()
            effects, self._to_record = self._to_record + self.refusals.flush_due(time.monotonic()), []
            if not effects or self.ctx.raft is None:
                continue
            try:
                await self.ctx.execute(effects)
            except CommandFailed as e:
                # The site has no quorum now; the events and log of this member keep them.
                log.info("refused joins not recorded in the audit", extra={"reason": str(e), "records": len(effects)})

    async def _serve(self, listeners) -> None:
        admission = peer.PeerAdmission()
        reported_at = float("-inf")

        async def handle(stream: trio.SocketStream) -> None:
            nonlocal reported_at
            host = peer.peer_host(stream)
            if not admission.admit(host):  # before the handshake: a flood costs an accept and a close
                await trio.aclose_forcefully(stream)
                if time.monotonic() - reported_at >= REFUSED_REPORT_PERIOD:
                    reported_at = time.monotonic()
                    log.warning("peer connections refused: too many from one host, or in all",
                                extra={"refused": admission.refused, "last_host": host})
                    admission.refused = 0
                return
            try:
                await peer.serve_peer_connection(
                    stream, on_join=self.handle_join, on_member_call=self.handle_member_call,
                    member_secret=lambda: self.ctx.membership.site_secret if self.ctx.membership and self.ctx.raft else None,
                    is_member=self.ctx.is_member, tls=self.ctx.tls.server_context, cert_member=self.ctx.cert_member,
                    track=self._track_member, on_sync=self._serve_sync, sync_member=self.ctx.sync_member,
                    on_beats=self._take_beats, on_pieces=self._serve_pieces)
            finally:
                admission.release(host)

        await trio.serve_listeners(handle, listeners)

    async def handle_join(self, conn: peer.FramedStream, hello: dict, source: str = "?") -> None:
        state = self.ctx.snapshot()
        leader = self.ctx.leader_peer_address(state)
        busy = admitting.cannot_decide(state, self.ctx.membership is not None and self.ctx.raft is not None, leader,
                                       site=hello.get("site"))
        if busy is not None:
            await conn.send(busy.to_wire())
            return
        assert self.ctx.membership is not None and self.ctx.raft is not None
        eph = X25519PrivateKey.generate()
        tpm_challenge = None
        if "tpm" in hello:
            try:
                tpm_challenge = admission.tpm_challenge(hello["tpm"], os.urandom(32), os.urandom(32))
            except TpmError as e:
                self.ctx.event("membership", f"join refused: TPM keys unfit ({e})", reason=str(e))
                self._refused(claimed(hello.get("node")), source, f"attestation: TPM keys unfit: {e}")
                await conn.send(admitting.JoinRefusal(admitting.DENIED, f"attestation: TPM keys unfit: {e}").to_wire())
                return
        challenge = admission.Challenge(
            nonce=os.urandom(32),
            member_eph=eph.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
            issued_at=time.time(), tpm=tpm_challenge)
        message = {"type": "challenge", "nonce": challenge.nonce.hex(), "member_eph": challenge.member_eph.hex()}
        if tpm_challenge is not None:
            message["tpm_credential"] = tpm_challenge.to_wire()
        await conn.send(message)
        msg = await conn.receive()
        if msg.get("type") != "join_request":
            raise peer.PeerError("expected join_request")
        try:
            request = admission.JoinRequest(token_id=str(msg["token_id"]), node=dict(msg["node"]),
                                            joiner_eph=bytes.fromhex(msg["joiner_eph"]), proof=str(msg["proof"]),
                                            signature=str(msg["signature"]), evidence=msg.get("evidence"))
        except (KeyError, TypeError, ValueError) as e:
            self._refused(claimed(msg.get("node")), source, f"malformed join request ({type(e).__name__})")
            raise peer.PeerError(f"malformed join_request ({type(e).__name__})") from None
        state = self.ctx.snapshot()
        verdict = admission.decide(state, challenge, request, now=time.time())
        name = request.node.get("name", "?")
        if not verdict.admit:
            refusal = admitting.verdict_refusal(state, verdict, request.token_id)
            self.ctx.event("membership", f"join of {name} refused: {refusal.reason}", node=name, reason=refusal.reason,
                           code=refusal.code, source=source)
            if refusal.code == admitting.DENIED:
                self._refused(claimed(request.node), source, refusal.reason)
            await conn.send(refusal.to_wire())
            return
        unable = admitting.cannot_issue(state.root_cert, self.ctx.root_signing_key() is not None, leader)
        if unable is not None:
            await conn.send(unable.to_wire())
            return
        command = admitting.admission_command(state, verdict, request.token_id, request.node,
                                              challenge.tpm.ak_public.hex() if challenge.tpm else "", self.ctx.config.name)
        if isinstance(command, admitting.JoinRefusal):
            await conn.send(command.to_wire())
            return
        try:
            result = await self.ctx.commit(command, retry_until=time.monotonic() + 5)
        except CommandFailed as e:
            await conn.send(admitting.not_committed(str(e), "founding of site" if verdict.founds else "admission")
                            .to_wire())
            return
        if isinstance(result, Refused):
            refusal = admitting.commit_refusal(result)
            self.ctx.event("membership", f"join of {name} refused: {result.text}", node=name, code=refusal.code,
                           source=source)
            if refusal.code == admitting.DENIED:
                self._refused(claimed(request.node), source, result.text)
            await conn.send(refusal.to_wire())
            return
        state = self.ctx.snapshot()
        cert = self.ctx.issue_certificate(state, request.node["public_key"], verdict.founds or self.ctx.membership.site,
                                      request.node["node_id"])
        welcome = admitting.welcome(state, result, verdict.founds, request.node["node_id"],
                                    mesh_id=self.ctx.membership.mesh_id, site=self.ctx.membership.site,
                                    site_secret=self.ctx.membership.site_secret, root_key=self.ctx.membership.root_key,
                                    member_cert=cert)
        transcript = admission.transcript_for(challenge, request)
        key = tokens.session_key(eph, request.joiner_eph, bytes.fromhex(state.tokens[request.token_id].secret),
                                 transcript)
        await conn.send({"type": "welcome", "sealed": tokens.seal(key, os.urandom(12), welcome)})
        self.ctx.metrics.joins.labels("admitted").inc()
        if verdict.founds:
            self.ctx.event("membership", f"{name} founds site {verdict.founds}", node=name, site=verdict.founds)
            return
        self.ctx.event("membership", f"admitted {name}", node=name, voter=result["voter"])
        if result["voter"] and self.ctx.raft.status.role == "leader":
            # Add the voter now, not on the next leader round: it is starting Raft and would
            # otherwise time out and disturb the site with an election. After the welcome,
            # because growing a one-voter site needs the newcomer's own vote to commit.
            await self.ctx.execute(self.voter_changes())

    async def handle_member_call(self, call: dict, send_stream, caller: str) -> Any:
        if call.get("call") == "attest":
            nonce = call.get("nonce")
            if not isinstance(nonce, str) or not 32 <= len(nonce) <= 128:
                raise peer.PeerError("attest needs a hex nonce")
            try:
                raw_nonce = bytes.fromhex(nonce)
            except ValueError:
                raise peer.PeerError("attest needs a hex nonce") from None
            return {"evidence": await self.ctx.evidence(raw_nonce)}
        if call.get("call") == "revoked":
            # Trust the list, not the caller: it must be signed by the mesh root and name us.
            state = self.ctx.snapshot()
            assert self.ctx.identity is not None
            try:
                listed = open_revocations(call.get("revocations"), bytes.fromhex(state.trust_root))
            except (ValueError, AttestationError) as e:
                raise peer.PeerError(f"not a valid revocation list: {e}") from None
            if not listed.is_revoked(self.ctx.identity.node_id):
                raise peer.PeerError("the revocation list does not name this node")
            entry = listed.entries[self.ctx.identity.node_id]
            self.ctx.revoked_notice = f"revoked by {entry.by}" + (f": {entry.reason}" if entry.reason else "")
            assert self.ctx.state_changed is not None
            self.ctx.state_changed.notify()  # the worker acts on it
            return {"stopping": True}
        if call.get("call") == "rotate":
            secret, epoch = call.get("secret"), call.get("epoch")
            if not valid_secret(secret) or not isinstance(epoch, int) or isinstance(epoch, bool):
                raise peer.PeerError("rotate needs a 64-hex-digit secret and an integer epoch")
            assert isinstance(secret, str)
            switched = await self.switch_secret(secret, epoch)
            return {"epoch": self.ctx.membership.secret_epoch if self.ctx.membership else 0, "switched": switched}
        if call.get("call") == "promote":
            # Trust the state, not the caller alone: our own record must say voter, and the
            # key must be the mesh root the site's trust documents name.
            state = self.ctx.snapshot()
            assert self.ctx.identity is not None
            own = state.nodes.get(self.ctx.identity.node_id)
            root_key = call.get("root_key")
            if own is None or not own.voter:
                raise peer.PeerError("the site has not made this node a voter")
            if not isinstance(root_key, str) or not _is_root_key(root_key, state.trust_root):
                raise peer.PeerError("not the mesh root key")
            if self.become_voter is None:
                raise peer.PeerError("this node cannot become a voter")
            await self.become_voter(root_key)
            return {"voter": True}
        if call.get("call") == "site_secret":
            assert self.ctx.membership is not None
            caller_record = self.ctx.snapshot().nodes.get(caller)
            if caller_record is not None and caller_record.quarantine:
                # No secret while its software is unknown (meshd.node.trust); once the
                # policy allows it and it is released, it asks again.
                raise peer.PeerError(f"no secret for a quarantined member: {caller_record.quarantine}")
            return {"secret": self.ctx.membership.site_secret, "epoch": self.ctx.membership.secret_epoch}
        if call.get("call") == "certificate":
            pem = call.get("member_cert")
            try:
                await trio.to_thread.run_sync(self.ctx.tls.install_certificate, pem if isinstance(pem, str) else "")
            except (ValueError, OSError, ssl.SSLError) as e:
                raise peer.PeerError(f"certificate not installed: {e}") from None
            return {"installed": True}
        if call.get("call") == "sign_artifact":  # a member pushed a file; a voter signs its manifest
            if self.ctx.artifacts is None:
                raise peer.PeerError("this node serves no artifacts")
            return {"manifest": self.ctx.artifacts.sign_for_member(call.get("fields"))}
        if call.get("call") == "top":  # what this node's workloads use (meshctl top)
            return {"rows": self.ctx.supervisor.usage() if self.ctx.supervisor is not None else []}
        if call.get("call") == "logs":
            return await serve_local_logs(self.ctx, str(call.get("alloc", "")), bool(call.get("follow")),
                                          call.get("tail"), send_stream, lines=call.get("lines"))
        raise peer.PeerError(f"unknown member call {call.get('call')!r}")

    async def _serve_pieces(self, conn: peer.FramedStream, stream, hello: dict) -> None:
        if self.ctx.artifacts is None or self.ctx.artifacts.store is None:
            raise peer.PeerError("this node serves no artifacts yet")
        await self.ctx.artifacts.serve(conn, stream, hello)

    @contextlib.contextmanager
    def _track_member(self, site: str, node_id: str):
        """A member's call or sync session runs in a cancel scope that revoking the member cancels."""
        with trio.CancelScope() as scope:
            self._member_scopes.setdefault((site, node_id), set()).add(scope)
            try:
                yield
            finally:
                self._member_scopes[(site, node_id)].discard(scope)

    def _cut_revoked(self, state: SiteState) -> None:
        if self.ctx.membership is None:
            return
        for (site, node_id), scopes in self._member_scopes.items():
            if scopes and not self.ctx.may_connect(state, site, node_id):
                log.info("cutting the open connections of a revoked member",
                         extra={"node_id": node_id, "site": site})
                for scope in list(scopes):
                    scope.cancel()

    async def _take_beats(self, conn: peer.FramedStream, node_id: str) -> None:
        """A non-voter's beats: each one is a contact the leader counts for its lease (the
        leader service reads `ctx.beats`, meshd.io.beatlines)."""
        ctx = self.ctx
        if not ctx.is_member(node_id):
            raise peer.PeerError("beats are taken from current members only")
        await ctx.beats.take(conn, node_id, silence=max(BEAT_SILENCE, ctx.config.lease))

    async def _serve_sync(self, conn: peer.FramedStream, stream: trio.abc.Stream, named: tuple[str, str]) -> None:
        if self.ctx.raft is None or self.ctx.mesh.hub is None:
            raise peer.PeerError("this node is not a member of any site yet")
        await self.ctx.mesh.serve(conn, stream, named)
