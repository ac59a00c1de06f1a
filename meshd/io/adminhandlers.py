"""What each `meshctl` request does on the daemon (see CONTRACT.md for the JSON fields).

Invariants:
- Read requests answer from this node's copy of the replicated state; they work on a
  partitioned node too (and say so in `status`). A member rebuilding its state from the
  site (its own was damaged and set aside: `recovering` in `status`) answers none of them
  until it holds the site's state: an empty state served as the site's is a lie. Nor does
  a member whose Raft has not yet replayed its own journal since the daemon started (after
  a restart of Raft alone, a secret rotation, the view from before it serves meanwhile), nor
  one whose history a checkpoint found is not the site's (SiteState.diverged).
- Write requests go through Raft. They are refused with a clear error when the site has no
  quorum, and retried with the same request id while it is briefly leaderless, so an
  acknowledged change is committed and an unacknowledged one is applied at most once.
- A bad request (unknown command, bad arguments, bad spec) raises AdminError with a reason
  and changes nothing.
"""

from __future__ import annotations

import dataclasses
import pwd
import re
import secrets
import time
import uuid
from typing import Any, Awaitable, Callable

import trio

from crdt.document import SyncError
from crdt.schema import (RECORD_KINDS, AppEdit, AppSiteStatus, DroppedAudit, NodeSummary, SchemaError, SignedRecord,
                         RolloutControl, SiteSummary, app_status_key)
from crdt.schema import AuditRecord as DocAuditRecord

from attestation.policy import MAX_CLOCK_SKEW
from attestation.evidence import HEX_DIGEST, SOFTWARE_EVIDENCE, TPM_EVIDENCE, VERSION
from attestation.policy import MAX_RELEASE_KEYS, RELEASE_KEY, Policy, open_policy, sign_policy
from attestation.revocation import open_revocations
from attestation.signed import AttestationError
from meshd import __version__
from meshd import spec as specmod
from meshd import deployments as deploymentsmod
from meshd import waves, whatif
from meshd import eventfeed, tokens
from meshd.io import peer
from meshd.artifacts import catalog as artifact_catalog
from meshd.artifacts.manifest import name_problem as artifact_name_problem
from meshd.io.admin import AdminError, AdminRequest
from meshd.io.artifactstore import StoreError
from meshd.io.diskspace import DiskFull, full_problem
from meshd.io.attester import package_digest, started_digest
from meshd import commands as cmds
from meshd.commands import Ok, Refused, Result
from meshd.io.context import NodeContext
from meshd.io.logview import serve_local_logs
from meshd.io.raft import CommandFailed
from meshd.placement.plan import make_plan
from meshd.io.mesh import REACHABLE_INTERVALS
from meshd.meshstate import (HEALTH_FIELDS, PoliciesIn, audit_key, evidence_kind, policies_in_document, policy_conflicts,
                             revocation_key, revocations_to_take_in)
from meshd.node import effects as fx
from meshd.node import trust
from meshd.node.leading import heard_from
from meshd.sitestate import node_to_plain
from meshd.state import (ADMIN_LEFT, ADMIN_REVOKED, ALLOC_RUNNING, APP_RUNNING, APP_STOPPED, DEPLOY_PAUSED, DEPLOY_SUCCEEDED,
                         NodeRecord, SiteState,
                         app_health)


# How long a write waits for a leader to appear before it is refused.
WRITE_RETRY_WINDOW = 5.0
# `deploy --wait` without --timeout gives up after this long.
DEFAULT_WAIT_TIMEOUT = 120.0
# The longest `--wait` one request may hold the socket: a day (a slow rollout is followed
# with `apps`/`events`, not one request); checked before anything is committed.
MAX_WAIT_TIMEOUT = 86_400.0
RECOVERING = ("this member is rebuilding the site's state from its leader (its own Raft data was damaged and set "
              "aside); ask another member, or again in a moment")
REPLAYING = "this member is still replaying its Raft journal (it has just started); ask again in a moment"
# Progress of a push reaches the CLI at most this often (a 100 MB file hashes in a second).
PUSH_PROGRESS_PERIOD = 0.25
# How often `--wait` / `--follow` look at the state for news when nothing woke them.
POLL_PERIOD = 0.1
# `top` asks every member at once; one slower than this is shown as not answering (a member
# on the LAN answers in milliseconds; a `top --watch` refreshes every 2 s).
TOP_TIMEOUT = 2.0
# Rows taken from one member's `top` answer: more allocations than a node runs.
MAX_TOP_ROWS = 10_000


def _actor(request: AdminRequest, ctx: NodeContext) -> str:
    try:
        user = pwd.getpwuid(request.peer_uid).pw_name
    except (KeyError, TypeError):
        user = f"uid:{request.peer_uid}"
    return f"{user}@{ctx.config.name}"


def _file_name(path: str) -> str:
    """An artifact's name from a spec's file path: its last component, made to fit the rule."""
    base = re.sub(r"[^A-Za-z0-9._+-]", "_", path.rstrip("/").rpartition("/")[2]).lstrip("._+-")
    return base[:128] or "artifact"


def _arg(args: dict, key: str, kind: type | tuple, default: Any = None, required: bool = False) -> Any:
    value = args.get(key, default)
    if value is None:
        if required:
            raise AdminError(f"missing argument {key!r}")
        return default
    if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise AdminError(f"argument {key!r} has the wrong type")
    if not isinstance(value, kind):
        raise AdminError(f"argument {key!r} has the wrong type")
    return value


def alloc_plain(state: SiteState, alloc) -> dict:
    node = state.nodes.get(alloc.node_id)
    return {"alloc_id": alloc.alloc_id, "app": alloc.app, "version": alloc.version, "replica": alloc.replica,
            "node": node.name if node else alloc.node_id, "node_id": alloc.node_id,
            "site": node.site if node else state.site, "state": alloc.state, "desired": alloc.desired,
            "pid": alloc.pid, "restarts": alloc.restarts, "exit_code": alloc.exit_code, "reason": alloc.reason,
            "health": alloc.health, "canary": alloc.canary, "created_at": alloc.created_at}


def app_progress(state: SiteState, name: str) -> dict:
    record = state.apps[name]
    current = state.current_allocs(name)
    running = sum(1 for a in current if a.state == ALLOC_RUNNING)
    replicas = record.spec.replicas if record.status == APP_RUNNING else 0
    status = app_health(stopped=record.status != APP_RUNNING, desired=replicas, running=running,
                        failing=state.failing(name))
    progress = {"app": name, "version": record.version, "status": status, "replicas": replicas, "running": running,
                "sites": list(record.spec.sites) or [state.site],
                "allocs": [alloc_plain(state, a) for a in current]}
    d = record.deployment
    if d is not None and d.version == record.version:
        part = deploymentsmod.site_part(state, record, d, time.time())
        progress["deployment"] = {"state": d.state, **{k: part.get(k) for k in ("healthy", "canaries", "old")}}
    return progress


def not_running_reasons(state: SiteState, name: str) -> list[str]:
    """Why replicas of the app's current version do not run here: each one that is not
    running (its state and last reason), each that failed, each that no node can take."""
    record = state.apps[name]
    names = {n.node_id: n.name for n in state.nodes.values()}
    reasons, accounted = [], set()
    mine = sorted((a for a in state.allocs.of_app(name) if a.version == record.version),
                  key=lambda a: (a.replica, a.live, a.created_at), reverse=True)
    for alloc in mine:  # per replica: its live allocation, else its latest ended one
        if alloc.replica in accounted or alloc.state == ALLOC_RUNNING:
            accounted.add(alloc.replica)
            continue
        accounted.add(alloc.replica)
        text = f"replica {alloc.replica} on {names.get(alloc.node_id, alloc.node_id[:8])} is {alloc.state}"
        if alloc.reason:
            text += f": {alloc.reason}"
        if alloc.restarts:
            text += f" (after {alloc.restarts} restarts)"
        reasons.append(text)
    missing = [r for r in range(record.spec.replicas) if r not in accounted]
    if missing:
        plan = make_plan(state, record.spec, record.version, missing, lambda: "what-if")
        reasons += [f"replica {r} cannot be placed: {why}" for r, why in plan.unplaced]
        if not plan.unplaced:
            reasons.append(f"{len(missing)} replica(s) not placed yet")
    return sorted(reasons)


