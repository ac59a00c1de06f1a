"""What the services of one meshd daemon share: the node's identity and membership, its Raft
node and replicated state, its events, and the primitive operations on them (commit, member
calls, carrying out the node core's effects). No service reaches another through it: each
service gets this context and what it needs of the others, explicitly, when it is built
(meshd.io.runtime).

Invariants:
- Readers of the replicated state never get an older view than one they had (`snapshot`): a
  Raft node restarted for a secret rotation replays its journal before its state replaces
  the last one.
- A failed Raft command is retried with the same request id, so it is applied at most once;
  `commit` returns Ok or Refused, or raises CommandFailed when the outcome is unknown.
- `execute` carries out effects in order; a commit's follow-ups run only on its outcome, and
  each effect kind is carried out by exactly one service (`carry_out`).
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Awaitable, Callable

import psutil
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pysyncobj import SyncObjException

from attestation.signed import AttestationError
from meshd import __version__
from meshd import commands as cmds
from meshd.commands import Refused, Result
from meshd.config import NodeConfig
from meshd.exitcodes import EXIT_ERROR, EXIT_PORT_IN_USE
from meshd.io import peer
from meshd.io.attester import boot_id, node_evidence, started_digest
from meshd.io.beatlines import BeatLines
from meshd.io.identity import WAY_BACK, Identity, Membership
from meshd.io.mdns import Discovery
from meshd.io.metrics import DaemonMetrics
from meshd.io.raft import CommandFailed, RaftNode, make_conf
from meshd.io.raftdata import RaftDataError, check_raft_dir, set_aside
from meshd.io.snapshots import SnapshotStore
from meshd.io.supervisor import Supervisor
from meshd.io.tls import PeerTLS, member_of
from meshd.io.tpm import TpmDevice
from meshd.io.wakeup import Wakeup
from meshd.node import access, effects as fx
from meshd.node.joining import Joining
from meshd.sitestate import is_plain_heartbeat, revoked_by_list
from meshd.state import ADMIN_LEFT, ADMIN_REVOKED, SiteState

log = logging.getLogger("meshd.daemon")

# Local (non-replicated) events kept for `meshctl events`.
MAX_LOCAL_EVENTS = 500
# A member call gives up after this long by default (an unreachable member costs that).
MEMBER_CALL_TIMEOUT = 3.0


class FatalStartupError(Exception):
    """The daemon cannot go on (a refused join, this node was revoked); the message is shown
    to the operator, and `status` is the daemon's exit status (meshd.exitcodes)."""

    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status


def new_cert_serial() -> int:
    """A random positive certificate serial of under 160 bits (RFC 5280 section 4.1.2.2)."""
    return int.from_bytes(os.urandom(19), "big") >> 1 or 1


def advertise_ip_for(config: NodeConfig) -> str:
    """The address announced to peers: `--advertise`; else the `--listen` IP when it names
    one (a node listening on 127.0.0.1 is reached there, not on some other interface); with
    a wildcard, the first non-loopback address."""
    if config.advertise:
        return config.advertise
    listen_ip = config.listen.rpartition(":")[0].strip("[]")
    if listen_ip and listen_ip not in ("0.0.0.0", "::"):
        return listen_ip
    return default_advertise_ip()


def advertise_mismatch(listen_ip: str, advertise_ip: str, local_ips: set[str]) -> str | None:
    """Why peers may not reach this node at the address it announces (None: they can, as
    far as this node can tell): it listens on one IP and announces another, or it announces
    an address no interface of its has (legitimate behind a NAT that forwards the ports, hence
    said, not refused)."""
    wildcard = listen_ip in ("", "0.0.0.0", "::")
    if not wildcard and advertise_ip != listen_ip:
        return (f"advertises {advertise_ip} but listens only on {listen_ip}: peers dialling {advertise_ip} "
                f"will not reach it (set --advertise {listen_ip}, or --listen 0.0.0.0:PORT)")
    if wildcard and advertise_ip not in local_ips:
        return (f"advertises {advertise_ip}, which is not an address of this device: peers reach it only if "
                f"something forwards {advertise_ip} here")
    return None


