"""This daemon's Prometheus exposition: what it counts as things happen (`DaemonMetrics`), what
it reads from its state and its parts at each scrape (`_Scrape`), and the small HTTP endpoint
that serves it (`serve_metrics`; `meshctl metrics` gets the same text over the admin socket).

Invariants:
- One registry per daemon, never prometheus_client's global one: two daemons in one process
  (the tests) never mix their figures.
- Label values come from bounded sets only: command ops, allocation, node and deployment
  states, Raft roles, outcomes, event kinds, and the sites of the mesh (bounded by the mesh).
  Never a node name, an app name or an allocation id.
- A scrape only reads: it changes nothing, and makes no pass over the mesh document.
- Counters count from this daemon's start (Prometheus handles the reset of a restart); a
  site-wide gauge (`meshd_site_*`) is this member's view of the site.
- The endpoint answers `GET /metrics` (and `HEAD`); anything else gets 404 or 405. It reads at
  most MAX_REQUEST_BYTES of a request within REQUEST_TIMEOUT and holds at most
  MAX_CONNECTIONS at once (more are closed at once), so nobody can pile connections on it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterator

import trio
from prometheus_client import CollectorRegistry, Counter, ProcessCollector, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from meshd import __version__
from meshd.state import ALLOC_STATES, DEPLOY_STATES, NODE_STATES

if TYPE_CHECKING:
    from meshd.io.context import NodeContext

# `_created` series beside every counter double the exposition and tell nothing a scraper
# needs (process_start_time_seconds says when counting began); process-wide, as the daemon is.
disable_created_metrics()

# A scraper's request is one line and a few headers; past this it is not one.
MAX_REQUEST_BYTES = 8192
# A scraper sends its request at once; one that dribbles is dropped after this.
REQUEST_TIMEOUT = 5.0
# Prometheus scrapes a target with one connection at a time; a few more for people with curl.
MAX_CONNECTIONS = 16
# Raft roles as the status shows them, and `recovering` (meshd.io.raft): a fixed set of labels.
# The text format generate_latest writes, as every Prometheus since 2.0 reads it (newer clients
# announce 1.0.0, which older servers do not know).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RAFT_ROLES = ("leader", "follower", "candidate", "nonvoter", "recovering")
JOIN_OUTCOMES = ("admitted", "refused")
COMMAND_OUTCOMES = ("ok", "refused", "not_committed")


class DaemonMetrics:
    """The registry of one daemon, and the counters its services bump."""

    def __init__(self, ctx: NodeContext) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(namespace="meshd", registry=self.registry)  # CPU seconds, RSS, fds of this process
        self.commands = Counter("meshd_commands", "Commands this daemon submitted through Raft, by outcome",
                                ("op", "outcome"), registry=self.registry)
        self.liveness_transitions = Counter(
            "meshd_liveness_transitions", "Members this daemon, as leader, marked down or ready again",
            ("to",), registry=self.registry)
        self.joins = Counter("meshd_joins", "Joins this daemon answered, by outcome", ("outcome",),
                             registry=self.registry)
        self.events = Counter("meshd_events", "Events this daemon wrote to its log, by kind", ("kind",),
                              registry=self.registry)
        for outcome in JOIN_OUTCOMES:
            self.joins.labels(outcome)  # present at 0 from the start: rate() sees the first one
        for to in ("down", "ready"):
            self.liveness_transitions.labels(to)
        self.registry.register(_Scrape(ctx))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Scrape(Collector):
    """What a scrape reads from the daemon's parts as they are now."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator:
        ctx = self.ctx
        state = ctx.snapshot()
        own_id = ctx.identity.node_id if ctx.identity else ""
        own = state.nodes.get(own_id)
        site = ctx.membership.site if ctx.membership else ctx.config.site
        info = InfoMetricFamily("meshd_build", "This daemon's version, name and site")
        info.add_metric([], {"version": __version__, "node": ctx.config.name, "site": site})
        yield info

        yield from self._raft()
        # This node as the site records it: what placement sees of it.
        resources = own.resources if own is not None else None
        yield _gauge("meshd_node_cpu_cores", "Logical cores of this node", resources and resources.cpu_total)
        yield _gauge("meshd_node_cpu_free_cores", "Cores idle over this node's last sample",
                     resources and resources.cpu_free)
        yield _gauge("meshd_node_memory_bytes", "Memory of this node",
                     resources and resources.mem_total_mb * 1024 * 1024)
        yield _gauge("meshd_node_memory_available_bytes", "Memory available on this node at its last sample",
                     resources and resources.mem_free_mb * 1024 * 1024)
        yield _gauge("meshd_node_clock_skew_seconds",
                     "This node's clock less its leader's, at its last re-attestation",
                     own.clock_skew_s if own is not None else 0.0)

        allocs = GaugeMetricFamily("meshd_allocations", "Allocations of this node in the site's state, by state",
                                   labels=("state",))
        mine = state.allocs.on_node(own_id) if own_id else []
        for name in ALLOC_STATES:
            allocs.add_metric([name], sum(1 for a in mine if a.state == name))
        yield allocs
        nodes = GaugeMetricFamily("meshd_site_nodes", "Members of this node's site, by state (this member's view)",
                                  labels=("state",))
        for name in NODE_STATES:
            nodes.add_metric([name], sum(1 for n in state.nodes.values() if n.state == name))
        yield nodes
        deployments = GaugeMetricFamily("meshd_site_deployments",
                                        "Apps of this site by the state of their latest deployment", labels=("state",))
        latest = [record.deployment for record in state.apps.values() if record.deployment is not None]
        for name in DEPLOY_STATES:
            deployments.add_metric([name], sum(1 for d in latest if d.state == name))
        yield deployments

        supervisor = ctx.supervisor
        counts = supervisor.counts if supervisor is not None else {}
        yield _counter("meshd_workload_starts", "Workload processes this node started", counts.get("starts", 0))
        yield _counter("meshd_workload_restarts", "Workloads this node restarted after they ended or fell ill",
                       counts.get("restarts", 0))
        yield _counter("meshd_workload_oom_kills", "Workload runs killed for their memory limit",
                       counts.get("oom_kills", 0))
        checks = CounterMetricFamily("meshd_health_checks", "Health checks this node ran, by result",
                                     labels=("result",))
        checks.add_metric(["passed"], counts.get("health_passed", 0))
        checks.add_metric(["failed"], counts.get("health_failed", 0))
        yield checks
        served = ctx.artifacts.counts if ctx.artifacts is not None else {}
        pieces = CounterMetricFamily("meshd_artifact_bytes", "Artifact piece bytes this node fetched from peers and "
                                     "served to them", labels=("direction",))
        pieces.add_metric(["fetched"], served.get("fetched_bytes", 0))
        pieces.add_metric(["served"], served.get("served_bytes", 0))
        yield pieces
        yield _counter("meshd_artifact_rejected_pieces", "Artifact pieces refused: their digest or size was not "
                       "the manifest's (a lying or damaged peer)", served.get("rejected_pieces", 0))
        yield from self._document()

    def _raft(self) -> Iterator:
        raft = self.ctx.raft.status if self.ctx.raft is not None else None
        role = "recovering" if raft is not None and raft.recovering else (raft.role if raft else "")
        roles = GaugeMetricFamily("meshd_raft_role", "1 for this node's Raft role", labels=("role",))
        for name in RAFT_ROLES:
            roles.add_metric([name], 1.0 if name == role else 0.0)
        yield roles
        yield _gauge("meshd_raft_term", "Raft term", raft and raft.term)
        yield _gauge("meshd_raft_commit_index", "Raft commit index", raft and raft.commit_index)
        yield _gauge("meshd_raft_last_applied", "Raft log entries applied to the state", raft and raft.last_applied)
        yield _gauge("meshd_raft_has_quorum", "1 while this node's Raft has a quorum",
                     raft is not None and raft.has_quorum)
        heard = raft.leader_heard_at if raft is not None else 0.0
        # NaN until this node ever heard a leader (a gauge's "unknown"), never a made-up age
        yield _gauge("meshd_raft_leader_last_contact_seconds", "Seconds since this node last heard its Raft leader",
                     time.monotonic() - heard if heard else float("nan"))

    def _document(self) -> Iterator:
        mesh = self.ctx.mesh
        if mesh is None:
            return
        sent, received = mesh.sent_by_site(), mesh.received_by_site()
        out = CounterMetricFamily("meshd_sync_sent_bytes", "Document sync bytes sent on the wire, by peer site",
                                  labels=("site",))
        for site, (wire, _) in sorted(sent.items()):
            out.add_metric([site], wire)
        yield out
        into = CounterMetricFamily("meshd_sync_received_bytes",
                                   "Document sync bytes received on the wire, by peer site", labels=("site",))
        for site, wire in sorted(received.items()):
            into.add_metric([site], wire)
        yield into
        sessions = GaugeMetricFamily("meshd_sync_sessions", "Live document sync sessions, by peer site",
                                     labels=("site",))
        live: dict[str, int] = {}
        for session in mesh.hub.live_sessions():
            live[mesh.site_of(session)] = live.get(mesh.site_of(session), 0) + 1
        for site, count in sorted(live.items()):
            sessions.add_metric([site], count)
        yield sessions
        yield _gauge("meshd_document_log_bytes", "Bytes of this node's document log since its last compaction",
                     mesh.store.log_bytes if mesh.store else 0)
        yield _gauge("meshd_document_history_bytes", "Update bytes the document took since its epoch began",
                     mesh.hub.grown)