def mesh_app_row(state: SiteState, document, resolution) -> dict:
    """`meshctl apps`: one app of the mesh document, with per-site progress."""
    winner = resolution.winner
    per_site = []
    failing = False
    for site in winner.targets:
        if site == state.site:
            record = state.apps.get(winner.app)
            current = record is not None and record.edit_id == winner.edit_id
            running = state.running_replicas(winner.app) if current else 0
            failing = current and state.failing(winner.app)
            per_site.append({"site": site, "current": current, "running": running,
                             "desired": 0 if winner.stopped else winner.replicas})
            continue
        status = document.get(AppSiteStatus, app_status_key(winner.app, site))
        current = status is not None and status.edit_id == winner.edit_id
        per_site.append({"site": site, "current": current, "running": status.running if current else 0,
                         "desired": 0 if winner.stopped else winner.replicas,
                         "reported_at": status.ts if status else None})
    replicas = 0 if winner.stopped else winner.replicas * len(winner.targets)
    running = sum(p["running"] for p in per_site)
    return {"app": winner.app, "version": winner.version,
            "status": app_health(stopped=winner.stopped, desired=replicas, running=running, failing=failing),
            "replicas": replicas, "running": running, "sites": list(winner.targets), "per_site": per_site,
            "edit_id": winner.edit_id, "edited_in": winner.site, "edited_by": winner.actor,
            "conflicts": len(resolution.losers)}


def conflict_events(resolutions: dict) -> list[dict]:
    """One event per edit that lost a conflict: the same on every replica with the same edits."""
    events = []
    for resolution in resolutions.values():
        winner = resolution.winner
        for loser in resolution.losers:
            events.append({"ts": max(loser.ts, winner.ts), "kind": "conflict", "app": winner.app,
                           "winner": winner.edit_id, "loser": loser.edit_id, "loser_site": loser.site,
                           "message": f"{winner.app}: v{loser.version} by {loser.actor} in site {loser.site} lost "
                                      f"to v{winner.version} by {winner.actor} in site {winner.site}"})
    return events


def policy_conflict_events(found: PoliciesIn) -> list[dict]:
    """One event per policy bundle that lost to another of the same serial (made while apart)."""
    events = []
    for winner, loser in policy_conflicts(found):
        serial, issued_at, _ = loser.rank
        events.append({"ts": max(issued_at, winner.rank[1]), "kind": "conflict", "policy": serial,
                       "winner_site": winner.site, "loser_site": loser.site,
                       "message": f"policy {serial}: the bundle made in site {loser.site} lost to the one made in "
                                  f"site {winner.site}"})
    return events


def find_alloc(state: SiteState, ref: str):
    if ref in state.allocs:
        return state.allocs[ref]
    matches = [a for a in state.allocs.values() if a.alloc_id.startswith(ref)] if len(ref) >= 4 else []
    if len(matches) == 1:
        return matches[0]
    raise AdminError(f"no allocation {ref!r}" if not matches else f"allocation prefix {ref!r} is ambiguous")