def local_ips() -> set[str]:
    return {addr.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for addr in addrs
            if addr.family in (socket.AF_INET, socket.AF_INET6)}


def default_advertise_ip() -> str:
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family == socket.AF_INET and not addr.address.startswith("127."):
                return addr.address
    return "127.0.0.1"


class NodeContext:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.identity: Identity | None = None
        self.tpm: TpmDevice | None = None  # set when config.tpm names one
        self.membership: Membership | None = None
        self.raft: RaftNode | None = None
        self.discovery: Discovery | None = None
        self.supervisor: Supervisor | None = None
        self.joining: Joining | None = None  # while this node looks for a member to admit it
        self.local_events: deque[dict] = deque(maxlen=MAX_LOCAL_EVENTS)
        self.local_event_count = 0
        self.advertise_ip = advertise_ip_for(config)
        self.listen_ip = config.listen.rpartition(":")[0]
        self.peer_port = 0
        self.raft_port = 0
        self.started = time.monotonic()
        self.tls = PeerTLS(self.data_dir)
        self.state_changed: Wakeup | None = None  # the replicated state changed (made on the trio loop)
        self.reports_changed: Wakeup | None = None  # this node's allocation reports changed
        self.revoked_notice: str | None = None  # a root-signed revocation naming us arrived
        # Non-voters' beat connections and when each last carried a beat: their liveness, read
        # while this node leads (meshd.io.services.peers takes them, .beats sends ours)
        self.beats = BeatLines()
        self.stopping = False
        self.mesh: Any = None  # meshd.io.mesh.MeshSync, set by the runtime
        self.artifacts: Any = None  # meshd.io.services.artifacts.ArtifactService, set by the runtime
        self._newest_state: SiteState | None = None
        self._replayed_before = False  # has_seen_state
        self._revocations_cache: tuple[tuple, frozenset[str]] | None = None
        self._effect_handlers: dict[type, Callable[[Any], Awaitable[None]]] = {}
        self.metrics = DaemonMetrics(self)
        self.metrics_address: tuple[str, int] | None = None  # where the exposition listens, once it does

    def open_wakeups(self) -> None:
        """On the trio loop, before any service runs."""
        self.state_changed, self.reports_changed = Wakeup(), Wakeup()

    def event(self, kind: str, message: str, **data: Any) -> None:
        self.local_events.append({"ts": time.time(), "kind": kind, "message": message, "node": self.config.name, **data})
        self.local_event_count += 1  # ever appended: followers follow by it (the deque is capped)
        self.metrics.events.labels(kind).inc()
        log.info(message, extra={"kind": kind, **data})

    @property
    def has_seen_state(self) -> bool:
        """A Raft of this daemon has replayed its journal: its view (`snapshot` keeps the
        newest) is the node's own, not a journal half replayed since the daemon started."""
        return self.remember_replay()

    def remember_replay(self) -> bool:
        """Note whether the Raft in use has replayed its journal (has_seen_state); called
        too before a Raft is replaced, which may have replayed without anyone asking."""
        if not self._replayed_before and self.raft is not None and self.raft.replayed:
            self._replayed_before = True
        return self._replayed_before

    def snapshot(self) -> SiteState:
        """The replicated state as this node last knew it, read-only. One copy serves every
        reader until Raft applies something new. A Raft node restarted (a secret rotation)
        replays its journal first; until it caught up, readers keep the newer view they had,
        so nothing reads an allocation as gone because it was not replayed yet."""
        if self.raft is None:
            return SiteState()
        newest = self._newest_state
        if newest is not None and self.raft.applied <= newest.applied:
            return newest
        state = self.raft.snapshot()
        if newest is not None and state.applied < newest.applied:
            return newest
        self._newest_state = state
        return state

    def node_plain(self) -> dict:
        assert self.identity is not None
        return {
            "node_id": self.identity.node_id,
            "name": self.config.name,
            "site": self.membership.site if self.membership else self.config.site,
            "address": f"{self.advertise_ip}:{self.peer_port}",
            "raft_address": f"{self.advertise_ip}:{self.raft_port}",
            "public_key": self.identity.public_key.hex(),
            "arch": platform.machine(),
            "boot_id": boot_id(),
            "tpm_ak": self.tpm.ak_public.hex() if self.tpm else "",  # a joiner's is replaced by the verifier's
            "labels": dict(self.config.labels),
            "version": __version__,
            "software": started_digest(),
        }

    async def commit(self, command: cmds.Command, timeout: float = 5.0, retry_until: float | None = None,
                     term: int | None = None) -> Result:
        """Submit through Raft; retry the same request id until `retry_until` (monotonic).
        The outcome is Ok or Refused; CommandFailed when it did not commit (outcome unknown).
        `term`: a leader's decision, made in that term (fenced: cmds.Envelope.term)."""
        assert self.raft is not None
        wire = cmds.encode(command, cmds.Envelope(ts=time.time(), request_id=uuid.uuid4().hex, term=term))
        deadline = retry_until if retry_until is not None else time.monotonic()
        while True:
            try:
                result = await self.raft.submit(wire, timeout=timeout)
            except CommandFailed:
                if time.monotonic() >= deadline:
                    self.counted(command, None)
                    raise
                await trio.sleep(0.1)
                continue
            self.counted(command, result)
            return result

    def counted(self, command: cmds.Command, result: Result | None) -> None:
        """Count a command this daemon submitted: its outcome (None: it did not commit)."""
        outcome = "not_committed" if result is None else "ok" if isinstance(result, cmds.Ok) else "refused"
        self.metrics.commands.labels(command.op, outcome).inc()
        if outcome == "ok" and isinstance(command, cmds.SetLiveness):
            self.metrics.liveness_transitions.labels(command.liveness).inc()

    async def execute(self, effects: list[fx.Effect], term: int | None = None) -> None:
        """Carry out effects in order; a commit's follow-ups run once it committed. Raises
        CommandFailed when a commit did not commit (the duty that asked looks again later).
        `term`: the effects are a leader's decisions made in that Raft term; their commits
        carry it (fenced: cmds.Envelope.term), their follow-ups' too."""
        for effect in effects:
            if isinstance(effect, fx.Commit):
                result = await self.commit(effect.command, term=term)
                if isinstance(result, Refused):
                    log.info("command refused", extra={"op": effect.command.op, "code": result.code,
                                                       "reason": result.text})
                if effect.then is not None:
                    await self.execute(list(effect.then(result, self.snapshot())), term=term)
            elif isinstance(effect, fx.Emit):
                self.event(effect.kind, effect.message, **dict(effect.data))
            else:
                handler = self._effect_handlers.get(type(effect))
                if handler is None:  # a new effect type without a runtime: a bug, loudly
                    raise TypeError(f"no service carries out {type(effect).__name__}")
                await handler(effect)

    def carry_out(self, kind: type, handler: Callable[[Any], Awaitable[None]]) -> None:
        """A service declares that it carries out effects of `kind` (one service per kind)."""
        if kind in self._effect_handlers:
            raise ValueError(f"{kind.__name__} is carried out by another service already")
        self._effect_handlers[kind] = handler

    @property
    def leader_name(self) -> str | None:
        if not self.raft:
            return None
        addr = self.raft.status.leader_address
        if addr is None:
            return None
        if addr == f"{self.advertise_ip}:{self.raft_port}":
            return self.config.name
        for node in self.snapshot().nodes.values():
            if node.raft_address == addr:
                return node.name
        return addr

    @property
    def partitioned(self) -> bool:
        if not self.raft:
            return True
        status = self.raft.status
        return status.leader_address is None or not status.has_quorum

    def _on_role_change(self) -> None:
        """Raft thread: this node's role or its leader changed. The leader loop must look, and
        reports waiting for a leader can go."""
        assert self.state_changed is not None and self.reports_changed is not None
        self.state_changed.notify_threadsafe()
        self.reports_changed.notify_threadsafe()

    def _on_applied(self, command: dict, result: Result) -> None:
        """Raft thread: wake the trio loops, except for a heartbeat that changed no allocation
        (the leader polls liveness on its own period; waking everyone a few times a second
        for nothing costs idle CPU)."""
        if is_plain_heartbeat(command):
            return
        assert self.state_changed is not None
        self.state_changed.notify_threadsafe()

    def start_raft(self, rebuild: str | None = None) -> None:
        """Start Raft on this node's Raft data; `rebuild`: why that data is not the site's (a
        checkpoint found another history), so it is set aside and the state taken from the
        leader again, as for damaged data."""
        assert self.membership is not None and self.state_changed is not None
        self.remember_replay()  # the Raft being replaced may have replayed: remembered
        m = self.membership
        snapshots = SnapshotStore()

        def conf_for(snapshots: SnapshotStore):
            return make_conf(data_dir=self.data_dir, password=m.site_secret,
                             bind_address=f"{self.listen_ip}:{self.raft_port}",
                             min_timeout=self.config.raft_min_timeout, max_timeout=self.config.raft_max_timeout,
                             append_period=self.config.heartbeat_interval, snapshots=snapshots)

        conf = conf_for(snapshots)
        self_address = f"{self.advertise_ip}:{self.raft_port}" if m.voter else None
        partners = [p for p in m.partners if p != self_address]
        raft_dir = self.data_dir / "raft"
        recovering = False
        try:
            try:
                if rebuild is not None:
                    self._newest_state = None  # the view kept across Raft restarts is the wrong one
                    raise RaftDataError(f"this member's Raft history {raft_dir} is not the site's ({rebuild})")
                check_raft_dir(raft_dir, snapshots)
            except RaftDataError as e:
                if not partners:  # the only voter: nobody holds the site's state but this node
                    raise
                aside = set_aside(raft_dir)
                log.warning(f"{e}; its Raft files were moved to {aside}, and this member rebuilds the site's state "
                            "from its leader (it answers as recovering until then)")
                self.event("raft-recovering", f"{self.config.name} set its damaged Raft data aside and rebuilds the "
                           "site's state from the leader", reason=str(e))
                snapshots, recovering = SnapshotStore(), True
                conf = conf_for(snapshots)  # a new, empty raft/
            self.raft = RaftNode(self_address, partners, conf, self._on_applied, self._on_role_change,
                                 tick=self.config.heartbeat_interval, snapshots=snapshots,
                                 frozen_gap=self.config.lease, recovering=recovering)
        except SyncObjException:
            raise FatalStartupError(f"cannot listen on {self.listen_ip or '*'}:{self.raft_port} for Raft traffic: "
                                    f"the port was taken after start-up checked it", EXIT_PORT_IN_USE) from None
        except RaftDataError as e:
            raise FatalStartupError(f"{e}; this node is its site's only voter, so no member holds the site's state "
                                    "to rebuild it from; " + WAY_BACK.format(data_dir=self.data_dir)) from None

    @property
    def recovering(self) -> bool:
        """This member's Raft state was set aside and is not rebuilt yet (meshd.io.raft)."""
        return self.raft is not None and self.raft.status.recovering

    def leader_peer_address(self, state: SiteState) -> str | None:
        """The peer address of the leader this node follows, for a joiner to ask next."""
        leader = self.raft.status.leader_address if self.raft else None
        node = next((n for n in state.nodes.values() if leader and n.raft_address == leader), None)
        return node.address if node is not None and node.node_id != (self.identity.node_id if self.identity
                                                                     else None) else None

    def is_member(self, node_id: str) -> bool:
        node = self.snapshot().nodes.get(node_id)
        return node is not None and node.admin not in (ADMIN_LEFT, ADMIN_REVOKED)

    def root_signing_key(self) -> Ed25519PrivateKey | None:
        """The mesh root key, which only voters hold; None on other members."""
        if self.membership is None or not self.membership.root_key:
            return None
        return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(self.membership.root_key))

    def issue_certificate(self, state: SiteState, public_key_hex: str, site: str, node_id: str) -> str:
        """A membership certificate (PEM) for a node whose evidence just verified. Callers
        check `root_signing_key()` and `state.root_cert` first."""
        root_key = self.root_signing_key()
        assert root_key is not None and self.membership is not None
        # Only a member admitting or renewing issues certificates: X.509 is loaded on demand
        # (about 1.6 MB resident that the other members do not carry).
        from attestation.certs import cert_from_pem, cert_to_pem, issue_member_cert
        cert = issue_member_cert(root_key, cert_from_pem(state.root_cert), bytes.fromhex(public_key_hex),
                                 self.membership.mesh_id, site, node_id, time.time(), serial=new_cert_serial())
        return cert_to_pem(cert)

    async def call_member(self, node, call: dict, *, verify_server: bool = True,
                          expect: Callable[[dict | None], bool] | None = None,
                          on_stream: Callable[[dict], Awaitable[None]] | None = None,
                          timeout: float | None = MEMBER_CALL_TIMEOUT) -> Any:
        """One member call to `node` over mutual TLS, as this node. By default the server's
        certificate must name that very member; raises OSError, PeerError or TooSlowError."""
        assert self.identity is not None and self.membership is not None
        if expect is None and verify_server:
            expect = self.cert_names(node.node_id)
        return await peer.member_call(node.address, node_id=self.identity.node_id,
                                      site_secret=self.membership.site_secret, call=call,
                                      context=self.tls.client_context(verify_server=verify_server),
                                      expect=expect, on_stream=on_stream, timeout=timeout)

    async def try_call_member(self, node, call: dict, failure: str, *, timeout: float = MEMBER_CALL_TIMEOUT,
                              **options: Any) -> Any | None:
        """Best effort: the answer, or None after logging `failure` with the reason."""
        try:
            with trio.fail_after(timeout):
                return await self.call_member(node, call, **options)
        except (OSError, peer.PeerError, trio.TooSlowError) as e:  # OSError covers "no certificate yet"
            log.info(failure, extra={"node": node.name, "reason": str(e) or type(e).__name__})
            return None

    async def evidence(self, nonce: bytes, credential: bytes = b"") -> dict:
        assert self.identity is not None
        return await trio.to_thread.run_sync(node_evidence, self.identity, nonce, self.config, self.tpm, credential)

    def cert_member(self, peer_cert: dict | None) -> tuple[str, str] | None:
        """(site, node id) of the current member of this site a verified peer certificate
        belongs to, else None."""
        if self.membership is None:
            return None
        named = member_of(peer_cert, self.membership.mesh_id)
        if named is None or named[0] != self.membership.site or not self.is_member(named[1]):
            return None
        return named

    def sync_member(self, peer_cert: dict | None) -> tuple[str, str] | None:
        """(site, node id) of a verified peer certificate when that node may sync the mesh
        document: a member of this mesh, of any site, that `may_connect` allows."""
        if self.membership is None:
            return None
        named = member_of(peer_cert, self.membership.mesh_id)
        if named is None or not self.may_connect(self.snapshot(), *named):
            return None
        return named

    def may_connect(self, state: SiteState, site: str, node_id: str) -> bool:
        """Whether a node of this mesh may open or keep a connection to us (meshd.node.access)."""
        assert self.membership is not None
        return access.may_connect(state, self.membership.site, site, node_id, self.listed_revoked(state))

    def listed_revoked(self, state: SiteState) -> frozenset[str]:
        """The node ids the site's root-signed revocation list names (opened once per list)."""
        signature = state.revocations.get("sig") if isinstance(state.revocations, dict) else None
        cached = self._revocations_cache
        if cached is None or cached[0] != (signature, state.trust_root):
            try:
                revoked = revoked_by_list(state)
            except (ValueError, AttestationError):
                revoked = frozenset()
            cached = self._revocations_cache = ((signature, state.trust_root), revoked)
        return cached[1]

    def cert_names(self, node_id: str) -> Callable[[dict | None], bool]:
        """For a client: does the server's verified certificate name this member?"""
        def names_it(cert: dict | None) -> bool:
            named = self.cert_member(cert)
            return named is not None and named[1] == node_id
        return names_it
