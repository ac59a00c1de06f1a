"""`meshd run`: the trio daemon around the pure cores.

Every decision is the node core's (meshd.node): the daemon's loops wait, hand the core what
this node knows (the replicated state, Raft's view, `now`), carry out the effects it returns
(`Daemon.execute`) and feed the outcomes back.

Tasks of one daemon (all in one nursery; SIGTERM/SIGINT cancel it and shutdown runs):
- peer listener: joins of new nodes (meshd.node.admitting), member calls (remote `logs`,
  re-attestation, revocation notices, secret rotation);
- admin socket: `meshctl` requests (meshd.io.adminhandlers);
- reports: a Raft command with this node's resources and the state of its allocations,
  sent only when there is news (meshd.reporting);
- leader duties (only while this node leads, meshd.node.leading): liveness verdicts, Raft
  voter membership, placement plans; re-attestation (meshd.node.attesting);
- watchdog: a thread that ends the process if the trio loop stops making progress, so a
  wedged daemon fails like a dead one (its Raft thread would otherwise keep answering
  heartbeats for a node that supervises nothing);
- supervisor sync: runs exactly the allocations the replicated state assigns to this node
  (meshd.node.worker). The state is rebuilt from the local Raft journal at start, so a node
  restarted with no peer reachable restarts its workloads (local autonomy).

Invariants:
- Only this package touches sockets, threads, processes and clocks; decisions are made by
  pure functions given `now`.
- A failed Raft command is retried with the same request id, so it is applied at most once.
- Readers of the replicated state never get an older view than one they had: a Raft node
  restarted for a secret rotation replays its journal before its state replaces the last one.
- A commit's follow-ups run only on its outcome (Ok or Refused); one whose outcome is
  unknown (CommandFailed) is looked at again by the duty that asked for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import secrets
import signal
import socket
import ssl
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Awaitable, Callable

import psutil
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from attestation.policy import Policy, open_policy, sign_policy
from attestation.revocation import RevocationList, open_revocations, sign_revocations
from attestation.signed import AttestationError
from attestation.tpm import TpmError

from meshd import __version__, admission, tokens
from meshd import commands as cmds
from meshd.commands import Ok, Refused, Result
from meshd.config import NodeConfig
from meshd.io import peer
from meshd.io.attester import boot_id, node_evidence, package_digest
from meshd.io.identity import (Identity, Membership, load_or_create_identity, load_ports, read_revoked_marker,
                               save_certificates, save_ports, write_revoked_marker)
from meshd.io.mdns import Discovery
from meshd.io.memory import trim_heap
from meshd.io.raft import CommandFailed, RaftNode, make_conf
from meshd.io.supervisor import Supervisor
from meshd.io.tls import PeerTLS, joiner_context, member_of
from meshd.io.tpm import TpmDevice, TpmUnavailable
from meshd.io.watchdog import LoopWatchdog
from meshd.node import access, admitting, effects as fx, trust
from meshd.node.attesting import Attesting
from meshd.node.joining import Joining, Unreachable
from meshd.node.leading import LeaderView, Leading
from meshd.node.worker import Worker
from meshd.reporting import ReportSchedule
from meshd.sitestate import is_plain_heartbeat, revoked_by_list
from meshd.state import ADMIN_LEFT, ADMIN_REVOKED, SiteState

log = logging.getLogger("meshd.daemon")

# After a leader duty failed (a command did not commit), the leader looks again this soon.
LEADER_PERIOD = 0.1
# A follower's leader loop is woken by every role change; this is only a safety net.
FOLLOWER_PERIOD = 2.0
# Allocation reports are sent when they change; a full resend this often repairs any report
# that a leader change swallowed.
FULL_REPORT_PERIOD = 10.0
# How often a node looks for news to report when the supervisor does not wake it first
# (resource moves are only seen by sampling, which is this slow anyway).
REPORT_CHECK_PERIOD = 2.0
# Every applied command wakes the supervisor sync; without one it looks this often anyway.
SUPERVISE_SAFETY_PERIOD = 5.0
# A report that did not commit (no leader yet, leader change) is retried after this.
REPORT_RETRY_DELAY = 0.1
# Non-voters are invisible in Raft's heartbeats: they report this many times per lease.
NONVOTER_REPORTS_PER_LEASE = 4
# psutil sampling is cheap but not free; resources move slowly.
RESOURCE_SAMPLE_PERIOD = 2.0
# While joining: look for candidates this often (cheap: a dict read).
JOIN_POLL = 0.05
# While joining and nobody is found: ask by mDNS this often, for this long (after that the
# browser's own backing-off schedule is enough; a site that is not there is not a hurry).
JOIN_QUERY_PERIOD = 0.25
JOIN_FAST_QUERY_WINDOW = 5.0
# Re-attestation (leader): look for due members this often (and on every state change);
# one exchange may take this long (meshd.node.attesting decides who and when).
ATTEST_CHECK_PERIOD = 1.0
ATTEST_TIMEOUT = 10.0
# Raft secret: a member with no Raft leader for SECRET_FETCH_AFTER (looked at every
# SECRET_CHECK_PERIOD) asks the others whether the secret was rotated while it was away;
# each call to a member gives up after SECRET_CALL_TIMEOUT (an unreachable member costs that).
SECRET_CHECK_PERIOD = 1.0
SECRET_FETCH_AFTER = 5.0
SECRET_CALL_TIMEOUT = 3.0
# Returning freed heap to the kernel: once start-up settled (joins, first reports), then on
# this period (a trim walks the heap: cheap, but not free).
HEAP_TRIM_FIRST = 5.0
HEAP_TRIM_PERIOD = 300.0
# Local (non-replicated) events kept for `meshctl events`.
MAX_LOCAL_EVENTS = 500


class FatalStartupError(Exception):
    """The daemon cannot start (e.g. a refused join); the message is shown to the operator."""


def new_cert_serial() -> int:
    """A random positive certificate serial of under 160 bits (RFC 5280 section 4.1.2.2)."""
    return int.from_bytes(os.urandom(19), "big") >> 1 or 1


def _valid_secret(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def founder_welcome_problem(welcome: dict, site: str) -> str | None:
    """Why a welcome that makes this node the founder of `site` cannot be used, or None.
    Checked before anything is saved: the root key must be the mesh root the trust documents
    open with, and they must belong to the welcome's mesh (the bootstrap checks them again)."""
    if welcome.get("site") != site:
        return f"it is for site {welcome.get('site')!r}, the token for {site!r}"
    fields = ("mesh_id", "root_key", "trust_root", "member_cert", "root_cert")
    if not all(isinstance(welcome.get(f), str) and welcome[f] for f in fields):
        return f"it lacks one of {', '.join(fields)}"
    try:
        root_key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(welcome["root_key"]))
        if raw_public_key(root_key).hex() != welcome["trust_root"]:
            return "its root key is not the mesh root its trust documents name"
        root = bytes.fromhex(welcome["trust_root"])
        policy, revocations = open_policy(welcome.get("policy"), root), open_revocations(welcome.get("revocations"), root)
    except (ValueError, AttestationError) as e:
        return f"its trust documents do not verify ({e})"
    if policy.mesh_id != welcome["mesh_id"] or revocations.mesh_id != welcome["mesh_id"]:
        return "its trust documents belong to another mesh"
    return None


