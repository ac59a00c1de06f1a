"""`meshd run`: one daemon's runtime. It builds the node's context (meshd.io.context) and its
services (meshd.io.services), one per concern, and starts them with `nursery.start`; the
decisions are all the node core's (meshd.node).

Start order: identity, ports and the mesh document replica; the watchdog (and systemd's
watchdog pings, meshd.io.sdnotify); the peer port and the admin socket (a joining node
answers `status`); the supervisor; membership (resume, join or found, as
meshd.node.joining.start_path decided); then every member's services. SIGTERM/SIGINT cancel
the nursery and shutdown stops the workloads, Raft and the TPM, and flushes the replica.

Invariants:
- Only this package touches sockets, threads, processes and clocks.
- A daemon whose event loop wedges exits (the watchdog), so it cannot look alive while
  doing nothing; its loop also stops pinging systemd's watchdog, which restarts it should it
  not exit.
- Nothing is announced by mDNS before this node is a member.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket

import trio

from meshd import __version__, tokens
from meshd.config import NodeConfig
from meshd.exitcodes import EXIT_CONFIG, EXIT_ERROR, EXIT_LOCKED, EXIT_NOPERM, EXIT_PORT_IN_USE, EXIT_REVOKED
from meshd.io import cgroups, devices
from meshd.io.admin import serve_admin
from meshd.io.adminhandlers import AdminHandlers
from meshd.io.attester import package_digest, started_digest
from meshd.io.context import FatalStartupError, NodeContext, advertise_mismatch, local_ips
from meshd.io.fdlimit import NEEDED, raise_fd_limit
from meshd.io.logfiles import iso_time
from meshd.io.devices import DeviceSet
from meshd.io.identity import (DataDirError, DataDirLocked, Membership, check_certificates, lock_data_dir,
                               load_or_create_identity, load_ports, read_revoked_marker, save_ports)
from meshd.io.mdns import Discovery
from meshd.io.ports import free_port
from meshd.io.memory import trim_heap
from meshd.io.mesh import MeshSync
from meshd.io.metrics import serve_metrics
from meshd.io.sdnotify import ping_watchdog, sd_notify, sd_status, watchdog_ping_interval
from meshd.io.services.artifacts import ArtifactService
from meshd.io.services.attestation import AttestationService
from meshd.io.services.beats import BeatService
from meshd.io.services.leader import LeaderService
from meshd.io.services.membership import MembershipService
from meshd.io.services.peers import PeerService
from meshd.io.services.trust import TrustService
from meshd.io.services.worker import WorkerService
from meshd.io.supervisor import Supervisor
from meshd.io.tpm import TpmDevice, TpmUnavailable
from meshd.io.watchdog import LoopWatchdog
from meshd.node.joining import FOUND, JOIN, RESUME, start_conflict, start_path

__all__ = ["FatalStartupError", "Runtime", "setup_logging"]

log = logging.getLogger("meshd.daemon")

# Returning freed heap to the kernel: once start-up settled (joins, first reports), then on
# this period (a trim walks the heap: cheap, but not free).
HEAP_TRIM_FIRST = 5.0
HEAP_TRIM_PERIOD = 300.0


# The data dir: traversable, not listable, by others (see Runtime._take_data_dir).
DATA_DIR_MODE = 0o711

class Runtime:
    """The wiring of one daemon: a context and its services."""

    def __init__(self, config: NodeConfig) -> None:
        self._lock_fd: int | None = None  # the data dir's lock, held while this daemon runs
        self._start_way: str | None = None  # RESUME, JOIN or FOUND (meshd.node.joining.start_path)
        ctx = self.ctx = NodeContext(config)
        ctx.mesh = MeshSync(ctx)  # the mesh document replica and cross-site sync
        self.membership = MembershipService(ctx)
        self.worker = WorkerService(ctx)
        self.leader = LeaderService(ctx)
        self.trust = TrustService(ctx)
        self.attestation = AttestationService(ctx)
        self.beats = BeatService(ctx)
        self.artifacts = ctx.artifacts = ArtifactService(ctx)
        self.peers = PeerService(ctx, voter_changes=self.leader.voter_changes, switch_secret=self.trust.switch_secret,
                                 become_voter=self.trust.become_voter)
        self.admin = AdminHandlers(ctx, revoke=self.trust.revoke)

    async def run(self) -> None:
        ctx = self.ctx
        self._take_data_dir()
        revoked = read_revoked_marker(ctx.data_dir)
        if revoked:
            raise FatalStartupError(revoked + "; wipe the data dir to start this device over as a new node",
                                    EXIT_REVOKED)
        try:
            ctx.identity = load_or_create_identity(ctx.data_dir)
            ctx.membership = Membership.load(ctx.data_dir)
            if ctx.membership is not None:
                check_certificates(ctx.data_dir)
        except DataDirError as e:
            raise FatalStartupError(str(e)) from None
        self._check_config_against_data_dir()
        ctx.open_wakeups()
        self.artifacts.open()
        self._choose_ports()
        ctx.mesh.open()
        # What this process runs, measured before anything else (a few ms): the digest it
        # reports, so a restart into other software is re-attested at once.
        await trio.to_thread.run_sync(started_digest)
        if ctx.config.tpm:
            await self._open_tpm()
        admin_path = ctx.config.admin_socket or str(ctx.data_dir / "admin.sock")
        log.info("starting", extra={"node_id": ctx.identity.node_id, "node_name": ctx.config.name,
                                    "data_dir": str(ctx.data_dir), "peer": f"{ctx.advertise_ip}:{ctx.peer_port}"})
        mismatch = advertise_mismatch(ctx.listen_ip.strip("[]"), ctx.advertise_ip, local_ips())
        if mismatch is not None:
            log.warning(f"this node {mismatch}", extra={"listen": ctx.config.listen, "advertise": ctx.advertise_ip})
        self._check_ports_free()
        before, fds, hard = raise_fd_limit()
        if fds < NEEDED:
            log.warning("the file-descriptor limit is low: floods will be shed sooner",
                        extra={"limit": fds, "hard_limit": hard, "needed": NEEDED})
        elif fds != before:
            log.info("raised the file-descriptor limit", extra={"from": before, "to": fds})
        async with trio.open_nursery() as nursery:
            # first: a SIGTERM during start-up (a join that waits for its site) still stops
            # the daemon cleanly, its workloads and Raft included
            nursery.start_soon(self._watch_signals, nursery.cancel_scope)
            # It also watches the Raft thread, once there is one.
            raft_stalled = lambda now, awake: ctx.raft.stalled_for(now, awake) if ctx.raft else None  # noqa: E731
            await nursery.start(LoopWatchdog(watch_also=raft_stalled).run)
            ping_interval = watchdog_ping_interval(os.environ, os.getpid())
            if ping_interval is not None:  # systemd's WatchdogSec=: pings from this loop
                await nursery.start(ping_watchdog, ping_interval)
                log.info("pinging the service manager's watchdog", extra={"interval_s": ping_interval})
            await nursery.start(self.peers.run)
            if ctx.config.mdns:
                ctx.discovery = Discovery(advertise_ip=ctx.advertise_ip, node_id=ctx.identity.node_id,
                                          site=ctx.membership.site if ctx.membership else ctx.config.site,
                                          peer_port=ctx.peer_port, fingerprint=ctx.identity.fingerprint,
                                          version=__version__)
            assert ctx.reports_changed is not None
            ctx.supervisor = Supervisor(ctx.data_dir, on_change=ctx.reports_changed.notify,
                                        log_max_bytes=ctx.config.log_max_bytes, log_keep=ctx.config.log_keep,
                                        workload_user=ctx.config.workload_user, limits=self._open_cgroups(),
                                        devices=DeviceSet(devices.found(ctx.config.devices)),
                                        artifacts=self.artifacts)
            found = ctx.supervisor.devices.devices
            if found:
                names = devices.nvidia_names() if any(d.kind == "gpu" for d in found) else {}
                log.info("devices found", extra={"devices": devices.counts(found),
                                                 **({"gpus": names} if names else {})})
            await nursery.start(ctx.supervisor.run)
            await nursery.start(serve_admin, admin_path, self.admin)
            await self._serve_metrics(nursery)
            sd_status(self._establishing())
            try:
                assert self._start_way is not None
                await self.membership.establish(self._start_way)
            except FatalStartupError:
                await self._shutdown()
                raise
            assert ctx.membership is not None
            if ctx.discovery:
                ctx.discovery.update_site(ctx.membership.site)
                # zeroconf's announce waits for its own packets to go out; never on this loop.
                nursery.start_soon(trio.to_thread.run_sync, ctx.discovery.announce)
            for service in (self.worker, self.leader, self.attestation, self.trust, self.beats, self.artifacts):
                await nursery.start(service.run)
            nursery.start_soon(ctx.mesh.dial_loop)
            nursery.start_soon(ctx.mesh.leader_loop)
            nursery.start_soon(ctx.mesh.compaction_loop)
            sd_notify("READY=1")
            sd_status(f"member of site {ctx.membership.site}"
                      + (" (voter)" if ctx.membership.voter else " (non-voter)"))
            log.info("ready", extra={"site": ctx.membership.site, "voter": ctx.membership.voter})
            nursery.start_soon(self._trim_heap_loop)
        # cancelled by a signal
        await self._shutdown()

    def _establishing(self) -> str:
        """What start-up waits for, as the service manager's STATUS= line."""
        ctx = self.ctx
        if self._start_way == RESUME and ctx.membership is not None:
            return f"resuming membership of site {ctx.membership.site}"
        if self._start_way == JOIN and ctx.config.join:
            return f"joining site {tokens.parse_token(ctx.config.join).site}"
        assert self._start_way == FOUND
        return f"founding site {ctx.config.site} of a new mesh"

    def _take_data_dir(self) -> None:
        """Create the data dir and lock it for this daemon, or refuse to start. Mode 0711: nobody
        else lists it or reads a file of it (each is 0600), but a workload running as its own
        user reaches its allocation's directory by its path (its HOME)."""
        ctx = self.ctx
        try:
            ctx.data_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(ctx.data_dir, DATA_DIR_MODE)
            self._lock_fd = lock_data_dir(ctx.data_dir)
        except DataDirLocked as e:
            raise FatalStartupError(f"data dir {ctx.data_dir} is in use by another meshd (pid {e.pid}); stop it first, "
                                    f"or give this one its own --data-dir", EXIT_LOCKED) from None
        except OSError as e:
            denied = isinstance(e, PermissionError)
            raise FatalStartupError(f"cannot use data dir {ctx.data_dir}: {e.strerror or e}"
                                    + (" (run as root, or give a --data-dir this user owns)" if denied else ""),
                                    EXIT_NOPERM if denied else EXIT_ERROR) from None

    def _check_config_against_data_dir(self) -> None:
        """Refuse a --site or --join that the data dir's membership contradicts (start_conflict),
        and bootstrap = join without a token on a data dir with no membership (start_path)."""
        ctx = self.ctx
        token_site = None
        if ctx.config.join:
            try:
                token_site = tokens.parse_token(ctx.config.join).site
            except tokens.TokenError as e:
                raise FatalStartupError(f"--join: {e}", EXIT_CONFIG) from None
        conflict = start_conflict(stored_site=ctx.membership.site if ctx.membership else None,
                                  config_site=ctx.config.site, site_given="site" in ctx.config.given,
                                  token_site=token_site)
        if conflict is not None:
            raise FatalStartupError(conflict, EXIT_CONFIG)
        path = start_path(member=ctx.membership is not None, bootstrap=ctx.config.bootstrap,
                          token=ctx.config.join is not None, data_dir=str(ctx.data_dir),
                          config_file=ctx.config.config_file)
        if path.way is None:
            raise FatalStartupError(path.refusal or "this node may not start", EXIT_CONFIG)
        self._start_way = path.way

    def _choose_ports(self) -> None:
        ctx = self.ctx
        saved = load_ports(ctx.data_dir)
        listen_port = int(ctx.config.listen.rpartition(":")[2])
        if listen_port:
            ctx.peer_port, ctx.raft_port = listen_port, listen_port + 1
        elif saved:
            # Port 0 picks free ports once; a restarted node keeps them, because the other
            # voters know it by its Raft address.
            ctx.peer_port, ctx.raft_port = saved["peer_port"], saved["raft_port"]
        elif ctx.membership is not None:
            # No usable record of them (lost, damaged): the ports the site knows this member by.
            ctx.peer_port, ctx.raft_port = ctx.membership.peer_port, ctx.membership.raft_port
        else:
            ctx.peer_port = free_port(ctx.listen_ip)
            ctx.raft_port = free_port(ctx.listen_ip, avoid=(ctx.peer_port,))
        save_ports(ctx.data_dir, ctx.peer_port, ctx.raft_port, saved)

    def _check_ports_free(self) -> None:
        """Refuse to start, with the reason, when the peer port or the Raft port (peer + 1
        when --listen names a port) is taken: Raft would otherwise retry its bind forever."""
        ctx = self.ctx
        family = socket.AF_INET6 if ":" in (ctx.listen_ip or "") else socket.AF_INET
        for what, port in (("peer", ctx.peer_port), ("Raft", ctx.raft_port)):
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the real listeners do
                try:
                    probe.bind((ctx.listen_ip or "", port))
                except OSError as e:
                    denied = isinstance(e, PermissionError)
                    hint = ("ports below 1024 need root or CAP_NET_BIND_SERVICE" if denied
                            else "--listen PORT takes PORT and PORT+1")
                    raise FatalStartupError(f"cannot listen on {ctx.listen_ip or '*'}:{port} for {what} traffic: "
                                            f"{e.strerror or e} ({hint})",
                                            EXIT_NOPERM if denied else EXIT_PORT_IN_USE) from None

    def _open_cgroups(self) -> cgroups.Cgroups:
        """This node's cgroup subtree (meshd.io.cgroups); what it cannot enforce is said once."""
        assert self.ctx.identity is not None
        limits = cgroups.Cgroups.found(self.ctx.identity.node_id[:16])
        limits.open()
        if limits.enforceable:
            log.info("workload limits enforced", extra={"cgroup": f"v{limits.hierarchy.version}",
                                                        "controllers": sorted(limits.enforceable)})
        if limits.enforceable != frozenset(cgroups.CONTROLLERS):
            missing = sorted(frozenset(cgroups.CONTROLLERS) - limits.enforceable)
            log.warning(f"this node cannot enforce {', '.join(missing)} limits: apps that set them in "
                        "[app.resources] are not placed here", extra={"reason": limits.problem})
        return limits

    async def _serve_metrics(self, nursery: trio.Nursery) -> None:
        """The Prometheus endpoint (meshd.io.metrics). A port the operator named that cannot be
        had stops the start; the default one taken (another daemon on this host) only leaves
        this daemon without it, said in a warning (`meshctl metrics` still answers)."""
        ctx = self.ctx
        endpoint = ctx.config.metrics_endpoint
        if endpoint is None:
            return
        try:
            ctx.metrics_address = await nursery.start(serve_metrics, *endpoint, ctx.metrics.render)
        except OSError as e:
            where = f"{endpoint[0]}:{endpoint[1]}"
            if "metrics" in ctx.config.given:
                raise FatalStartupError(f"cannot serve metrics on {where}: {e.strerror or e} "
                                        "(--metrics IP:PORT, or off)", EXIT_PORT_IN_USE) from None
            log.warning(f"metrics endpoint off: {where} is taken ({e.strerror or e}); "
                        "set --metrics IP:PORT or off to choose")
            return
        log.info("serving metrics", extra={"address": "%s:%d" % ctx.metrics_address})

    async def _open_tpm(self) -> None:
        """Open the TPM and measure the code about to run into it, before anything else."""
        ctx = self.ctx
        device = TpmDevice(ctx.config.tpm, ctx.data_dir)
        try:
            await trio.to_thread.run_sync(device.open)
            await trio.to_thread.run_sync(device.measure, package_digest())
        except TpmUnavailable as e:
            raise FatalStartupError(str(e)) from None
        ctx.tpm = device

    async def _trim_heap_loop(self) -> None:
        """Give start-up's freed memory back soon after start, then now and then."""
        await trio.sleep(HEAP_TRIM_FIRST)
        while True:
            trim_heap()
            await trio.sleep(HEAP_TRIM_PERIOD)

    async def _watch_signals(self, cancel_scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("stopping", extra={"signal": signal.Signals(signum).name})
                self.ctx.stopping = True
                cancel_scope.cancel()
                return

    async def _shutdown(self) -> None:
        ctx = self.ctx
        sd_notify("STOPPING=1")
        sd_status("stopping its workloads and Raft, flushing its state")
        with trio.CancelScope(shield=True):
            if ctx.supervisor is not None:
                await ctx.supervisor.stop_all()
            if ctx.discovery is not None:
                await trio.to_thread.run_sync(ctx.discovery.close)
            if ctx.raft is not None:
                await trio.to_thread.run_sync(ctx.raft.close)
            if ctx.tpm is not None:
                await trio.to_thread.run_sync(ctx.tpm.close)
            ctx.mesh.close()
        admin_path = ctx.config.admin_socket or str(ctx.data_dir / "admin.sock")
        try:
            os.unlink(admin_path)
        except OSError:
            pass
        if self._lock_fd is not None:  # last: the data dir is no longer used
            os.close(self._lock_fd)
            self._lock_fd = None
        log.info("stopped")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line on stderr: journald and log shippers read it as is."""

    RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": iso_time(record.created), "ts": round(record.created, 3),
                 "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
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