def _gauge(name: str, documentation: str, value: object) -> GaugeMetricFamily:
    """None and False as 0, True as 1; NaN stays NaN."""
    return GaugeMetricFamily(name, documentation, value=float(value) if value else 0.0)  # type: ignore[arg-type]


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=float(value))


async def serve_metrics(host: str, port: int, render, *,
                        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `render()` (the exposition's bytes) at http://host:port/metrics; started with
    the address it listens on (port 0 picks one). OSError when the port cannot be had."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[:2]
    open_now = [0]

    async def handle(stream: trio.SocketStream) -> None:
        if open_now[0] >= MAX_CONNECTIONS:
            await trio.aclose_forcefully(stream)
            return
        open_now[0] += 1
        try:
            with trio.move_on_after(REQUEST_TIMEOUT):
                await _answer(stream, render)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            open_now[0] -= 1
            await trio.aclose_forcefully(stream)

    task_status.started((bound[0], bound[1]))
    await trio.serve_listeners(handle, listeners)


async def _answer(stream: trio.SocketStream, render) -> None:
    request = b""
    while b"\r\n\r\n" not in request and b"\n\n" not in request:
        chunk = await stream.receive_some(MAX_REQUEST_BYTES)
        if not chunk:
            return
        request += chunk
        if len(request) > MAX_REQUEST_BYTES:
            await stream.send_all(_response(431, b"request too large\n"))
            return
    method, _, rest = request.split(b"\n", 1)[0].decode("latin-1").strip().partition(" ")
    path = rest.split(" ", 1)[0].split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        await stream.send_all(_response(405, b"only GET\n", extra="Allow: GET, HEAD\r\n"))
    elif path != "/metrics":
        await stream.send_all(_response(404, b"the metrics are at /metrics\n"))
    else:
        body = render()
        await stream.send_all(_response(200, body, content_type=CONTENT_TYPE, head=method == "HEAD"))


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 431: "Request Header Fields Too Large"}


def _response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8", extra: str = "",
              head: bool = False) -> bytes:
    head_lines = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n")
    return head_lines.encode() + (b"" if head else body)