class JoinRefused(peer.PeerError):
    """A member answered a join with a refusal (meshd.node.admitting says what its code means)."""

    def __init__(self, refusal: admitting.JoinRefusal) -> None:
        super().__init__(refusal.reason)
        self.refusal = refusal


class Wakeup:
    """Wake several trio waiters when the replicated state changes (thread-safe notify)."""

    def __init__(self) -> None:
        self._event = trio.Event()
        self._generation = 0  # notifies so far
        self._token = trio.lowlevel.current_trio_token()

    def listener(self) -> WakeupListener:
        return WakeupListener(self)

    def notify_threadsafe(self) -> None:
        try:
            self._token.run_sync_soon(self.notify)
        except trio.RunFinishedError:
            pass

    def notify(self) -> None:
        self._generation += 1
        self._event.set()
        self._event = trio.Event()

    async def wait(self, timeout: float) -> bool:
        """Wait for the next notify or the timeout; True when notified."""
        event = self._event
        with trio.move_on_after(timeout):
            await event.wait()
        return event.is_set()


class WakeupListener:
    """One loop's subscription to a Wakeup: a notify that came while the loop was busy
    (not waiting) is not lost; its next wait returns at once."""

    def __init__(self, wakeup: Wakeup) -> None:
        self._wakeup = wakeup
        self._seen = wakeup._generation

    async def wait(self, timeout: float) -> bool:
        """Wait for a notify not seen yet, or the timeout; True when notified."""
        wakeup = self._wakeup
        if wakeup._generation == self._seen:
            event = wakeup._event
            with trio.move_on_after(timeout):
                await event.wait()
        notified = wakeup._generation != self._seen
        self._seen = wakeup._generation
        return notified