class AdminHandlers:
    def __init__(self, ctx: NodeContext, *, revoke: Callable[[NodeRecord, str, str], Awaitable[Result]]):
        self.ctx = ctx
        self._revoke = revoke  # the trust service's: commit, tell the node, rotate the secret
        self.commands: dict[str, Callable[[AdminRequest, Any], Awaitable[Any]]] = {
            "status": self.status, "nodes": self.nodes, "sites": self.sites, "document": self.document, "token_create": self.token_create,
            "token_ls": self.token_ls, "token_revoke": self.token_revoke, "node_remove": self.node_remove,
            "deploy": self.deploy, "plan": self.plan, "apps": self.apps, "allocs": self.allocs, "stop": self.stop,
            "drain": self.drain, "undrain": self.undrain, "revoke": self.revoke, "revocations": self.revocations,
            "logs": self.logs,
            "events": self.events, "audit": self.audit, "policy": self.policy, "policy_allow": self.policy_allow,
            "policy_require_tpm": self.policy_require_tpm, "policy_release_key": self.policy_release_key,
            "deployments": self.deployments, "history": self.history, "rollback": self.rollback,
            "promote": self.promote, "pause": self.pause, "resume": self.resume, "cancel": self.cancel,
            "pin": self.pin, "unpin": self.unpin, "metrics": self.metrics, "top": self.top,
            "artifact_push": self.artifact_push, "artifact_ls": self.artifact_ls, "artifact_rm": self.artifact_rm,
        }

    async def __call__(self, request: AdminRequest, stream) -> Any:
        handler = self.commands.get(request.cmd)
        if handler is None:
            raise AdminError(f"unknown command {request.cmd!r}")
        if not isinstance(request.args, dict):
            raise AdminError("args must be an object")
        try:
            return await handler(request, stream)
        except DiskFull as e:  # refused before anything was acknowledged (meshd.io.diskspace)
            raise AdminError(str(e)) from None

    # --- helpers -------------------------------------------------------------------------

    def _state(self) -> SiteState:
        raft = self.ctx.raft
        if raft is not None and raft.status.recovering:
            raise AdminError(RECOVERING)
        if raft is not None and not raft.replayed and not self.ctx.has_seen_state:
            raise AdminError(REPLAYING)  # (after a Raft restart the view from before it serves)
        state = self.ctx.snapshot()
        if state.diverged:
            raise AdminError(f"this member's history is not the site's ({state.diverged}); it is being rebuilt from "
                             "the leader: ask another member, or again in a moment")
        return state

    def _require_member(self) -> None:
        if self.ctx.raft is None:
            raise AdminError("this node is still joining its site")

    async def _wait_for_quorum(self) -> float:
        """Wait briefly for a leader with quorum; refuse when none appears. The deadline
        (monotonic) until which a write may be retried."""
        d = self.ctx
        deadline = time.monotonic() + WRITE_RETRY_WINDOW
        while d.partitioned:
            if time.monotonic() >= deadline:
                raise AdminError("the site has no quorum reachable from this node (partitioned); "
                                 "nothing was changed")
            await trio.sleep(POLL_PERIOD)
        return deadline

    async def _write(self, request: AdminRequest, make: Callable[[str], cmds.Command]) -> Ok:
        """Commit the command `make(actor)` builds; refuse without quorum; the result's
        error becomes AdminError."""
        self._require_member()
        d = self.ctx
        problem = full_problem(d.data_dir)
        if problem:  # this node could not hold the change it asks for
            raise AdminError(problem)
        deadline = await self._wait_for_quorum()
        command = make(_actor(request, d))
        try:
            result = await d.commit(command, retry_until=deadline)
        except CommandFailed as e:
            raise AdminError(f"{e}; the change may not have been applied, check before retrying") from None
        if isinstance(result, Refused):
            raise AdminError(result.text)
        return result

    # --- reads ----------------------------------------------------------------------------

    async def status(self, request: AdminRequest, stream) -> dict:
        d = self.ctx
        state = d.snapshot()
        raft = d.raft.status if d.raft else None
        members = sum(1 for n in state.nodes.values() if n.admin not in (ADMIN_LEFT, ADMIN_REVOKED))
        role = "joining" if raft is None else raft.role
        own = state.nodes.get(d.identity.node_id) if d.identity else None
        return {"node_id": d.identity.node_id if d.identity else None, "name": d.config.name,
                "site": d.membership.site if d.membership else d.config.site, "role": role,
                "mesh_id": d.membership.mesh_id if d.membership else None,
                "leader": d.leader_name, "term": raft.term if raft else 0, "members": members,
                "partitioned": d.partitioned if raft else True, "version": __version__,
                "address": f"{d.advertise_ip}:{d.peer_port}", "raft_address": f"{d.advertise_ip}:{d.raft_port}",
                "voter": bool(d.membership and d.membership.voter),
                "evidence": TPM_EVIDENCE if d.tpm else SOFTWARE_EVIDENCE,
                "allocs": state.allocs.live_count(d.identity.node_id) if d.identity else 0,
                # Log entries this node applied: a site at rest stops counting (no commit per beat).
                "raft_applied": raft.last_applied if raft else 0,
                "metrics": "%s:%d" % d.metrics_address if d.metrics_address else None,
                "uptime_s": round(time.monotonic() - d.started, 1),
                # What this node runs, and why the site holds it apart when it does.
                "software": started_digest(),
                **({"quarantine": own.quarantine} if own is not None and own.quarantine else {}),
                **({"recovering": True} if raft is not None and raft.recovering else {}),
                **({"disk_full": True} if raft is not None and raft.disk_full else {}),
                # Its clock against the leader's, as the last re-attestation found it: said, never punished.
                **({"clock_skew_s": own.clock_skew_s, "clock_skewed": abs(own.clock_skew_s) > MAX_CLOCK_SKEW}
                   if own is not None and own.clock_skew_s else {}),
                **({"joining": d.joining.status(time.monotonic())} if d.joining is not None else {}),
                **({"heard_s_ago": self._heard_s_ago(state, raft)} if role == "leader" else {})}

    def _heard_s_ago(self, state: SiteState, raft) -> dict[str, float]:
        """On the leader: each other member's name -> seconds since the leader last heard it
        (its Raft heartbeat answer or its beat), what its lease counts from."""
        now = time.monotonic()
        heard = heard_from(state, raft.contacts, tuple(self.ctx.beats.items()))
        return {state.nodes[node_id].name: round(max(0.0, now - at), 3) for node_id, at in sorted(heard.items())
                if node_id in state.nodes and node_id != self.ctx.identity.node_id}

    def _node_rows(self, state: SiteState, site: str | None) -> list[dict]:
        if site and site != state.site:
            return self._other_site_node_rows(site)
        d = self.ctx
        leader = d.raft.status.leader_address if d.raft else None
        rows = []
        for node in sorted(state.nodes.values(), key=lambda n: n.name):
            if site and node.site != site:
                continue
            plain = node_to_plain(node)
            plain.pop("public_key", None)
            plain.pop("tpm_ak", None)  # shown as the evidence kind
            role = "leader" if node.raft_address == leader else ("follower" if node.voter else "nonvoter")
            plain.update(role=role, cpu_free=node.resources.cpu_free, mem_free_mb=node.resources.mem_free_mb,
                         enforces=list(node.resources.enforces),  # limits it enforces, with cgroup v1/v2
                         devices=dict(node.resources.devices),
                         cgroup=f"v{node.resources.cgroup}" if node.resources.cgroup else None,
                         allocs=sum(1 for a in state.allocs_on(node.node_id) if a.live),
                         evidence=evidence_kind(node),
                         attested_s_ago=round(max(time.time() - node.attested_at, 0.0), 1) if node.attested_at else None)
            rows.append(plain)
        return rows

    def _other_site_node_rows(self, site: str) -> list[dict]:
        """Another site's members as its leader last published them in the mesh document
        (no resource figures: those stay in their site); `as_of_s`: how old that is."""
        now = time.time()
        rows = []
        for summary in self.ctx.mesh.document.records(NodeSummary):
            if summary.site != site:
                continue
            row = summary.to_plain()
            row["labels"] = dict(label.split("=", 1) for label in summary.labels if "=" in label)
            row.update(cpu_free=None, mem_free_mb=None, as_of_s=round(max(0.0, now - row.pop("ts")), 1),
                       **{name: getattr(summary, name) for name in HEALTH_FIELDS})  # over its site's last minute
            rows.append(row)
        return sorted(rows, key=lambda r: r["name"])

    async def nodes(self, request: AdminRequest, stream) -> list:
        return self._node_rows(self._state(), _arg(request.args, "site", str))

    async def sites(self, request: AdminRequest, stream) -> list:
        """This site from its Raft state; the others from their summaries in the mesh document
        and from this node's sync sessions."""
        d = self.ctx
        state = self._state()
        members = [n for n in state.nodes.values() if n.admin not in (ADMIN_LEFT, ADMIN_REVOKED)]
        rows = [{"site": state.site, "nodes": len(members), "ready": sum(1 for n in members if n.state == "ready"),
                 "leader": d.leader_name, "last_sync_s": 0.0, "reachable": not d.partitioned, "local": True}]
        summaries = {s.site: s for s in d.mesh.document.records(SiteSummary) if s.site != state.site}
        connected = d.mesh.connected_sites() - {state.site}
        now = trio.current_time()
        window = REACHABLE_INTERVALS * d.config.sync_interval
        for site in sorted(set(summaries) | connected):
            summary = summaries.get(site)
            heard = d.mesh.last_heard(site)
            age = None if heard is None else round(max(0.0, now - heard), 3)
            rows.append({"site": site, "nodes": summary.nodes if summary else None,
                         "ready": summary.ready if summary else None, "leader": summary.leader if summary else None,
                         "last_sync_s": age, "reachable": site in connected or (age is not None and age <= window),
                         "local": False, "connected": site in connected,
                         "addresses": list(summary.addresses) if summary else []})
        return rows

    async def top(self, request: AdminRequest, stream) -> list:
        """What the site's workloads use now, node by node: this node's from its supervisor,
        the others' asked over the peer port at once (a member that does not answer within
        TOP_TIMEOUT is one row saying so)."""
        d = self.ctx
        state = self._state()
        own = d.identity.node_id if d.identity else ""
        rows: list[dict] = []

        async def ask(node) -> None:
            try:
                with trio.fail_after(TOP_TIMEOUT):
                    answer = await d.call_member(node, {"call": "top"}, timeout=TOP_TIMEOUT)
                found = answer.get("rows") if isinstance(answer, dict) else None
                if not isinstance(found, list):
                    raise peer.PeerError("not a list of rows")
                rows.extend({**row, "node": node.name} for row in found[:MAX_TOP_ROWS] if isinstance(row, dict))
            except (OSError, peer.PeerError, trio.TooSlowError) as e:
                rows.append({"node": node.name, "alloc_id": None, "unreachable": str(e) or type(e).__name__})

        async with trio.open_nursery() as nursery:
            for node in state.nodes.values():
                if node.node_id == own or node.admin in (ADMIN_LEFT, ADMIN_REVOKED) or node.site != state.site:
                    continue
                if node.state in ("down", "joining"):
                    rows.append({"node": node.name, "alloc_id": None, "unreachable": f"node is {node.state}"})
                    continue
                nursery.start_soon(ask, node)
            if d.supervisor is not None:
                rows.extend({**row, "node": d.config.name} for row in d.supervisor.usage())
        return sorted(rows, key=lambda r: (r["node"], r.get("app") or "", r.get("alloc_id") or ""))

    async def metrics(self, request: AdminRequest, stream) -> str:
        """This daemon's Prometheus exposition (meshd.io.metrics), as the endpoint serves it."""
        return self.ctx.metrics.render().decode()

    async def document(self, request: AdminRequest, stream) -> dict:
        """This node's replica: records per kind, size, state vector, and its live sessions."""
        mesh = self.ctx.mesh
        if _arg(request.args, "compact", bool, False):  # an operator's compaction, now
            await mesh.hub.compact("asked by meshctl document --compact")
        document = mesh.document
        since = _arg(request.args, "since", str)
        sent = mesh.sent_by_site()
        answer: dict[str, Any] = {
            "state_vector": document.state_vector().hex(),
            "epoch": str(document.epoch),
            # what compaction dropped of each site's audit records (crdt.compaction)
            "audit_dropped": {d.site: {"count": d.count, "first_ts": d.first_ts, "last_ts": d.last_ts,
                                       "upto_seq": d.upto_seq} for d in document.records(DroppedAudit)},
            "retention_s": mesh.hub.retention,
            "history_bytes": mesh.hub.grown,  # update bytes taken since the epoch began
            "last_epoch_change": mesh.hub.last_change,
            "sessions": [{"peer": s.peer, "site": mesh.site_of(s), "synced": s.synced,
                          "peer_epoch": str(s.peer_epoch) if s.peer_epoch is not None else None,
                          "bytes_in": s.bytes_in, "bytes_out": s.bytes_out, "payload_in": s.payload_in,
                          "payload_out": s.payload_out} for s in mesh.hub.live_sessions()],
            "sent_by_site": {site: wire for site, (wire, _) in sent.items()},
            "updates_sent_by_site": {site: payload for site, (_, payload) in sent.items()},
        }
        brief = bool(_arg(request.args, "brief", bool, False))
        if not brief:  # a pass over the whole document
            answer.update(bytes=len(document.full_update()),
                          records={kind.ROOT: len(document.records(kind)) for kind in RECORD_KINDS},
                          invalid=len(document.invalid()), log_bytes=mesh.store.log_bytes if mesh.store else 0)
        if since is not None:
            try:
                vector = bytes.fromhex(since)
                # items that replica lacks (0: it has everything), from the state vectors
                answer["delta_items"] = document.lacking(vector)
                if not brief:  # the size of the delta itself: making it is a pass over the document
                    answer["delta_bytes"] = len(document.delta_since(vector))
            except (ValueError, SyncError) as e:
                raise AdminError(f"--since: not a state vector ({getattr(e, 'reason', e)})") from None
        return answer

    async def apps(self, request: AdminRequest, stream) -> list:
        """Every app of the mesh (stopped ones only with `all`): its winning edit, and its
        progress in each site it names (this site from the Raft state, the others as they
        published it)."""
        every = bool(_arg(request.args, "all", bool, False))
        state = self._state()
        document = self.ctx.mesh.document
        resolutions = document.apps()
        rows = []
        for name in sorted(set(state.apps) | set(resolutions)):
            resolution = resolutions.get(name)
            if resolution is None:
                progress = app_progress(state, name)
                progress.pop("allocs")
                rows.append(progress)
                continue
            rows.append(mesh_app_row(state, document, resolution))
        return rows if every else [row for row in rows if row["status"] != APP_STOPPED]

    async def allocs(self, request: AdminRequest, stream) -> list:
        state = self._state()
        app = _arg(request.args, "app", str)
        node_ref = _arg(request.args, "node", str)
        node_id = None
        if node_ref:
            node = state.node_by_ref(node_ref)
            if node is None:
                raise AdminError(f"no member named {node_ref!r}")
            node_id = node.node_id
        # From the narrowest index; a large answer travels in parts (meshd.io.admin).
        chosen = state.allocs.of_app(app) if app else (state.allocs.on_node(node_id) if node_id
                                                         else state.allocs.values())
        rows = [alloc_plain(state, a) for a in chosen
                if (app is None or a.app == app) and (node_id is None or a.node_id == node_id)]
        return sorted(rows, key=lambda r: (r["app"], r["replica"], r["created_at"]))

    async def plan(self, request: AdminRequest, stream) -> dict:
        """A dry run of a deploy; with `what_if` changes (meshd.whatif), on the site's state as
        if they had happened, and what would move. Nothing is committed."""
        app_spec = self._parse_spec(request)
        state = self._state()
        try:
            changes = whatif.parse(_arg(request.args, "what_if", list, default=[]))
            if changes:
                state, notes = whatif.imagine(state, changes, time.time())
        except whatif.WhatIfError as e:
            raise AdminError(str(e)) from None
        current = state.apps.get(app_spec.name)
        version = (current.version + (0 if current.spec == app_spec else 1)) if current else 1
        plan = make_plan(state, app_spec, version, range(app_spec.replicas), lambda: secrets.token_hex(6))
        answer = plan.to_plain()
        if changes:
            answer["what_if"] = [f"{c.kind}:{c.target}" for c in changes]
            answer["moves"] = whatif.moves(state, lambda: secrets.token_hex(6))
            answer["notes"] = notes + [f"site {s} takes no change of {app_spec.name} until the link returns"
                                       for s in whatif.cut_targets(app_spec, changes)]
        return answer

    async def events(self, request: AdminRequest, stream) -> list:
        follow_ = bool(_arg(request.args, "follow", bool, False))
        try:
            since = eventfeed.check_since(request.args.get("since"))
        except eventfeed.SinceError as e:
            raise AdminError(str(e)) from None
        state = self._state()
        try:
            after_seq = eventfeed.check_after_seq(request.args.get("after_seq"), state.event_seq)
            wanted = eventfeed.check_filter(request.args.get("kinds"), request.args.get("app"),
                                            request.args.get("node"))
        except eventfeed.SinceError as e:
            raise AdminError(str(e)) from None
        if after_seq is not None:
            # Resumed by number: the replicated events after it (and a marker for those the
            # capped history dropped), then on as any stream (meshd.eventfeed).
            cursor = eventfeed.Cursor(after_seq, self.ctx.local_event_count, since)
            items, cursor = eventfeed.step(cursor, state.events, state.event_seq, (), 0, time.time())
            items = [e for e in items if wanted.matches(e)]
            if not follow_:
                return items
            for event in items:
                await stream.send(event)
        else:
            history = [e for e in self._merged_events(state.events, list(self.ctx.local_events)) if wanted.matches(e)]
            if not follow_:
                return [e for e in history if e["ts"] > since] if since is not None else history
            # Followed by sequence numbers, not by position (meshd.eventfeed).
            cursor = eventfeed.Cursor(state.event_seq, self.ctx.local_event_count, since)
            for event in eventfeed.backlog(history, since):
                await stream.send(event)
        while True:
            await self.ctx.state_changed.wait(1.0)
            state = self._state()
            items, cursor = eventfeed.step(cursor, state.events, state.event_seq, self.ctx.local_events,
                                           self.ctx.local_event_count, time.time())
            for event in items:
                if wanted.matches(event):
                    await stream.send(event)

    def _merged_events(self, replicated: list, local: list[dict]) -> list[dict]:
        d = self.ctx
        conflicts = conflict_events(d.mesh.document.apps())
        state = self._state()
        if state.trust_root and d.membership is not None:
            found = policies_in_document(d.mesh.document.records(SignedRecord), bytes.fromhex(state.trust_root),
                                         d.membership.mesh_id)
            conflicts += policy_conflict_events(found)
        return sorted([eventfeed.plain(e) for e in replicated] + local + conflicts, key=lambda e: e["ts"])

    async def audit(self, request: AdminRequest, stream) -> list:
        """Audit records of every site (the mesh document), and this site's own not yet in it."""
        state = self._state()
        merged = {r.audit_id: r.to_plain() for r in self.ctx.mesh.document.records(DocAuditRecord)}
        for record in state.audit:
            key = audit_key(record.site, record.seq) if record.seq else f"{record.site}/local/{record.ts}"
            merged.setdefault(key, {"audit_id": key, **record.to_plain()})
        rows = sorted(merged.values(), key=lambda r: (r["ts"], r["audit_id"]))
        for row in rows:
            row.pop("seq", None)
        return rows

    async def revocations(self, request: AdminRequest, stream) -> list:
        """Every node revoked in the mesh as this site knows it: its root-signed list, which
        takes in the revocations of other sites, plus those the document carries that the
        site's leader has not taken in yet (marked `pending`)."""
        self._require_member()
        d = self.ctx
        state = self._state()
        if not state.trust_root or not state.revocations:
            return []
        root = bytes.fromhex(state.trust_root)
        try:
            listed = open_revocations(state.revocations, root)
        except AttestationError as e:
            raise AdminError(f"the site's revocation list does not verify: {e}") from None
        records = d.mesh.document.records(SignedRecord)
        issued_in = {r.key: r.site for r in records}
        incoming = revocations_to_take_in(listed, records, root, d.membership.mesh_id)
        names = {n.node_id: n.name for n in d.mesh.document.records(NodeSummary)}  # other sites' members
        names.update((n.node_id, n.name) for n in state.nodes.values())
        rows = []
        for entry, pending in [(e, False) for e in listed.entries.values()] + [(e, True) for e in incoming.entries]:
            rows.append({"node_id": entry.node_id, "name": names.get(entry.node_id),
                         "site": issued_in.get(revocation_key(entry.node_id), state.site), "by": entry.by,
                         "at": entry.at, "reason": entry.reason, "pending": pending})
        return sorted(rows, key=lambda r: (r["at"], r["node_id"]))

    async def logs(self, request: AdminRequest, stream) -> dict:
        ref = _arg(request.args, "alloc", str, required=True)
        follow_ = bool(_arg(request.args, "follow", bool, False))
        tail = _arg(request.args, "tail", int)  # bytes (an older meshctl)
        lines = _arg(request.args, "lines", int)
        d = self.ctx
        state = self._state()
        alloc = find_alloc(state, ref)
        try:
            if alloc.node_id == d.identity.node_id:
                return await serve_local_logs(d, alloc.alloc_id, follow_, tail, stream.send, lines=lines)
            node = state.nodes.get(alloc.node_id)
            if node is None:
                raise AdminError(f"allocation {alloc.alloc_id} ran on a node that is no longer known")
            return await d.call_member(node, {"call": "logs", "alloc": alloc.alloc_id, "follow": follow_, "tail": tail,
                                              "lines": lines},
                                       on_stream=stream.send, timeout=None if follow_ else 10.0)
        except peer.PeerError as e:
            raise AdminError(str(e)) from None
        except (OSError, trio.TooSlowError) as e:
            raise AdminError(f"cannot reach the node that holds {alloc.alloc_id}: {e or type(e).__name__}") from None

    # --- writes ---------------------------------------------------------------------------

    def _parse_spec(self, request: AdminRequest):
        try:
            return specmod.parse_app_toml(self._spec_text(request))
        except specmod.SpecError as e:
            raise AdminError(f"invalid app spec: {e}") from None

    # --- artifacts -----------------------------------------------------------------------

    async def artifact_push(self, request: AdminRequest, stream) -> dict:
        """Store the file passed with the request in the mesh: this node keeps it, its manifest
        is signed (by a voter, or offline with a release key: `manifest`), the site's catalog
        takes it in; members fetch it from here when a workload of theirs needs it."""
        self._require_member()
        if len(request.fds) != 1:
            raise AdminError("artifact push needs the file passed with the request (meshctl artifact push FILE)")
        name = _arg(request.args, "name", str, required=True)
        problem = artifact_name_problem(name)
        if problem:
            raise AdminError(f"--name: {problem}")
        document = _arg(request.args, "manifest", dict)
        manifest = await self._push(request, request.fds[0], name, stream, document)
        return {"digest": manifest.digest, "size": manifest.size, "name": manifest.name}

    async def _push(self, request: AdminRequest, fd: int, name: str, stream, document: dict | None = None):
        latest: dict = {}  # the push's progress, as the store last told it

        def progress(done: int, total: int) -> None:
            latest.update(pushing=name, done=done, total=total)

        async def forward() -> None:
            sent: dict = {}
            while True:
                if latest and latest != sent:
                    sent = dict(latest)
                    await stream.send(sent)
                await trio.sleep(PUSH_PROGRESS_PERIOD)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(forward)
                manifest, command = await self.ctx.artifacts.push(fd, name, _actor(request, self.ctx), progress,
                                                                  document)
                nursery.cancel_scope.cancel()
        except StoreError as e:
            raise AdminError(f"artifact {name}: {e}") from None
        await self._write(request, lambda actor: dataclasses.replace(command, actor=actor))
        return manifest

    async def artifact_ls(self, request: AdminRequest, stream) -> list:
        return artifact_catalog.listing(self._state())

    async def artifact_rm(self, request: AdminRequest, stream) -> dict:
        """Forget an artifact no kept app version pins: out of the site's catalog, and every
        member drops its copy. A digest may be given by a unique prefix of its hex."""
        self._require_member()
        ref = _arg(request.args, "digest", str, required=True)
        state = self._state()
        wanted = ref if ref.startswith("sha256:") else "sha256:" + ref
        matches = [d for d in state.artifacts if d.startswith(wanted)]
        if len(matches) != 1 or len(wanted) < len("sha256:") + 8:
            if not matches and len(wanted) == len("sha256:") + 64:
                return {"digest": wanted, "removed": False}
            raise AdminError(f"{ref!r} names {'no' if not matches else 'more than one'} artifact of this site "
                             "(give its digest, or at least 8 hex digits of it)")
        result = await self._write(request, lambda actor: cmds.RemoveArtifact(digest=matches[0], actor=actor))
        return {"digest": matches[0], "removed": bool(result["removed"])}

    async def _push_spec_files(self, request: AdminRequest, app_spec, stream):
        """A spec's `file = ...` artifacts, passed with the request, pushed; the spec that pins
        their digests (what is stored). Every `digest = ...` must be known to this site."""
        files = _arg(request.args, "files", list, default=[])
        wanting = [a for a in app_spec.artifacts if a.file]
        if [a.file for a in wanting] != files or len(request.fds) != len(files):
            if wanting:
                raise AdminError("the spec's artifact files must be passed with it: deploy it with meshctl deploy FILE, "
                                 "which reads them beside the spec")
            raise AdminError("files were passed, but the spec names no artifact file")
        state = self._state()
        for ref in app_spec.artifacts:
            if ref.digest and ref.digest not in state.artifacts:
                raise AdminError(f"artifact {ref.name}: {ref.digest[:19]}... is not known to this site "
                                 "(push it first with meshctl artifact push)")
        pinned = {}
        for ref, fd in zip(wanting, request.fds):
            manifest = await self._push(request, fd, _file_name(ref.file), stream)
            pinned[ref.name] = manifest.digest
        refs = tuple(dataclasses.replace(r, digest=pinned[r.name], file="") if r.file else r
                     for r in app_spec.artifacts)
        return dataclasses.replace(app_spec, artifacts=refs)

    @staticmethod
    def _spec_text(request: AdminRequest) -> str:
        return _arg(request.args, "spec_toml", str, required=True)

    async def _commit_edit(self, request: AdminRequest, make: Callable[[AppEdit, str], cmds.Command],
                           app_name: str, *, spec_toml: str, targets: tuple[str, ...], replicas: int,
                           stopped: bool = False) -> tuple[Ok, AppEdit]:
        """A deploy or stop as a mesh-document edit: committed through the site's Raft first
        (the command carries it), then written to the replica; the site's leader re-publishes
        it should this node die in between. Returns (Raft result, edit). Callers checked
        `_require_member` (they read the site first)."""
        d = self.ctx
        edit = d.mesh.document.new_app_edit(edit_id=uuid.uuid4().hex, app=app_name, site=d.membership.site,
                                            actor=_actor(request, d), ts=time.time(), spec=spec_toml,
                                            targets=targets, replicas=replicas, stopped=stopped)
        try:
            edit.to_plain()  # validated here, so a bad edit is the operator's error, not a refusal
        except SchemaError as e:
            raise AdminError(f"invalid app spec: {e.reason}") from None
        result = await self._write(request, lambda actor: make(edit, actor))
        await d.mesh.write([edit])
        return result, edit

    async def deploy(self, request: AdminRequest, stream) -> dict:
        app_spec = self._parse_spec(request)
        spec_toml = self._spec_text(request)
        if app_spec.artifacts or request.fds:
            self._require_member()
            app_spec = await self._push_spec_files(request, app_spec, stream)
            spec_toml = specmod.spec_to_toml(app_spec)  # what the mesh keeps: digests, not files
        wait = bool(_arg(request.args, "wait", bool, False))
        timeout = _arg(request.args, "timeout", (int, float), DEFAULT_WAIT_TIMEOUT)
        if (isinstance(timeout, int) and abs(timeout) > MAX_WAIT_TIMEOUT) or not 0 < float(timeout) <= MAX_WAIT_TIMEOUT:
            raise AdminError(f"timeout must be more than 0 and at most {MAX_WAIT_TIMEOUT:g} seconds")
        self._require_member()
        own_site = self.ctx.membership.site
        targets = tuple(app_spec.sites) or (own_site,)
        same = self._running_edit(app_spec, targets)
        if same is not None:
            # The very spec already runs where it is wanted: nothing is written, nothing restarts.
            edit, record = same, self._state().apps.get(app_spec.name)
            result = {"app": app_spec.name, "version": edit.version,
                      "site_version": record.version if record is not None else 0}
        else:
            result, edit = await self._commit_edit(
                request, lambda edit, actor: self.ctx.mesh.hold_for_wave(
                    cmds.SubmitApp(spec=app_spec, edit=edit, actor=actor)), app_spec.name,
                spec_toml=spec_toml, targets=targets, replicas=app_spec.replicas)
        answer = {"app": result["app"], "version": result["version"], "accepted": True, "changed": same is None,
                  "sites": list(targets), "edit_id": edit.edit_id}
        if result.get("held"):
            answer["held"] = True  # taken in here, run once the rollout's wave reaches this site
        if not wait:
            return answer
        deadline = time.monotonic() + float(timeout)
        if app_spec.rollout is not None:
            return answer | await self._wait_rollout(edit, stream, deadline, float(timeout))
        if own_site not in targets:
            return answer | await self._wait_elsewhere(edit, stream, deadline, float(timeout))
        last = None
        while True:
            state = self._state()
            record = state.apps.get(app_spec.name)
            # The deployment's verdict first: a revert also moves the app's version back.
            outcome = deploymentsmod.wait_outcome(record, result["site_version"])
            if outcome.error:
                raise AdminError(f"{app_spec.name} {outcome.error}")
            if record is None or record.version != result["site_version"]:
                raise AdminError(f"{app_spec.name} v{result['version']} was replaced while waiting")
            progress = app_progress(state, app_spec.name)
            key = (progress["running"], tuple((a["alloc_id"], a["state"], a["health"]) for a in progress["allocs"]),
                   tuple(sorted((progress.get("deployment") or {}).items())))
            if key != last:
                await stream.send(progress)
                last = key
            # Over once every replica of the new version is healthy and no old one is left
            # (the version still soaks min_healthy_s before `deployments` calls it stable).
            if outcome.done or deploymentsmod.complete(state, record):
                return answer | {"running": progress["running"], "replicas": progress["replicas"],
                                 "deployment": (progress.get("deployment") or {}).get("state")}
            if time.monotonic() >= deadline:
                why = not_running_reasons(state, app_spec.name)
                raise AdminError(f"{app_spec.name} v{result['version']} accepted, but only {progress['running']}/"
                                 f"{progress['replicas']} replicas running after {timeout:g}s"
                                 + (f": {'; '.join(why[:3])}" if why else "")
                                 + (f" (and {len(why) - 3} more)" if len(why) > 3 else ""))
            await self.ctx.state_changed.wait(POLL_PERIOD)

    def _running_edit(self, app_spec, targets: tuple[str, ...]) -> AppEdit | None:
        """The mesh's current edit of this app when it is this very spec, running, for these
        sites, and uncontested (and this site runs it, when it is one of them); else None."""
        current = self.ctx.mesh.document.app(app_spec.name)
        if current is None or current.losers or current.winner.stopped or tuple(current.winner.targets) != targets:
            return None
        try:
            if specmod.parse_app_toml(current.winner.spec) != app_spec:
                return None
        except specmod.SpecError:
            return None
        if self.ctx.membership.site in targets:
            record = self._state().apps.get(app_spec.name)
            if record is None or record.status != APP_RUNNING or record.spec != app_spec \
                    or record.edit_id != current.winner.edit_id:
                return None  # this site has not taken it in (yet): the edit is written again
        return current.winner

    async def _wait_rollout(self, edit, stream, deadline: float, timeout: float) -> dict:
        """`deploy --wait` of an app rolled out in waves: the rollout across its sites, until
        it succeeded (every wave through and soaked), or was stopped."""
        d = self.ctx
        last = None
        while True:
            found = d.mesh.rollout(edit.app)
            if found is None or found[0].edit_id != edit.edit_id:
                raise AdminError(f"{edit.app} v{edit.version} was replaced while waiting")
            view = found[1]
            progress = {"app": edit.app, "version": edit.version, "state": view.state, "waves_open": view.waves_open,
                        "sites": deploymentsmod.rollout_sites(view)}
            if progress != last:
                await stream.send(progress)
                last = progress
            if view.state == DEPLOY_SUCCEEDED:
                return {"deployment": view.state, "sites": progress["sites"]}
            if view.stopped:
                raise AdminError(f"{edit.app} v{edit.version}'s rollout was {view.state}: {view.reason}")
            if time.monotonic() >= deadline:
                waiting = [site for site, p in view.sites.items() if p.state not in waves.ENDED]
                raise AdminError(f"{edit.app} v{edit.version}'s rollout is still {view.state} after {timeout:g}s "
                                 f"(wave {view.waves_open} of {max(p.wave for p in view.sites.values())}; "
                                 f"not done: {', '.join(waiting[:5]) or 'soaking'}); a site out of reach goes on "
                                 "when the link returns")
            await d.mesh.changed.wait(POLL_PERIOD * 5)

    async def _wait_elsewhere(self, edit, stream, deadline: float, timeout: float) -> dict:
        """`deploy --wait` of an app that runs only in other sites: their published progress."""
        d = self.ctx
        last = None
        while True:
            rows = [d.mesh.document.get(AppSiteStatus, app_status_key(edit.app, site)) for site in edit.targets]
            current = [r for r in rows if r is not None and r.edit_id == edit.edit_id]
            running = sum(r.running for r in current)
            wanted = edit.replicas * len(edit.targets)
            progress = {"app": edit.app, "version": edit.version, "replicas": wanted, "running": running,
                        "sites": {r.site: r.running for r in current}}
            if progress != last:
                await stream.send(progress)
                last = progress
            if len(current) == len(edit.targets) and all(r.running >= r.desired for r in current):
                return {"running": running, "replicas": wanted}
            if time.monotonic() >= deadline:
                raise AdminError(f"{edit.app} v{edit.version} accepted, but sites {', '.join(edit.targets)} report "
                                 f"{running}/{wanted} replicas running after {timeout:g}s (a site out of reach "
                                 "places it when the link returns)")
            await d.mesh.changed.wait(POLL_PERIOD * 5)

    # --- deployments, history ------------------------------------------------------------

    def _record(self, app: str):
        state = self._state()
        record = state.apps.get(app)
        if record is None:
            raise AdminError(f"no app named {app!r} in site {state.site}")
        return record

    async def deployments(self, request: AdminRequest, stream) -> list:
        app = _arg(request.args, "app", str)
        state = self._state()
        if app is not None and app not in state.apps and self.ctx.mesh.rollout(app) is None:
            self._record(app)
        by_app: dict[str, list[dict]] = {}
        for row in deploymentsmod.deployment_rows(state, time.time(), app):
            by_app.setdefault(row["app"], []).append(row)
        for name in [app] if app is not None else set(by_app) | set(self.ctx.mesh.document.apps()):
            found = self.ctx.mesh.rollout(name)
            if found is not None:
                edit, view = found
                record = state.apps.get(name)
                by_app[name] = deploymentsmod.with_rollout(by_app.get(name, []), name, edit.edit_id, edit.version,
                                                           record.version if record is not None else 0, view,
                                                           state.site)
        return [row for name in sorted(by_app) for row in by_app[name]]

    async def history(self, request: AdminRequest, stream) -> list:
        return deploymentsmod.history_rows(self._record(_arg(request.args, "app", str, required=True)))

    async def rollback(self, request: AdminRequest, stream) -> dict:
        """Deploy an earlier version's spec again: a new version (and mesh edit) whose replicas
        of an equal spec already running stay as they are."""
        app = _arg(request.args, "app", str, required=True)
        to = _arg(request.args, "to", int)
        self._require_member()
        record = self._record(app)
        target, why = deploymentsmod.rollback_target(record, to)
        if target is None:
            raise AdminError(why)
        entry = record.version_entry(target)
        assert entry is not None  # rollback_target found it
        spec = entry.spec
        targets = tuple(spec.sites) or (self.ctx.membership.site,)
        result, edit = await self._commit_edit(
            request, lambda edit, actor: self.ctx.mesh.hold_for_wave(cmds.SubmitApp(spec=spec, edit=edit, actor=actor)),
            app, spec_toml=specmod.spec_to_toml(spec), targets=targets, replicas=spec.replicas)
        return {"app": app, "version": result["version"], "from_version": record.version, "spec_of": target,
                "changed": result.get("changed", True), "sites": list(targets)}

    async def _move(self, request: AdminRequest, action: str) -> dict:
        app = _arg(request.args, "app", str, required=True)
        found = self.ctx.mesh.rollout(app) if action in waves.CONTROL_ACTIONS else None
        if found is not None:
            return await self._control_rollout(request, app, action, *found)
        record = self._record(app)
        if record.deployment is None:
            raise AdminError(f"{app} has no deployment to {action}")
        result = await self._write(request, lambda actor: cmds.Rollout(app=app, version=record.version, action=action,
                                                                       reason=_arg(request.args, "reason", str) or "",
                                                                       actor=actor))
        return {"app": app, "version": result["version"], "state": result["state"],
                **({"promoted": True} if action == "promote" else {}),
                **({"to_version": result["to_version"]} if result.get("to_version") else {})}

    async def _control_rollout(self, request: AdminRequest, app: str, action: str, edit, view) -> dict:
        """Pause, resume or cancel an app's rollout across sites: a record in the mesh document
        that every site's leader follows (meshd.waves); this site's follows at once."""
        d = self.ctx
        self._require_member()
        if view.stopped:
            raise AdminError(f"{app} v{edit.version}'s rollout was {view.state} already; nothing to {action}")
        if view.state == DEPLOY_SUCCEEDED:
            raise AdminError(f"{app} v{edit.version}'s rollout succeeded; nothing to {action} (rollback deploys an "
                             "earlier version)")
        if action == "pause" and view.state == DEPLOY_PAUSED:
            raise AdminError(f"{app} v{edit.version}'s rollout is already paused")
        if action == "resume" and view.state != DEPLOY_PAUSED:
            raise AdminError(f"{app} v{edit.version}'s rollout is not paused (it is {view.state})")
        control = RolloutControl(app=app, edit_id=edit.edit_id, site=d.membership.site, action=action,
                                 ts=max(time.time(), max((c.ts for c in d.mesh.controls(edit)), default=0.0) + 1e-3),
                                 actor=_actor(request, d), reason=_arg(request.args, "reason", str) or "")
        try:
            await d.mesh.write([control])
        except SchemaError as e:
            raise AdminError(f"cannot record the {action}: {e.reason}") from None
        found = d.mesh.rollout(app)
        state = found[1].state if found is not None else view.state
        return {"app": app, "version": edit.version, "state": state, "sites": list(edit.targets)}

    async def promote(self, request: AdminRequest, stream) -> dict:
        return await self._move(request, "promote")

    async def pause(self, request: AdminRequest, stream) -> dict:
        return await self._move(request, "pause")

    async def resume(self, request: AdminRequest, stream) -> dict:
        return await self._move(request, "resume")

    async def cancel(self, request: AdminRequest, stream) -> dict:
        return await self._move(request, "cancel")

    async def _pin(self, request: AdminRequest, pinned: bool) -> dict:
        app = _arg(request.args, "app", str, required=True)
        version = _arg(request.args, "version", int, required=True)
        result = await self._write(request, lambda actor: cmds.PinVersion(app=app, version=version, pinned=pinned,
                                                                          actor=actor))
        return {"app": app, "version": result["version"], "pinned": result["pinned"]}

    async def pin(self, request: AdminRequest, stream) -> dict:
        return await self._pin(request, True)

    async def unpin(self, request: AdminRequest, stream) -> dict:
        return await self._pin(request, False)

    async def stop(self, request: AdminRequest, stream) -> dict:
        app = _arg(request.args, "app", str, required=True)
        d = self.ctx
        self._require_member()
        resolution = d.mesh.document.app(app)
        if resolution is None and app not in self._state().apps:
            raise AdminError(f"no app named {app!r}")
        targets = resolution.winner.targets if resolution is not None else (d.membership.site,)
        result, edit = await self._commit_edit(request, lambda edit, actor: cmds.StopApp(app=app, edit=edit, actor=actor),
                                               app, spec_toml="", targets=targets, replicas=0, stopped=True)
        return {"app": result["app"], "stopped": True, "allocs": len(result.get("allocs", [])),
                "version": edit.version, "sites": list(targets)}

    async def drain(self, request: AdminRequest, stream) -> dict:
        return await self._drain(request, cmds.Drain)

    async def undrain(self, request: AdminRequest, stream) -> dict:
        return await self._drain(request, cmds.Undrain)

    async def _drain(self, request: AdminRequest, kind: type[cmds.Drain] | type[cmds.Undrain]) -> dict:
        node = _arg(request.args, "node", str, required=True)
        result = await self._write(request, lambda actor: kind(node=node, actor=actor))
        return {"node": result["node"], "node_id": result["node_id"], "state": result["state"]}

    async def node_remove(self, request: AdminRequest, stream) -> dict:
        """Forget a member gone for good (down, or left), without revoking it; a non-voter
        takes its voter place (the state machine decides which: sitestate._remove_node)."""
        self._require_member()
        d = self.ctx
        ref = _arg(request.args, "node", str, required=True)
        node = self._state().node_by_ref(ref)
        if node is not None and d.identity is not None and node.node_id == d.identity.node_id:
            raise AdminError("a node cannot remove itself; stop it and run this on another member")
        if d.root_signing_key() is None:
            raise AdminError("run this on a voter: the non-voter promoted in the removed node's place needs the "
                             "mesh root key, which only voters hold")
        result = await self._write(request, lambda actor: cmds.RemoveNode(node=ref, actor=actor))
        promoted = self._state().nodes.get(result["promoted"]) if result.get("promoted") else None
        if promoted is not None:
            await d.execute([fx.PromoteVoter(promoted)])
        return {"node": result["node"], "node_id": result["node_id"], "removed": True,
                "promoted": promoted.name if promoted is not None else None}

    async def token_create(self, request: AdminRequest, stream) -> dict:
        d = self.ctx
        self._require_member()
        site = _arg(request.args, "site", str) or d.membership.site
        ttl = _arg(request.args, "ttl", int, tokens.DEFAULT_TOKEN_TTL)
        if not 1 <= ttl <= tokens.MAX_TOKEN_TTL:
            raise AdminError(f"ttl must be from 1 to {tokens.MAX_TOKEN_TTL} seconds")
        problem = specmod.name_problem(site)
        if problem:
            raise AdminError(f"site {problem}")
        # A token for another site is a founder token: this site keeps it, and its holder
        # founds that site in this mesh through a member of this one (`--peer`). A site the
        # mesh document knows to have members is not founded twice (two Raft groups, one name).
        known = d.mesh.document.get(SiteSummary, site) if site != d.membership.site else None
        if known is not None and known.nodes > 0:
            raise AdminError(f"site {site} already has {known.nodes} member(s); create its join tokens on one of "
                             "them (`meshctl token create` there)")
        if site != d.membership.site and not _arg(request.args, "new_site", bool, default=False):
            sites = sorted({r.site for r in d.mesh.document.records(SiteSummary)} | {d.membership.site})
            raise AdminError(f"site {site} is not a site of this mesh (its sites: {', '.join(sites)}); "
                             "add --new-site to make a token that founds it")
        token_id = secrets.token_hex(tokens.TOKEN_ID_BYTES)
        secret = secrets.token_bytes(tokens.TOKEN_SECRET_BYTES)
        expires_at = time.time() + ttl
        await self._write(request, lambda actor: cmds.CreateToken(token_id=token_id, site=site, secret=secret.hex(),
                                                                  expires_at=expires_at, actor=actor))
        return {"token": tokens.format_token(site, token_id, secret), "site": site, "expires_at": expires_at,
                "token_id": token_id}

    async def token_ls(self, request: AdminRequest, stream) -> list:
        """The join tokens this site issued: by default those that may still be used; never
        their secrets."""
        self._require_member()
        state, now = self._state(), time.time()
        show_all = bool(_arg(request.args, "all", bool, False))
        rows = []
        for token in sorted(state.tokens.values(), key=lambda t: (t.created_at, t.token_id)):
            status = token.status(now)
            if status != "active" and not show_all:
                continue
            used_by = state.nodes.get(token.used_by) if token.used_by else None
            rows.append({"token_id": token.token_id, "site": token.site, "state": status,
                         "founds_site": token.site != state.site, "created_by": token.created_by,
                         "created_at": token.created_at or None, "expires_at": token.expires_at,
                         "used_by": used_by.name if used_by else token.used_by, "revoked_by": token.revoked_by or None})
        return rows

    async def token_revoke(self, request: AdminRequest, stream) -> dict:
        """Withdraw a join token before it is used (by its id, or a unique prefix of it)."""
        self._require_member()
        ref = _arg(request.args, "token", str, required=True).strip()
        if ref.startswith(tokens.TOKEN_PREFIX):  # the whole token, as `token create` printed it
            try:
                ref = tokens.parse_token(ref).token_id
            except tokens.TokenError as e:
                raise AdminError(f"not a join token: {e}") from None
        state = self._state()
        matches = [t for t in state.tokens if t.startswith(ref)] if len(ref) >= 4 else []
        if len(matches) != 1:
            raise AdminError(f"no join token {ref!r}" if not matches else
                             f"{ref!r} names {len(matches)} tokens; give more of the id")
        result = await self._write(request, lambda actor: cmds.RevokeToken(token_id=matches[0], actor=actor))
        return {"token_id": matches[0], "revoked": bool(result["revoked"])}

    def _policy(self, state: SiteState) -> Policy:
        if not state.trust_root or not state.policy:
            raise AdminError("this site has no attestation policy")
        try:
            return open_policy(state.policy, bytes.fromhex(state.trust_root))
        except AttestationError as e:
            raise AdminError(f"the site's policy does not verify: {e}") from None

    async def policy(self, request: AdminRequest, stream) -> dict:
        """The reference values in force, and this node's own measurement to compare."""
        self._require_member()
        policy = self._policy(self._state())
        return {"serial": policy.serial, "min_version": policy.min_version,
                "allowed": {v: sorted(d) for v, d in sorted(policy.allowed_digests.items())},
                "tpm_required_sites": sorted(policy.tpm_required_sites),
                "evidence_max_age": policy.evidence_max_age, "release_keys": sorted(policy.release_keys),
                "mesh_id": policy.mesh_id,
                "this_node": {"version": __version__, "digest": package_digest()}}

    async def policy_allow(self, request: AdminRequest, stream) -> dict:
        """Add a reference value (a meshd version and its package digest): for upgrades."""
        self._require_member()
        version = _arg(request.args, "version", str) or __version__
        digest = _arg(request.args, "digest", str) or package_digest()
        if not VERSION.match(version):
            raise AdminError(f"version must look like 1.2.3, got {version[:40]!r}")
        if not HEX_DIGEST.match(digest):
            raise AdminError("digest must be a sha256 hex digest (64 lowercase hex digits)")
        current = self._policy(self._state())
        allowed = dict(current.allowed_digests)
        allowed[version] = allowed.get(version, frozenset()) | {digest}
        updated = dataclasses.replace(current, serial=current.serial + 1, allowed_digests=allowed,
                                      issued_at=time.time())
        result = await self._sign_policy(request, updated)
        return {"serial": result["serial"], "version": version, "digest": digest, "allowed": True}

    async def policy_require_tpm(self, request: AdminRequest, stream) -> dict:
        """Require (or stop requiring) TPM-backed evidence in a site. Members already in
        with software-only evidence fail their next re-attestation and are expelled."""
        self._require_member()
        d = self.ctx
        site = _arg(request.args, "site", str) or d.membership.site
        required = _arg(request.args, "required", bool, default=True)
        problem = specmod.name_problem(site)
        if problem:
            raise AdminError(f"site: {problem}")
        state = self._state()
        current = self._policy(state)
        # Who in this site has no TPM bound: their next re-attestation fails and revokes them.
        software_only = sorted((n for n in state.nodes.values() if n.site == site and not n.tpm_ak
                                and n.admin not in (ADMIN_LEFT, ADMIN_REVOKED)), key=lambda n: n.name)
        if required and software_only and site not in current.tpm_required_sites:
            problem = trust.expulsion_problem(state, {n.node_id for n in software_only},
                                              d.identity.node_id if d.identity else "")
            if problem is not None and not _arg(request.args, "force", bool, default=False):
                names = ", ".join(n.name for n in software_only)
                raise AdminError(f"not requiring TPM evidence in site {site}: {names} have software-only evidence "
                                 f"and would be revoked at their next re-attestation, so {problem[0]} "
                                 "(--force does it anyway)")
        sites = current.tpm_required_sites | {site} if required else current.tpm_required_sites - {site}
        updated = dataclasses.replace(current, serial=current.serial + 1, tpm_required_sites=frozenset(sites),
                                      issued_at=time.time())
        result = await self._sign_policy(request, updated)
        return {"serial": result["serial"], "site": site, "tpm_required": required,
                "will_revoke": [n.name for n in software_only] if required else []}

    async def policy_release_key(self, request: AdminRequest, stream) -> dict:
        """Trust (or stop trusting) an offline release key for artifact manifests: a new policy
        bundle, signed by the mesh root, names it. Manifests it signed stop opening once it is
        taken out (catalog.manifest_of), so their artifacts are fetched no more."""
        self._require_member()
        key = _arg(request.args, "key", str, required=True).strip().lower()
        if not RELEASE_KEY.fullmatch(key):
            raise AdminError("a release key is an Ed25519 public key: 64 hex digits (meshctl artifact keygen prints it)")
        remove = _arg(request.args, "remove", bool, default=False)
        current = self._policy(self._state())
        keys = current.release_keys - {key} if remove else current.release_keys | {key}
        if not remove and len(keys) > MAX_RELEASE_KEYS:
            raise AdminError(f"the policy names {MAX_RELEASE_KEYS} release keys already; remove one first")
        updated = dataclasses.replace(current, serial=current.serial + 1, release_keys=frozenset(keys),
                                      issued_at=time.time())
        result = await self._sign_policy(request, updated)
        return {"serial": result["serial"], "key": key, "trusted": not remove, "release_keys": sorted(keys)}

    async def _sign_policy(self, request: AdminRequest, updated) -> dict:
        root_key = self.ctx.root_signing_key()
        if root_key is None:
            raise AdminError("only a voter holds the mesh root key; run this on a voter")
        signed = sign_policy(root_key, updated)
        return await self._write(request, lambda actor: cmds.SetPolicy(policy=signed, actor=actor))

    async def revoke(self, request: AdminRequest, stream) -> dict:
        """Expel a member everywhere: a root-signed revocation list naming it, committed with
        the node's revoked state; the leader then removes it from Raft, its workloads are
        placed elsewhere, it stops itself when it sees the news, and no member admits it again."""
        self._require_member()
        d = self.ctx
        ref = _arg(request.args, "node", str)
        reason = (_arg(request.args, "reason", str) or "")[:200]
        if not ref:
            raise AdminError("revoke needs a node name or id")
        state = self._state()
        node = state.node_by_ref(ref)
        if node is None:
            raise AdminError(f"no member named {ref!r}")
        if d.identity is not None and node.node_id == d.identity.node_id:
            raise AdminError("a node cannot revoke itself; run this on another member")
        if node.admin == ADMIN_REVOKED:
            return {"node": node.name, "revoked": True, "node_id": node.node_id}
        await self._wait_for_quorum()
        try:
            result = await self._revoke(node, _actor(request, d), reason,
                                        force=_arg(request.args, "force", bool, default=False))
        except CommandFailed as e:
            raise AdminError(f"{e}; the revocation may not have been applied, check before retrying") from None
        if isinstance(result, Refused):
            raise AdminError(result.text)
        return {"node": node.name, "revoked": True, "node_id": node.node_id,
                "revocation_list": result["number"], "secret_epoch": d.membership.secret_epoch}