def raw_public_key(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def raw_private_key(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def default_advertise_ip() -> str:
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family == socket.AF_INET and not addr.address.startswith("127."):
                return addr.address
    return "127.0.0.1"


def free_port(ip: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def sd_notify(message: str) -> None:
    """systemd Type=notify: tell the service manager we are ready / stopping."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.send(message.encode())
    except OSError as e:
        log.warning("sd_notify failed", extra={"reason": str(e)})


class Daemon:
    def __init__(self, config: NodeConfig):
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.identity: Identity | None = None
        self.tpm: TpmDevice | None = None  # set when config.tpm names one
        self.membership: Membership | None = None
        self.raft: RaftNode | None = None
        self.discovery: Discovery | None = None
        self.supervisor: Supervisor | None = None
        self.leading = Leading(lease=config.lease, new_alloc_id=lambda: secrets.token_hex(6))
        self.worker: Worker | None = None  # once the identity is loaded
        self.attesting: Attesting | None = None
        self.joining: Joining | None = None  # while this node looks for a member to admit it
        self._newest_state: SiteState | None = None  # reads never go back to an older view
        self.local_events: deque[dict] = deque(maxlen=MAX_LOCAL_EVENTS)
        self.advertise_ip = config.advertise or default_advertise_ip()
        self.listen_ip = config.listen.rpartition(":")[0]
        self.peer_port = 0
        self.raft_port = 0
        self.started = time.monotonic()
        self._heartbeat_seq = int(time.time() * 1000)  # monotonic across restarts of this node
        self._reports = ReportSchedule(full_period=FULL_REPORT_PERIOD)
        self._resources: dict = {}
        self._resources_at = 0.0
        self.state_changed: Wakeup | None = None
        self.tls = PeerTLS(self.data_dir)
        self._member_scopes: dict[tuple[str, str], set[trio.CancelScope]] = {}  # open calls and sync sessions, by (site, node id)
        self._revoked_notice: str | None = None  # a root-signed revocation naming us arrived
        self._revocations_cache: tuple[tuple, frozenset[str]] | None = None
        # pysyncobj takes one membership change at a time; a second one waits out its timeout.
        self._voter_change_lock = trio.Lock()
        self._secret_switch = trio.Lock()
        self.reports_changed: Wakeup | None = None
        self.stopping = False
        from meshd.io.mesh import MeshSync
        self.mesh = MeshSync(self)  # the mesh document replica and cross-site sync

    # --- helpers -------------------------------------------------------------------------

    def event(self, kind: str, message: str, **data: Any) -> None:
        self.local_events.append({"ts": time.time(), "kind": kind, "message": message, "node": self.config.name, **data})
        log.info(message, extra={"kind": kind, **data})

    def snapshot(self) -> SiteState:
        """The replicated state as this node last knew it. A Raft node restarted (a secret
        rotation) replays its journal first; until it caught up, readers keep the newer view
        they had, so nothing reads an allocation as gone because it was not replayed yet."""
        if self.raft is None:
            return SiteState()
        state = self.raft.snapshot()
        newest = self._newest_state
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
        }

    def new_command(self, op: str, **fields: Any) -> dict:
        return {"op": op, "request_id": uuid.uuid4().hex, "ts": time.time(), **fields}

    async def commit(self, command: cmds.Command | dict, timeout: float = 5.0,
                     retry_until: float | None = None) -> Result:
        """Submit through Raft; retry the same request id until `retry_until` (monotonic).
        The outcome is Ok or Refused; CommandFailed when it did not commit (outcome unknown)."""
        assert self.raft is not None
        if isinstance(command, cmds.Command):
            command = cmds.encode(command, cmds.Envelope(ts=time.time(), request_id=uuid.uuid4().hex))
        deadline = retry_until if retry_until is not None else time.monotonic()
        while True:
            try:
                return await self.raft.submit(command, timeout=timeout)
            except CommandFailed:
                if time.monotonic() >= deadline:
                    raise
                await trio.sleep(0.1)

    # --- carrying out the node core's effects ---------------------------------------------

    async def execute(self, effects: list[fx.Effect]) -> None:
        """Carry out effects in order; a commit's follow-ups run once it committed. Raises
        CommandFailed when a commit did not commit (the duty that asked looks again later)."""
        for effect in effects:
            if isinstance(effect, fx.Commit):
                result = await self.commit(effect.command)
                if isinstance(result, Refused):
                    log.info("command refused", extra={"op": effect.command.op, "code": result.code,
                                                       "reason": result.text})
                if effect.then is not None:
                    await self.execute(list(effect.then(result, self.snapshot())))
            elif isinstance(effect, fx.Emit):
                self.event(effect.kind, effect.message, **dict(effect.data))
            elif isinstance(effect, (fx.AddVoter, fx.RemoveVoter)):
                await self._change_voters(effect)
            elif isinstance(effect, fx.TellRevoked):
                await self.tell_revoked(effect.node, effect.revocations)
            elif isinstance(effect, fx.DistributeSecret):
                await self._distribute_secret(effect)
            elif isinstance(effect, fx.RenewCertificate):
                await self._renew_certificate(self.snapshot(), effect.node)
            elif isinstance(effect, fx.SetWorkloads):
                assert self.supervisor is not None
                self.supervisor.set_desired(effect.workloads)
            elif isinstance(effect, fx.Expel):
                await self._expelled(effect.reason)
            else:  # pragma: no cover - a new effect type without a runtime
                raise TypeError(f"no runtime for effect {effect!r}")

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

    # --- startup -----------------------------------------------------------------------

    def _choose_ports(self) -> None:
        saved = load_ports(self.data_dir)
        listen_port = int(self.config.listen.rpartition(":")[2])
        if listen_port:
            self.peer_port, self.raft_port = listen_port, listen_port + 1
        elif saved:
            # Port 0 picks free ports once; a restarted node keeps them, because the other
            # voters know it by its Raft address.
            self.peer_port, self.raft_port = saved["peer_port"], saved["raft_port"]
        else:
            self.peer_port = free_port(self.listen_ip)
            self.raft_port = free_port(self.listen_ip)
        save_ports(self.data_dir, self.peer_port, self.raft_port)

    def _check_ports_free(self) -> None:
        """Refuse to start, with the reason, when the peer port or the Raft port (peer + 1
        when --listen names a port) is taken: Raft would otherwise retry its bind forever."""
        family = socket.AF_INET6 if ":" in (self.listen_ip or "") else socket.AF_INET
        for what, port in (("peer", self.peer_port), ("Raft", self.raft_port)):
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the real listeners do
                try:
                    probe.bind((self.listen_ip or "", port))
                except OSError as e:
                    raise FatalStartupError(f"cannot listen on {self.listen_ip or '*'}:{port} for {what} traffic: "
                                            f"{e.strerror or e} (--listen PORT takes PORT and PORT+1)") from None

    def _on_role_change(self) -> None:
        """Raft thread: this node's role or its leader changed. The leader loop must look, and
        reports waiting for a leader can go."""
        assert self.state_changed is not None and self.reports_changed is not None
        self.state_changed.notify_threadsafe()
        self.reports_changed.notify_threadsafe()

    def _on_applied(self, command: dict, result: dict) -> None:
        """Raft thread: wake the trio loops, except for a heartbeat that changed no allocation
        (the leader polls liveness on its own period; waking everyone a few times a second
        for nothing costs idle CPU)."""
        if is_plain_heartbeat(command):
            return
        assert self.state_changed is not None
        self.state_changed.notify_threadsafe()

    def _start_raft(self) -> None:
        assert self.membership is not None and self.state_changed is not None
        m = self.membership
        conf = make_conf(data_dir=self.data_dir, password=m.site_secret,
                         bind_address=f"{self.listen_ip}:{self.raft_port}",
                         min_timeout=self.config.raft_min_timeout, max_timeout=self.config.raft_max_timeout,
                         append_period=self.config.heartbeat_interval)
        self_address = f"{self.advertise_ip}:{self.raft_port}" if m.voter else None
        partners = [p for p in m.partners if p != self_address]
        self.raft = RaftNode(self_address, partners, conf, self._on_applied, self._on_role_change,
                             tick=self.config.heartbeat_interval)

    async def _found_site(self) -> None:
        """No data, no token: this node founds a new mesh (and its trust root) and its site."""
        assert self.identity is not None
        mesh_id = uuid.uuid4().hex
        root_key = Ed25519PrivateKey.generate()
        now = time.time()
        from attestation.certs import cert_to_pem, issue_member_cert, make_root
        root_cert = make_root(root_key, mesh_id, now)
        # The founder's own software is the first reference value; `meshctl policy` adds more.
        policy = Policy(mesh_id=mesh_id, serial=1, min_version=__version__,
                        allowed_digests={__version__: frozenset({package_digest()})}, issued_at=now)
        trust = {"root": raw_public_key(root_key).hex(), "root_cert": cert_to_pem(root_cert),
                 "policy": sign_policy(root_key, policy),
                 "revocations": sign_revocations(root_key, RevocationList(mesh_id, 0))}
        own_cert = issue_member_cert(root_key, root_cert, self.identity.public_key, mesh_id, self.config.site,
                                     self.identity.node_id, now, serial=new_cert_serial())
        await self._start_site(self.config.site, mesh_id, raw_private_key(root_key).hex(), trust,
                               cert_to_pem(own_cert))
        self.event("membership", f"founded site {self.config.site}", site=self.config.site)

    async def _start_site(self, site: str, mesh_id: str, root_key: str, trust: dict, member_cert: str) -> None:
        """Become the first voter of a new site of mesh `mesh_id`: save what a restart resumes
        from (membership, certificates), then start Raft and commit the site's bootstrap with
        the mesh trust documents (`trust`: root, root_cert, policy, revocations)."""
        self.membership = Membership(site=site, mesh_id=mesh_id, site_secret=secrets.token_hex(32), voter=True,
                                     peer_port=self.peer_port, raft_port=self.raft_port, partners=[],
                                     root_key=root_key)
        self.membership.save(self.data_dir)
        save_certificates(self.data_dir, member_cert, trust["root_cert"])
        self._start_raft()
        command = self.new_command("bootstrap", site=site, mesh_id=mesh_id, node=self.node_plain(),
                                   actor=self.config.name, trust=trust)
        result = await self.commit(command, retry_until=time.monotonic() + 30)
        if isinstance(result, Refused):
            raise FatalStartupError(f"could not found site: {result.text}")

    async def _join_site(self) -> None:
        """Ask members of the token's site to admit this node until one does (meshd.node.joining
        decides whom to ask next, what each answer means and when to give up)."""
        try:
            token = tokens.parse_token(self.config.join or "")
        except tokens.TokenError as e:
            raise FatalStartupError(f"--join: {e}") from None
        started = time.monotonic()
        joining = self.joining = Joining(site=token.site, started=started)
        last_query = 0.0
        while True:
            now = time.monotonic()
            found: list[str] = []
            if self.discovery:
                found = [c.address for c in self.discovery.candidates(token.site)]
                if not found and now - started < JOIN_FAST_QUERY_WINDOW and now - last_query >= JOIN_QUERY_PERIOD:
                    last_query = now
                    probed = await trio.to_thread.run_sync(self.discovery.probe)
                    found = [c.address for c in probed if c.site == token.site]
            for address in joining.candidates(found, list(self.config.peers), time.monotonic()):
                try:
                    welcome = await self._join_via(address, token)
                except JoinRefused as e:
                    outcome: Unreachable | admitting.JoinRefusal = e.refusal
                except (peer.PeerError, OSError, trio.TooSlowError, KeyError, ValueError) as e:
                    outcome = Unreachable(str(e) or type(e).__name__)
                else:
                    self.joining = None
                    await self._welcomed(address, token, welcome)
                    return
                new, give_up = joining.failed(address, outcome, time.monotonic())
                if new:
                    log.info("join attempt failed", extra={"peer": address, "outcome": joining.attempts[address].outcome,
                                                           "reason": joining.attempts[address].reason})
                if give_up is not None:
                    raise FatalStartupError(give_up.reason)
            give_up = joining.expired(time.monotonic())
            if give_up is not None:
                raise FatalStartupError(give_up.reason)
            await trio.sleep(JOIN_POLL)

    async def _welcomed(self, address: str, token: tokens.ParsedToken, welcome: dict) -> None:
        """A member admitted this node: become a member of its site, or found a new one."""
        if welcome.get("founder") is True:
            # No members of the site yet: this node is its first voter, in the mesh
            # (trust root, policy, revocations) of the member that let it in.
            await self._start_site(token.site, welcome["mesh_id"], welcome["root_key"],
                                   {"root": welcome["trust_root"], "root_cert": welcome["root_cert"],
                                    "policy": welcome["policy"], "revocations": welcome["revocations"]},
                                   welcome["member_cert"])
            self.event("membership", f"founded site {token.site} in mesh {welcome['mesh_id']} via {address}",
                       site=token.site, mesh_id=welcome["mesh_id"])
            return
        self.membership = Membership(site=token.site, mesh_id=welcome["mesh_id"],
                                     site_secret=welcome["site_secret"], voter=bool(welcome["voter"]),
                                     peer_port=self.peer_port, raft_port=self.raft_port,
                                     partners=list(welcome["partners"]),
                                     root_key=str(welcome.get("root_key", "")))
        self.membership.save(self.data_dir)
        save_certificates(self.data_dir, str(welcome["member_cert"]), str(welcome["root_cert"]))
        self.event("membership", f"joined site {token.site} via {address}", site=token.site,
                   voter=self.membership.voter)
        self._start_raft()

    async def _join_via(self, address: str, token: tokens.ParsedToken) -> dict:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
        from cryptography.hazmat.primitives import serialization
        assert self.identity is not None
        eph = X25519PrivateKey.generate()
        eph_pub = eph.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        conn = await peer.open_peer(address, joiner_context())
        try:
            hello = {"type": "join_hello", "site": token.site}
            if self.tpm is not None:
                hello["tpm"] = self.tpm.keys()
            await conn.send(hello)
            challenge = await conn.receive()
            if challenge.get("type") == "refused":
                raise JoinRefused(admitting.JoinRefusal.from_wire(challenge))
            if challenge.get("type") != "challenge":
                raise peer.PeerError(challenge.get("error") or "member did not send a challenge")
            nonce, member_eph = bytes.fromhex(challenge["nonce"]), bytes.fromhex(challenge["member_eph"])
            credential = b""
            if self.tpm is not None:
                credential = await self._activate(challenge.get("tpm_credential"))
            node = self.node_plain() | {"site": token.site}
            transcript = tokens.join_transcript(nonce, eph_pub, member_eph, token.token_id, node)
            await conn.send({"type": "join_request", "token_id": token.token_id, "node": node,
                             "joiner_eph": eph_pub.hex(), "proof": tokens.token_proof(token.secret, transcript),
                             "signature": tokens.sign(self.identity.private_key, transcript),
                             "evidence": await self.evidence(nonce, credential)})
            answer = await conn.receive(timeout=15)
            if answer.get("type") == "refused":
                raise JoinRefused(admitting.JoinRefusal.from_wire(answer))
            if answer.get("type") != "welcome":
                raise peer.PeerError(answer.get("reason") or answer.get("error") or "join refused")
            key = tokens.session_key(eph, member_eph, token.secret, transcript)
            try:
                welcome = tokens.unseal(key, answer["sealed"])
            except tokens.TokenError as e:
                raise peer.PeerError(str(e)) from None
            if welcome.get("founder") is True:
                problem = founder_welcome_problem(welcome, token.site)
                if problem:
                    raise peer.PeerError(f"{address} sent an unusable welcome for a new site: {problem}")
            return welcome
        finally:
            await conn.aclose()

    async def _activate(self, offered: object) -> bytes:
        """Our TPM's answer to the verifier's credential challenge."""
        assert self.tpm is not None
        if not isinstance(offered, dict):
            raise peer.PeerError("the member sent no TPM credential challenge (it cannot appraise TPM evidence)")
        try:
            id_object, secret = bytes.fromhex(offered["id_object"]), bytes.fromhex(offered["encrypted_secret"])
        except (KeyError, TypeError, ValueError):
            raise peer.PeerError("malformed TPM credential challenge") from None
        try:
            return await trio.to_thread.run_sync(self.tpm.activate_credential, id_object, secret)
        except (TpmUnavailable, ValueError) as e:
            raise peer.PeerError(str(e)) from None

    # --- peer side of the join ----------------------------------------------------------

    async def handle_join(self, conn: peer.FramedStream, hello: dict) -> None:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
        from cryptography.hazmat.primitives import serialization
        state = self.snapshot()
        leader = self._leader_peer_address(state)
        busy = admitting.cannot_decide(state, self.membership is not None and self.raft is not None, leader)
        if busy is not None:
            await conn.send(busy.to_wire())
            return
        assert self.membership is not None and self.raft is not None
        eph = X25519PrivateKey.generate()
        tpm_challenge = None
        if "tpm" in hello:
            try:
                tpm_challenge = admission.tpm_challenge(hello["tpm"], os.urandom(32), os.urandom(32))
            except TpmError as e:
                self.event("membership", f"join refused: TPM keys unfit ({e})", reason=str(e))
                await conn.send(admitting.JoinRefusal(admitting.DENIED, f"attestation: TPM keys unfit: {e}").to_wire())
                return
        challenge = admission.Challenge(
            nonce=os.urandom(32),
            member_eph=eph.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
            issued_at=time.time(), tpm=tpm_challenge)
        message = {"type": "challenge", "nonce": challenge.nonce.hex(), "member_eph": challenge.member_eph.hex(),
                   "site": self.membership.site}
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
            raise peer.PeerError(f"malformed join_request ({type(e).__name__})") from None
        state = self.snapshot()
        verdict = admission.decide(state, challenge, request, now=time.time())
        name = request.node.get("name", "?")
        if not verdict.admit:
            refusal = admitting.verdict_refusal(state, verdict, request.token_id)
            self.event("membership", f"join of {name} refused: {refusal.reason}", node=name, reason=refusal.reason,
                       code=refusal.code)
            await conn.send(refusal.to_wire())
            return
        unable = admitting.cannot_issue(state.root_cert, self.root_signing_key() is not None, leader)
        if unable is not None:
            await conn.send(unable.to_wire())
            return
        command = admitting.admission_command(state, verdict, request.token_id, request.node,
                                              challenge.tpm.ak_public.hex() if challenge.tpm else "", self.config.name)
        if isinstance(command, admitting.JoinRefusal):
            await conn.send(command.to_wire())
            return
        try:
            result = await self.commit(command, retry_until=time.monotonic() + 5)
        except CommandFailed as e:
            await conn.send(admitting.not_committed(str(e), "founding of site" if verdict.founds else "admission")
                            .to_wire())
            return
        if isinstance(result, Refused):
            refusal = admitting.commit_refusal(result)
            self.event("membership", f"join of {name} refused: {result.text}", node=name, code=refusal.code)
            await conn.send(refusal.to_wire())
            return
        state = self.snapshot()
        cert = self.issue_certificate(state, request.node["public_key"], verdict.founds or self.membership.site,
                                      request.node["node_id"])
        welcome = admitting.welcome(state, result, verdict.founds, request.node["node_id"],
                                    mesh_id=self.membership.mesh_id, site=self.membership.site,
                                    site_secret=self.membership.site_secret, root_key=self.membership.root_key,
                                    member_cert=cert)
        transcript = admission.transcript_for(challenge, request)
        key = tokens.session_key(eph, request.joiner_eph, bytes.fromhex(state.tokens[request.token_id].secret),
                                 transcript)
        await conn.send({"type": "welcome", "sealed": tokens.seal(key, os.urandom(12), welcome)})
        if verdict.founds:
            self.event("membership", f"{name} founds site {verdict.founds}", node=name, site=verdict.founds)
            return
        self.event("membership", f"admitted {name}", node=name, voter=result["voter"])
        if result["voter"] and self.raft.status.role == "leader":
            # Add the voter now, not on the next leader round: it is starting Raft and would
            # otherwise time out and disturb the site with an election. After the welcome,
            # because growing a one-voter site needs the newcomer's own vote to commit.
            await self.execute(self._voter_change())

    def _leader_peer_address(self, state: SiteState) -> str | None:
        """The peer address of the leader this node follows, for a joiner to ask next."""
        leader = self.raft.status.leader_address if self.raft else None
        node = next((n for n in state.nodes.values() if leader and n.raft_address == leader), None)
        return node.address if node is not None and node.node_id != (self.identity.node_id if self.identity
                                                                     else None) else None

    def is_member(self, node_id: str) -> bool:
        node = self.snapshot().nodes.get(node_id)
        return node is not None and node.admin not in (ADMIN_LEFT, ADMIN_REVOKED)

    # --- periodic duties ---------------------------------------------------------------

    def _sample_resources(self) -> dict:
        now = time.monotonic()
        if not self._resources or now - self._resources_at > RESOURCE_SAMPLE_PERIOD:
            cores = psutil.cpu_count() or 1
            busy = psutil.cpu_percent(interval=None) / 100.0
            mem = psutil.virtual_memory()
            self._resources = {"cpu_total": float(cores), "cpu_free": round(cores * (1 - busy), 2),
                               "mem_total_mb": mem.total // 2**20, "mem_free_mb": mem.available // 2**20}
            self._resources_at = now
        return self._resources

    async def report_loop(self) -> None:
        """Send a report through Raft whenever the schedule says there is news."""
        assert self.identity is not None and self.reports_changed is not None and self.raft is not None
        news = self.reports_changed.listener()
        while True:
            status = self.raft.status
            # Non-voters are invisible in Raft's heartbeats; they keep their lease by reporting.
            keepalive = self.config.lease / NONVOTER_REPORTS_PER_LEASE if status.role == "nonvoter" else None
            self._reports.keepalive = keepalive
            if status.leader_address is not None:
                reports = [dataclasses.asdict(r) for r in self.supervisor.reports()] if self.supervisor else []
                now = time.monotonic()
                report = self._reports.due(now, self._sample_resources(), reports)
                if report is not None:
                    self._heartbeat_seq += 1
                    command = {"op": "heartbeat", "ts": time.time(), "node_id": self.identity.node_id,
                               "seq": self._heartbeat_seq, "reports": list(report.allocs)}
                    if report.resources_moved:
                        command["resources"] = report.resources
                    if report.full:
                        command["boot_id"] = boot_id()  # a reboot makes the leader re-attest us
                    try:
                        result = await self.raft.submit(command, timeout=max(self.config.lease, 1.0))
                        if isinstance(result, Ok):
                            self._reports.sent(now, report)
                            # Look again at once: changes made while the report was in
                            # flight woke nobody.
                            continue
                    except CommandFailed:
                        pass
                    await trio.sleep(REPORT_RETRY_DELAY)
                    continue
            await news.wait(keepalive or REPORT_CHECK_PERIOD)

    async def leader_loop(self) -> None:
        """Leader duties (meshd.node.leading), woken by state changes, role changes and the
        next lease deadline."""
        assert self.state_changed is not None and self.identity is not None
        wait = 0.0  # look at once: a founder became leader before this loop started
        changes = self.state_changed.listener()
        while True:
            notified = await changes.wait(wait)
            wait = FOLLOWER_PERIOD
            if self.raft is None or self.raft.status.role != "leader":
                self.leading.stepped_down()
                continue
            wait = LEADER_PERIOD  # after a failed duty: try again soon
            try:
                effects = self.leading.step(self._leader_view(notified), time.monotonic())
                await self.execute(effects)
                wait = 0.0 if any(isinstance(e, fx.Commit) for e in effects) else \
                    self.leading.next_look(self.snapshot(), time.monotonic())
            except CommandFailed as e:
                log.info("leader duty interrupted", extra={"reason": str(e)})

    def _leader_view(self, changed: bool = True) -> LeaderView:
        assert self.raft is not None and self.identity is not None
        status = self.raft.status
        return LeaderView(state=self.snapshot(), term=status.term, own_id=self.identity.node_id,
                          own_raft_address=f"{self.advertise_ip}:{self.raft_port}", configured=status.partners,
                          contacts=status.contacts, changed=changed, caught_up=status.caught_up)

    def _voter_change(self) -> list[fx.Effect]:
        """The Raft configuration change the site needs now, if this node leads."""
        if self.raft is None or self.raft.status.role != "leader":
            return []
        change = self.leading.voter_change(self._leader_view())
        return [change] if change is not None else []

    async def _change_voters(self, change: fx.AddVoter | fx.RemoveVoter) -> None:
        """One Raft configuration change (pysyncobj takes one at a time; a second one would
        wait out its timeout, so a change already under way makes this one wait for the next pass)."""
        assert self.raft is not None
        if self._voter_change_lock.locked():
            return
        async with self._voter_change_lock:
            try:
                if isinstance(change, fx.AddVoter):
                    await self.raft.change_membership(add=change.address)
                    self.event("membership", f"{change.name} added to the Raft voters", node=change.name)
                else:
                    # A revoked (or departed) member leaves the Raft configuration: it no longer
                    # counts towards quorum and the leader stops sending it the log.
                    await self.raft.change_membership(remove=change.address)
                    self.event("membership", f"{change.name} removed from the Raft voters ({change.why})",
                               node=change.name)
            except CommandFailed as e:
                log.info("voter change pending", extra={"node": change.name, "reason": str(e)})

    async def supervise_loop(self) -> None:
        """Run what meshd.node.worker says this node runs; leave when it was revoked."""
        assert self.state_changed is not None and self.worker is not None
        changes = self.state_changed.listener()
        while True:
            state = self.snapshot()
            await self.execute(self.worker.step(state, self._revoked_notice,
                                                caught_up=self.raft is not None and self.raft.status.caught_up))
            self._cut_revoked(state)
            self._save_partners(state)
            await changes.wait(SUPERVISE_SAFETY_PERIOD)

    async def revoke(self, node, actor: str, reason: str) -> Result:
        """Revoke a member (meshd.node.trust): commit the revocation, then, only if it was
        applied, tell the node and rotate the Raft secret. Raises CommandFailed when the
        revocation did not commit."""
        assert self.identity is not None
        command = trust.revocation(self.snapshot(), node, actor, reason, self.root_signing_key(), time.time())
        if isinstance(command, Refused):
            return command
        result = await self.commit(command)
        await self.execute(trust.after_revocation(node, command, result, self.identity.node_id, self.config.name))
        return result

    # --- re-attestation (leader) -----------------------------------------------------------

    async def attestation_loop(self) -> None:
        """Leader: ask members that rebooted, or whose evidence is getting old, for fresh
        evidence (meshd.node.attesting decides who, and what the answer earns)."""
        assert self.state_changed is not None and self.identity is not None
        attesting = self.attesting = Attesting(leader_name=self.config.name, own_id=self.identity.node_id,
                                               interval=self.config.reattest_interval)
        changes = self.state_changed.listener()
        while True:
            await changes.wait(ATTEST_CHECK_PERIOD)
            if self.raft is None or self.raft.status.role != "leader":
                continue
            node = attesting.next_due(self.snapshot(), time.time(), time.monotonic())
            if node is None:
                continue
            nonce, issued_at = os.urandom(32), time.time()
            # The evidence authenticates the answer (signed by the node key, bound to our
            # nonce), so a member whose certificate expired offline can still be renewed.
            answer = await self.try_call_member(node, {"call": "attest", "nonce": nonce.hex()},
                                                "re-attestation postponed", timeout=ATTEST_TIMEOUT,
                                                verify_server=False)
            if answer is None:
                attesting.unreachable(node, time.monotonic())
                continue
            evidence = answer.get("evidence") if isinstance(answer, dict) else None
            try:
                await self.execute(attesting.appraise(self.snapshot(), node, evidence, nonce, issued_at, time.time(),
                                                      self.root_signing_key()))
            except CommandFailed as e:
                log.info("re-attestation outcome not committed", extra={"node": node.name, "reason": str(e)})
                attesting.unreachable(node, time.monotonic())

    async def _renew_certificate(self, state: SiteState, node) -> None:
        """Fresh evidence earns a fresh membership certificate (SPIRE-style renewal)."""
        if self.root_signing_key() is None or not state.root_cert:
            return
        cert = self.issue_certificate(state, node.public_key, node.site, node.node_id)
        await self.try_call_member(node, {"call": "certificate", "member_cert": cert},
                                   "certificate renewal postponed", timeout=ATTEST_TIMEOUT, verify_server=False)

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

    # --- Raft secret rotation ----------------------------------------------------------------

    async def call_member(self, node, call: dict, *, verify_server: bool = True,
                          expect: Callable[[dict | None], bool] | None = None,
                          on_stream: Callable[[dict], Awaitable[None]] | None = None,
                          timeout: float | None = SECRET_CALL_TIMEOUT) -> Any:
        """One member call to `node` over mutual TLS, as this node. By default the server's
        certificate must name that very member; raises OSError, PeerError or TooSlowError."""
        assert self.identity is not None and self.membership is not None
        if expect is None and verify_server:
            expect = self.cert_names(node.node_id)
        return await peer.member_call(node.address, node_id=self.identity.node_id,
                                      site_secret=self.membership.site_secret, call=call,
                                      context=self.tls.client_context(verify_server=verify_server),
                                      expect=expect, on_stream=on_stream, timeout=timeout)

    async def try_call_member(self, node, call: dict, failure: str, *, timeout: float = SECRET_CALL_TIMEOUT,
                              **options: Any) -> Any | None:
        """Best effort: the answer, or None after logging `failure` with the reason."""
        try:
            with trio.fail_after(timeout):
                return await self.call_member(node, call, **options)
        except (OSError, peer.PeerError, trio.TooSlowError) as e:  # OSError covers "no certificate yet"
            log.info(failure, extra={"node": node.name, "reason": str(e) or type(e).__name__})
            return None

    async def tell_revoked(self, node, revocations: dict) -> None:
        """Best effort, right after a revocation commits: hand the node the signed list that
        names it. Raft may never tell it (the leader drops it from the configuration, and the
        secret rotation cuts it off), and it must stop its workloads."""
        assert self.membership is not None
        mesh_id = self.membership.mesh_id
        await self.try_call_member(node, {"call": "revoked", "revocations": revocations}, "revoked node not reached",
                                   # it is no longer a member: check only that it is that node
                                   expect=lambda cert: (member_of(cert, mesh_id) or ("", ""))[1] == node.node_id)

    async def _distribute_secret(self, effect: fx.DistributeSecret) -> None:
        """After a revocation: a new Raft secret for every current member, so an expelled node
        that kept the old one can neither read nor inject. The epoch came from Raft (unique,
        increasing); the secret travels only over mutual TLS to certified current members.
        Members that miss it (down) fetch it when they come back (secret_watch_loop)."""
        secret = secrets.token_hex(32)
        for node in effect.members:
            await self.try_call_member(node, {"call": "rotate", "secret": secret, "epoch": effect.epoch},
                                       "rotation not delivered; the member fetches it later")
        await self._switch_secret(secret, effect.epoch)

    async def _switch_secret(self, secret: str, epoch: int) -> bool:
        """Adopt a newer site secret: save it, restart Raft with it. Older epochs are ignored."""
        assert self.membership is not None
        async with self._secret_switch:  # one Raft restart at a time, or two nodes would share a port
            if epoch <= self.membership.secret_epoch:
                return False
            self.membership.site_secret, self.membership.secret_epoch = secret, epoch
            self.membership.save(self.data_dir)
            if self.raft is not None:
                # The old node keeps answering reads (its last state) until the new one replaces
                # it; commands in between fail and are retried like any during an election.
                await trio.to_thread.run_sync(self.raft.close)
            self._start_raft()
        self.event("membership", f"Raft secret rotated (epoch {epoch})", epoch=epoch)
        return True

    async def secret_watch_loop(self) -> None:
        """A member cut off from its site's Raft for a while (no leader, or no quorum: with a
        stale secret every Raft connection fails) may have missed a rotation while it was
        down: it asks other members (certificate only) for the current secret."""
        assert self.identity is not None and self.membership is not None
        leaderless_since: float | None = None
        while True:
            await trio.sleep(SECRET_CHECK_PERIOD)
            if self.raft is None or not self.partitioned:
                leaderless_since = None
                continue
            now = time.monotonic()
            leaderless_since = leaderless_since or now
            if now - leaderless_since < SECRET_FETCH_AFTER:
                continue
            leaderless_since = now  # ask again only after another quiet spell
            for node in self.snapshot().nodes.values():
                if node.node_id == self.identity.node_id or node.admin in (ADMIN_LEFT, ADMIN_REVOKED):
                    continue
                answer = await self.try_call_member(node, {"call": "site_secret"}, "current secret not fetched")
                if isinstance(answer, dict) and _valid_secret(answer.get("secret")) \
                        and isinstance(answer.get("epoch"), int):
                    if await self._switch_secret(answer["secret"], answer["epoch"]):
                        break

    async def _expelled(self, message: str) -> None:
        """This node was revoked: stop every workload, remember it, and exit. A restart on
        this data dir refuses to run; the node key is refused by every member anyway."""
        assert self.supervisor is not None
        log.critical(message)
        await self.supervisor.stop_all()
        write_revoked_marker(self.data_dir, message)
        raise FatalStartupError(message + "; wipe the data dir to start this device over as a new node")

    def _save_partners(self, state: SiteState) -> None:
        """Remember the voters' Raft addresses, so a restart finds the site without mDNS."""
        if self.membership is None or not state.nodes:
            return
        own = f"{self.advertise_ip}:{self.raft_port}"
        partners = sorted(n.raft_address for n in state.nodes.values()
                          if n.voter and n.admin not in (ADMIN_LEFT, ADMIN_REVOKED) and n.raft_address != own)
        if partners != sorted(self.membership.partners):
            self.membership.partners = partners
            self.membership.save(self.data_dir)

    # --- main --------------------------------------------------------------------------

    async def run(self) -> None:
        from meshd.io.adminhandlers import AdminHandlers
        from meshd.io.admin import serve_admin

        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        self.identity = load_or_create_identity(self.data_dir)
        self.worker = Worker(self.identity.node_id)
        self.state_changed = Wakeup()
        self.reports_changed = Wakeup()
        self._choose_ports()
        self.mesh.open()
        self.membership = Membership.load(self.data_dir)
        revoked = read_revoked_marker(self.data_dir)
        if revoked:
            raise FatalStartupError(revoked + "; wipe the data dir to start this device over as a new node")
        if self.config.tpm:
            await self._open_tpm()
        admin_path = self.config.admin_socket or str(self.data_dir / "admin.sock")
        log.info("starting", extra={"node_id": self.identity.node_id, "node_name": self.config.name,
                                    "data_dir": str(self.data_dir), "peer": f"{self.advertise_ip}:{self.peer_port}"})
        self._check_ports_free()
        async with trio.open_nursery() as nursery:
            await nursery.start(LoopWatchdog().run)
            listeners = await trio.open_tcp_listeners(self.peer_port, host=self.listen_ip or None)
            nursery.start_soon(self._serve_peers, listeners)
            if self.config.mdns:
                self.discovery = Discovery(advertise_ip=self.advertise_ip, node_id=self.identity.node_id,
                                           site=self.membership.site if self.membership else self.config.site,
                                           peer_port=self.peer_port, fingerprint=self.identity.fingerprint,
                                           version=__version__)
            self.supervisor = Supervisor(self.data_dir, on_change=self.reports_changed.notify,
                                         log_max_bytes=self.config.log_max_bytes, log_keep=self.config.log_keep)
            await nursery.start(self.supervisor.run)
            handlers = AdminHandlers(self)
            await nursery.start(serve_admin, admin_path, handlers)
            try:
                if self.membership is not None:
                    self._start_raft()
                    self.event("membership", f"resumed membership of site {self.membership.site}")
                elif self.config.join:
                    await self._join_site()
                else:
                    await self._found_site()
            except FatalStartupError:
                await self._shutdown()
                raise
            assert self.membership is not None
            if self.discovery:
                self.discovery.update_site(self.membership.site)
                # zeroconf's announce waits for its own packets to go out; never on this loop.
                nursery.start_soon(trio.to_thread.run_sync, self.discovery.announce)
            nursery.start_soon(self.report_loop)
            nursery.start_soon(self.leader_loop)
            nursery.start_soon(self.supervise_loop)
            nursery.start_soon(self.attestation_loop)
            nursery.start_soon(self.secret_watch_loop)
            nursery.start_soon(self.mesh.dial_loop)
            nursery.start_soon(self.mesh.leader_loop)
            nursery.start_soon(self._watch_signals, nursery.cancel_scope)
            sd_notify("READY=1")
            log.info("ready", extra={"site": self.membership.site, "voter": self.membership.voter})
            nursery.start_soon(self._trim_heap_loop)
        # cancelled by a signal
        await self._shutdown()

    async def _open_tpm(self) -> None:
        """Open the TPM and measure the code about to run into it, before anything else."""
        device = TpmDevice(self.config.tpm, self.data_dir)
        try:
            await trio.to_thread.run_sync(device.open)
            await trio.to_thread.run_sync(device.measure, package_digest())
        except TpmUnavailable as e:
            raise FatalStartupError(str(e)) from None
        self.tpm = device

    async def evidence(self, nonce: bytes, credential: bytes = b"") -> dict:
        assert self.identity is not None
        return await trio.to_thread.run_sync(node_evidence, self.identity, nonce, self.config, self.tpm, credential)

    async def _trim_heap_loop(self) -> None:
        """Give start-up's freed memory back soon after start, then now and then."""
        await trio.sleep(HEAP_TRIM_FIRST)
        while True:
            trim_heap()
            await trio.sleep(HEAP_TRIM_PERIOD)

    async def _serve_peers(self, listeners) -> None:
        limiter = trio.CapacityLimiter(peer.MAX_PEER_CONNECTIONS)

        async def handle(stream: trio.SocketStream) -> None:
            async with limiter:
                await peer.serve_peer_connection(
                    stream, on_join=self.handle_join, on_member_call=self.handle_member_call,
                    member_secret=lambda: self.membership.site_secret if self.membership and self.raft else None,
                    is_member=self.is_member, tls=self.tls.server_context, cert_member=self.cert_member,
                    track=self._track_member, on_sync=self._serve_sync, sync_member=self.sync_member)

        await trio.serve_listeners(handle, listeners)

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
        document: a member of this mesh, of any site, that `_may_connect` allows."""
        if self.membership is None:
            return None
        named = member_of(peer_cert, self.membership.mesh_id)
        if named is None or not self._may_connect(self.snapshot(), *named):
            return None
        return named

    def _may_connect(self, state: SiteState, site: str, node_id: str) -> bool:
        """Whether a node of this mesh may open or keep a connection to us (meshd.node.access)."""
        assert self.membership is not None
        return access.may_connect(state, self.membership.site, site, node_id, self._listed_revoked(state))

    def _listed_revoked(self, state: SiteState) -> frozenset[str]:
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

    async def _serve_sync(self, conn: peer.FramedStream, stream: trio.abc.Stream, named: tuple[str, str]) -> None:
        if self.raft is None or self.mesh.hub is None:
            raise peer.PeerError("this node is not a member of any site yet")
        await self.mesh.serve(conn, stream, named)

    def cert_names(self, node_id: str) -> Callable[[dict | None], bool]:
        """For a client: does the server's verified certificate name this member?"""
        def names_it(cert: dict | None) -> bool:
            named = self.cert_member(cert)
            return named is not None and named[1] == node_id
        return names_it

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
        if self.membership is None:
            return
        for (site, node_id), scopes in self._member_scopes.items():
            if scopes and not self._may_connect(state, site, node_id):
                log.info("cutting the open connections of a revoked member",
                         extra={"node_id": node_id, "site": site})
                for scope in list(scopes):
                    scope.cancel()

    async def handle_member_call(self, call: dict, send_stream) -> Any:
        from meshd.io.adminhandlers import serve_local_logs
        if call.get("call") == "attest":
            nonce = call.get("nonce")
            if not isinstance(nonce, str) or not 32 <= len(nonce) <= 128:
                raise peer.PeerError("attest needs a hex nonce")
            try:
                raw_nonce = bytes.fromhex(nonce)
            except ValueError:
                raise peer.PeerError("attest needs a hex nonce") from None
            return {"evidence": await self.evidence(raw_nonce)}
        if call.get("call") == "revoked":
            # Trust the list, not the caller: it must be signed by the mesh root and name us.
            state = self.snapshot()
            assert self.identity is not None
            try:
                listed = open_revocations(call.get("revocations"), bytes.fromhex(state.trust_root))
            except (ValueError, AttestationError) as e:
                raise peer.PeerError(f"not a valid revocation list: {e}") from None
            if not listed.is_revoked(self.identity.node_id):
                raise peer.PeerError("the revocation list does not name this node")
            entry = listed.entries[self.identity.node_id]
            self._revoked_notice = f"revoked by {entry.by}" + (f": {entry.reason}" if entry.reason else "")
            assert self.state_changed is not None
            self.state_changed.notify()  # the supervise loop acts on it
            return {"stopping": True}
        if call.get("call") == "rotate":
            secret, epoch = call.get("secret"), call.get("epoch")
            if not _valid_secret(secret) or not isinstance(epoch, int) or isinstance(epoch, bool):
                raise peer.PeerError("rotate needs a 64-hex-digit secret and an integer epoch")
            assert isinstance(secret, str)
            switched = await self._switch_secret(secret, epoch)
            return {"epoch": self.membership.secret_epoch if self.membership else 0, "switched": switched}
        if call.get("call") == "site_secret":
            assert self.membership is not None
            return {"secret": self.membership.site_secret, "epoch": self.membership.secret_epoch}
        if call.get("call") == "certificate":
            pem = call.get("member_cert")
            try:
                await trio.to_thread.run_sync(self.tls.install_certificate, pem if isinstance(pem, str) else "")
            except (ValueError, OSError, ssl.SSLError) as e:
                raise peer.PeerError(f"certificate not installed: {e}") from None
            return {"installed": True}
        if call.get("call") == "logs":
            return await serve_local_logs(self, str(call.get("alloc", "")), bool(call.get("follow")),
                                          call.get("tail"), send_stream)
        raise peer.PeerError(f"unknown member call {call.get('call')!r}")

    async def _watch_signals(self, cancel_scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("stopping", extra={"signal": signal.Signals(signum).name})
                self.stopping = True
                cancel_scope.cancel()
                return

    async def _shutdown(self) -> None:
        sd_notify("STOPPING=1")
        with trio.CancelScope(shield=True):
            if self.supervisor is not None:
                await self.supervisor.stop_all()
            if self.discovery is not None:
                await trio.to_thread.run_sync(self.discovery.close)
            if self.raft is not None:
                await trio.to_thread.run_sync(self.raft.close)
            if self.tpm is not None:
                await trio.to_thread.run_sync(self.tpm.close)
            self.mesh.close()
        admin_path = self.config.admin_socket or str(self.data_dir / "admin.sock")
        try:
            os.unlink(admin_path)
        except OSError:
            pass
        log.info("stopped")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line on stderr: journald and log shippers read it as is."""

    RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                 "msg": record.getMessage()}
        for key, value in record.__dict__.items():
            if key not in self.RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("zeroconf", "pysyncobj"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
