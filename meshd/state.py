"""Records of one site's replicated state: nodes, apps, allocations, tokens.

Invariants:
- Every record is a frozen dataclass of plain data (str, int, float, bool, tuples, and
  dicts treated as read-only). They are pickled into the Raft snapshot, so they hold no
  sockets, locks, callbacks or clocks.
- Records are replaced, never mutated: `dataclasses.replace(record, field=...)`.
- Times are seconds since the epoch as supplied by the command that wrote them (the
  proposer's clock); nothing here reads a clock.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

# --- node states -------------------------------------------------------------------
# `liveness` is decided by the leader from heartbeats; `admin` by operators. The state the
# CLI shows combines them (see NodeRecord.state).
LIVENESS_JOINING = "joining"  # admitted, its first report not seen yet
LIVENESS_READY = "ready"
LIVENESS_DOWN = "down"

ADMIN_ACTIVE = "active"
ADMIN_DRAINING = "draining"
ADMIN_LEFT = "left"
ADMIN_REVOKED = "revoked"

# A member whose software the policy does not know (its re-attestation showed a package
# digest or version the policy lacks) is quarantined: not an admin state an operator sets, but
# the site's: its workloads move, it gets no secrets, and the next re-attestation the policy
# accepts releases it (meshd.node.attesting). Revocation stays the operator's decision.
STATE_QUARANTINED = "quarantined"

NODE_STATES = ("ready", "down", "draining", "left", "revoked", "joining", STATE_QUARANTINED)

# --- allocation states (contract: pending, running, failed, stopped, lost) -------------
ALLOC_PENDING = "pending"
ALLOC_RUNNING = "running"
ALLOC_FAILED = "failed"
ALLOC_STOPPED = "stopped"
ALLOC_LOST = "lost"
ALLOC_STATES = (ALLOC_PENDING, ALLOC_RUNNING, ALLOC_FAILED, ALLOC_STOPPED, ALLOC_LOST)
# An allocation in one of these states will never run again on its node.
ALLOC_TERMINAL = frozenset({ALLOC_FAILED, ALLOC_STOPPED, ALLOC_LOST})

DESIRED_RUN = "run"
DESIRED_STOP = "stop"

APP_RUNNING = "running"
APP_STOPPED = "stopped"
# How an app is doing, as `meshctl apps` shows it (app_health): besides running and stopped,
APP_DEGRADED = "degraded"  # fewer replicas run than it wants (starting, restarting, unplaced, a site behind)
APP_FAILED = "failed"  # none runs and its replicas fail (crashed past their restart policy, or crash-looping)


def app_health(*, stopped: bool, desired: int, running: int, failing: bool) -> str:
    """One word for an app: stopped; running when every replica it wants runs; failed when
    none runs and `failing` (a replica failed, or keeps restarting); else degraded."""
    if stopped:
        return APP_STOPPED
    if running >= desired:
        return APP_RUNNING
    if running == 0 and failing:
        return APP_FAILED
    return APP_DEGRADED

RESTART_POLICIES = ("always", "on-failure", "never")

# --- deployments (meshd.rollout decides their moves; sitestate records them) -----------
DEPLOY_RUNNING = "running"
DEPLOY_PAUSED = "paused"
DEPLOY_AWAITING = "awaiting-promotion"
DEPLOY_SUCCEEDED = "succeeded"
DEPLOY_FAILED = "failed"
DEPLOY_REVERTED = "reverted"
DEPLOY_CANCELLED = "cancelled"
DEPLOY_ACTIVE = frozenset({DEPLOY_RUNNING, DEPLOY_PAUSED, DEPLOY_AWAITING})
DEPLOY_STATES = (DEPLOY_RUNNING, DEPLOY_PAUSED, DEPLOY_AWAITING, DEPLOY_SUCCEEDED, DEPLOY_FAILED, DEPLOY_REVERTED,
                 DEPLOY_CANCELLED)

# --- app versions (`meshctl history`) ---------------------------------------------------
VERSION_RUNNING = "running"  # its deployment is under way, or it failed and nothing replaced it
VERSION_STABLE = "stable"  # every replica was healthy for min_healthy_s: what a revert returns to
VERSION_FAILED = "failed"
VERSION_REVERTED = "reverted"  # it failed and the app went back to the last stable version
VERSION_SUPERSEDED = "superseded"  # a later version replaced it
VERSION_STATES = (VERSION_STABLE, VERSION_FAILED, VERSION_REVERTED, VERSION_SUPERSEDED, VERSION_RUNNING)


@dataclass(frozen=True)
class Constraints:
    arch: tuple[str, ...] = ()  # empty: any architecture
    labels: Mapping[str, str] = field(default_factory=dict)  # all must match


@dataclass(frozen=True)
class ResourceRequest:
    """What an app asks of a node per replica (`[app.resources]`): placement counts cpu and
    memory against the node's free capacity, and the node enforces all three as limits
    (meshd.io.cgroups). 0 is none."""

    cpu: float = 0.0  # cores: a CPU quota
    memory_mb: int = 0  # a hard memory limit
    pids: int = 0  # a process limit
    # Devices it needs of each kind (`devices = { gpu = 1 }`), sorted by kind: placed only where
    # that many are free, each handed to one workload at a time (meshd.io.devices).
    devices: tuple[tuple[str, int], ...] = ()

    @property
    def controllers(self) -> frozenset[str]:
        """The cgroup controllers that enforce these limits."""
        return frozenset(name for name, value in (("cpu", self.cpu), ("memory", self.memory_mb), ("pids", self.pids))
                         if value)


HEALTH_KINDS = ("process", "tcp", "http", "exec")
# A replica's health as `allocs` shows it: not running (none), no verdict yet (checking:
# within its grace or before its first check), or the last verdict.
HEALTH_NONE, HEALTH_CHECKING, HEALTH_HEALTHY, HEALTH_UNHEALTHY = "none", "checking", "healthy", "unhealthy"
HEALTH_STATES = (HEALTH_NONE, HEALTH_CHECKING, HEALTH_HEALTHY, HEALTH_UNHEALTHY)


@dataclass(frozen=True)
class HealthCheck:
    """How a replica's health is judged (`[app.health]`); the default: running is healthy."""

    kind: str = "process"  # process | tcp | http | exec
    port: int = 0  # tcp, http: on the node's loopback
    path: str = "/"  # http: a status 200-399 passes
    command: tuple[str, ...] = ()  # exec: exit status 0 passes
    interval_s: float = 10.0
    timeout_s: float = 2.0
    failures: int = 3  # consecutive failed checks make the replica unhealthy (then restarted)
    grace_s: float = 0.0  # after a start, failures do not count for this long


@dataclass(frozen=True)
class UpdatePolicy:
    """How a changed spec replaces running replicas in one site (`[app.update]`)."""

    max_parallel: int = 1  # new replicas not yet counted healthy, at most, while old ones are replaced
    canary: int = 0  # new replicas started first, beside the old ones, until promoted
    min_healthy_s: float = 10.0  # healthy this long before a new replica counts (and its old one stops)
    healthy_deadline_s: float = 300.0  # a new replica not healthy this long after it started or fell ill failed
    progress_deadline_s: float = 600.0  # no new replica counted healthy for this long: the deployment failed
    auto_revert: bool = True  # a failed deployment returns to the last stable version
    auto_promote: bool = False  # canaries promote themselves once all are healthy
    keep_versions: int = 10  # versions of the app whose spec is kept (beside pinned and running ones)


# `[app.rollout]`: across the sites an app names, in waves (meshd.waves decides).
MAX_WAVES = 16  # phases of one rollout; Mender's and AWS IoT's are a handful
MAX_SOAK_S = 30 * 24 * 3600.0  # a wave soaking longer than a month is a mistake, not a plan


@dataclass(frozen=True)
class Wave:
    """One phase of a rollout: the sites named, or a share of the app's sites counted from the
    first wave on (cumulative), then how long it soaks before the next wave starts."""

    sites: tuple[str, ...] = ()
    percent: int = 0  # 1-100 when `sites` is empty
    soak_s: float = 0.0


@dataclass(frozen=True)
class RolloutPlan:
    waves: tuple[Wave, ...] = ()
    # Stop and return every reached site when at least this share of the app's sites failed
    # (0: at the first failed site).
    abort_failed_percent: int = 0


@dataclass(frozen=True)
class ArtifactRef:
    """A file the app's workloads need (`[[app.artifact]]`, meshd.artifacts)."""
    name: str  # what the workload calls it: MESHD_ARTIFACT_<NAME>, ${artifact:NAME}
    digest: str = ""  # sha256:<hex>; "" only while `file` waits to be pushed by `meshctl deploy`
    unpack: bool = False  # an archive the workload sees unpacked into a directory
    file: str = ""  # relative to the spec: what `meshctl deploy` pushes (never kept in a stored spec)


@dataclass(frozen=True)
class AppSpec:
    """A validated app as the operator wrote it (see meshd.spec for parsing)."""

    name: str
    replicas: int
    command: tuple[str, ...]
    sites: tuple[str, ...] = ()  # empty: the site it was deployed in
    env: Mapping[str, str] = field(default_factory=dict)
    constraints: Constraints = field(default_factory=Constraints)
    resources: ResourceRequest = field(default_factory=ResourceRequest)
    restart_policy: str = "always"
    # A class-level default (not a factory): a spec unpickled from an older snapshot has it.
    health: HealthCheck = HealthCheck()
    update: UpdatePolicy = UpdatePolicy()
    rollout: RolloutPlan | None = None  # None: every site the app names takes a change at once
    user: str = ""  # the user its workloads run as ("": the node's workload-user, never root by default)
    artifacts: tuple[ArtifactRef, ...] = ()  # files it needs on its node before it starts

    def to_plain(self) -> dict:
        return dataclasses.asdict(self) | {
            "command": list(self.command),
            "sites": list(self.sites),
            "env": dict(self.env),
            "health": dataclasses.asdict(self.health) | {"command": list(self.health.command)},
        }


@dataclass(frozen=True)
class NodeResources:
    """What a node last reported about itself (psutil)."""

    cpu_total: float = 0.0  # logical cores
    cpu_free: float = 0.0  # cores idle over the last sample
    mem_total_mb: int = 0
    mem_free_mb: int = 0  # available memory
    # Which `[app.resources]` limits it enforces (cgroup controllers: cpu, memory, pids) and
    # with which cgroup version (0: none); an app whose limits it cannot is not placed there.
    enforces: tuple[str, ...] = ()
    cgroup: int = 0
    # What it keeps for meshd itself (config reserve-cpu, reserve-memory-mb): never placed on.
    reserved_cpu: float = 0.0
    reserved_mem_mb: int = 0
    # Devices it has, by kind, sorted: found at start (NVIDIA GPUs, render nodes) or configured.
    devices: tuple[tuple[str, int], ...] = ()
    oom_kills: int = 0  # workload runs its memory limits killed since its daemon started

    @property
    def placeable_cpu(self) -> float:
        return max(0.0, self.cpu_total - self.reserved_cpu)

    @property
    def placeable_mem_mb(self) -> int:
        return max(0, self.mem_total_mb - self.reserved_mem_mb)

    @property
    def placeable_free_mb(self) -> int:
        """Memory available now, less the reserve."""
        return max(0, self.mem_free_mb - self.reserved_mem_mb)


@dataclass(frozen=True)
class NodeRecord:
    node_id: str
    name: str
    site: str
    address: str  # peer endpoint "ip:port" (join, member RPC)
    raft_address: str  # "ip:port" of this node's Raft listener
    public_key: str  # hex of the raw Ed25519 public key; node_id derives from it
    arch: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    voter: bool = False
    liveness: str = LIVENESS_JOINING
    admin: str = ADMIN_ACTIVE
    resources: NodeResources = field(default_factory=NodeResources)
    heartbeat_seq: int = 0  # last heartbeat sequence applied; the leader watches it move
    version: str = ""  # meshd version the node runs
    joined_at: float = 0.0
    state_changed_at: float = 0.0
    reason: str = ""  # why the node is in its current state (shown by `meshctl nodes`)
    boot_id: str = ""  # the kernel boot the node last reported running in
    attested_boot_id: str = ""  # the boot its last verified evidence came from
    attested_at: float = 0.0  # when its evidence last verified (admission or re-attestation)
    # Its clock less the leader's at its last re-attestation, seconds: told (`nodes`, its
    # own `status`, an event past attestation.policy.MAX_CLOCK_SKEW), never a reason to expel.
    clock_skew_s: float = 0.0
    tpm_ak: str = ""  # hex TPM2B_PUBLIC of its TPM attestation key, bound at admission; "" = software-only
    # The package digest of the meshd the node reports running (measured at its start), and
    # the one its last verified evidence carried: a node that runs other software than it
    # proved is due for re-attestation at once (meshd.reattest). "" = not known yet.
    software: str = ""
    attested_software: str = ""
    # Why the node is quarantined ("" = it is not): names the version and full digest its
    # evidence showed, so the operator can allow it (`meshctl policy allow`).
    quarantine: str = ""
    # The artifacts it holds complete and verified (digests, sorted): where the site's
    # members fetch them from (meshd.artifacts.catalog).
    artifacts: tuple[str, ...] = ()

    @property
    def state(self) -> str:
        """The one word the CLI shows: left/revoked win, then down, quarantined, draining."""
        if self.admin in (ADMIN_LEFT, ADMIN_REVOKED):
            return self.admin
        if self.liveness == LIVENESS_DOWN:
            return "down"
        if self.quarantine:
            return STATE_QUARANTINED
        if self.liveness == LIVENESS_JOINING:
            return "joining"
        if self.admin == ADMIN_DRAINING:
            return "draining"
        return "ready"

    @property
    def schedulable(self) -> bool:
        return self.state == "ready"

    @property
    def emptying(self) -> bool:
        """Its workloads move elsewhere (each kept until its replacement is placed): it is
        draining, or quarantined."""
        return self.admin == ADMIN_DRAINING or bool(self.quarantine)


@dataclass(frozen=True)
class AppVersion:
    """One accepted version of an app: its spec is kept while the version is in the history."""

    version: int
    spec: AppSpec
    digest: str  # sha256 of the spec's canonical JSON: equal digests, equal specs
    submitted_at: float
    by: str
    site: str  # where it was deployed from
    state: str = VERSION_RUNNING  # VERSION_*
    pinned: bool = False  # kept whatever keep_versions says
    reason: str = ""  # why it failed or was reverted


@dataclass(frozen=True)
class Deployment:
    """One version replacing another in this site (meshd.rollout)."""

    version: int
    from_version: int  # the version it replaces; 0 for an app's first version
    state: str = DEPLOY_RUNNING  # DEPLOY_*
    started_at: float = 0.0
    moved_at: float = 0.0  # its last promotion or resume: progress is counted from there too
    ended_at: float = 0.0
    canary: int = 0  # canaries this deployment starts before the rest (0: none)
    promoted: bool = False  # its canaries were promoted (or it has none)
    revert: bool = False  # it returns to a stable version after a failed one: no canaries, no pace
    reason: str = ""  # why it failed, was reverted or cancelled
    by: str = ""  # who last moved it (an operator, or the site's leader)
    edit_id: str = ""  # the mesh edit that started it ("" for a revert, or a deploy without one)

    @property
    def active(self) -> bool:
        return self.state in DEPLOY_ACTIVE


@dataclass(frozen=True)
class AppRecord:
    spec: AppSpec
    version: int  # bumped on every accepted change of spec
    status: str = APP_RUNNING  # running | stopped
    submitted_at: float = 0.0
    submitted_by: str = ""
    # The mesh document's edit this record runs (crdt.schema.AppEdit): its id, and its
    # version, which counts edits of the app across every site (`version` counts this
    # site's changes of spec and never goes back; the two agree unless sites conflicted).
    edit_id: str = ""
    mesh_version: int = 0
    stopped_at: float = 0.0  # when it was last stopped (status stopped); purged a retention later
    # Versions and deployments (class-level defaults: a record unpickled from an older
    # snapshot has none). `history` is oldest first and bounded (meshd.sitestate); the
    # deployments are the latest few, newest last.
    history: tuple[AppVersion, ...] = ()
    deployments: tuple[Deployment, ...] = ()
    latest_version: int = 0  # the highest version ever given: a revert moves `version` back, never this
    # Versions whose spec equals `spec` but for replicas and [app.update]: their replicas
    # hold this version's places, so a scale change, or going back to one (rollback, revert,
    # cancel), restarts nothing that already runs it.
    same_spec: tuple[int, ...] = ()

    def runs(self, version: int) -> bool:
        """Whether a replica of `version` is a replica of the current spec."""
        return version == self.version or version in self.same_spec

    @property
    def deployment(self) -> Deployment | None:
        """The latest deployment, if any (active or ended)."""
        return self.deployments[-1] if self.deployments else None

    def spec_of(self, version: int) -> AppSpec:
        """The spec a replica of `version` runs: from the history; the current one when it
        was forgotten (never while a replica of it lives) or predates the history."""
        for entry in reversed(self.history):
            if entry.version == version:
                return entry.spec
        return self.spec

    def version_entry(self, version: int) -> AppVersion | None:
        return next((e for e in self.history if e.version == version), None)

    @property
    def stable_version(self) -> AppVersion | None:
        """The newest stable version."""
        return next((e for e in reversed(self.history) if e.state == VERSION_STABLE), None)


@dataclass(frozen=True)
class Alloc:
    """One replica of one app version, placed on one node."""

    alloc_id: str
    app: str
    version: int
    replica: int  # 0 .. replicas-1; reconcile keeps exactly one live alloc per index
    node_id: str
    desired: str = DESIRED_RUN  # run | stop: what the site wants of it
    state: str = ALLOC_PENDING  # what its node last reported (or lost)
    pid: int | None = None
    restarts: int = 0
    exit_code: int | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    reason: str = ""  # why it was stopped, lost or failed
    health: str = HEALTH_NONE  # what its node's health checks last said (HEALTH_*)
    canary: bool = False  # placed as a canary of its version's deployment
    # Since when it has counted healthy (running, and its check passing or none); 0: it
    # does not now. A deployment counts it once it has for min_healthy_s.
    healthy_at: float = 0.0
    # Since when it has been placed or fell ill without counting healthy: a deployment
    # fails when this lasts past healthy_deadline_s.
    unhealthy_since: float = 0.0

    @property
    def live(self) -> bool:
        """Counts towards the app's replicas: wanted and not finished."""
        return self.desired == DESIRED_RUN and self.state not in ALLOC_TERMINAL


@dataclass(frozen=True)
class JoinToken:
    token_id: str
    site: str
    secret: str  # hex; needed to check the joiner's HMAC proof, so kept, only inside the site
    expires_at: float
    created_by: str = ""
    used_by: str | None = None  # node_id that consumed it: tokens are single-use
    created_at: float = 0.0  # 0: made before this was recorded
    revoked_by: str = ""  # who withdrew it before use ("" = not revoked)

    def status(self, now: float) -> str:
        """One word for `meshctl token ls`: used, revoked, expired or active."""
        if self.used_by is not None:
            return "used"
        if self.revoked_by:
            return "revoked"
        return "expired" if self.expires_at <= now else "active"


@dataclass(frozen=True)
class Event:
    ts: float
    kind: str  # placement | membership | node | app | token | alloc
    message: str
    data: Mapping[str, object] = field(default_factory=dict)
    seq: int = 0  # 1, 2, ... per site, never reused (0: written before events were numbered)

    def to_plain(self) -> dict:
        return {"ts": self.ts, "kind": self.kind, "message": self.message, **dict(self.data)}


def events_after(events: Sequence[Event], seq: int) -> list[Event]:
    """The events numbered after `seq`, oldest first: what a follower has not seen. Walks
    from the end, so it costs the new events, not the (capped) history."""
    new = []
    for event in reversed(events):
        if event.seq <= seq:
            break
        new.append(event)
    new.reverse()
    return new


@dataclass(frozen=True)
class AuditRecord:
    ts: float
    actor: str
    action: str
    target: str
    site: str
    seq: int = 0  # 1, 2, ... per site: names the record in the mesh document
    reason: str = ""  # why, when the action has a why (a refusal, a quarantine, a revocation)

    def to_plain(self) -> dict:
        return dataclasses.asdict(self)


# Stamps of AllocTable writes: one counter for every table of the process, so no two writes
# anywhere share a stamp (see AllocTable).
_STAMPS = itertools.count(1)
_EMPTY: Mapping[str, int] = {}


class AllocTable(dict):
    """The site's allocations by id, with two indexes kept in step on every write: the ids on
    each node and the ids of each app. Placement asks "what runs on this node" for every node
    it weighs, and the leader "what does this app have" for every app: with the indexes each
    costs what it returns, not a walk over every allocation of the site.

    Invariants:
    - `on_node(n)` holds exactly the allocations whose node is n, and `of_app(a)` those of app
      a, each in the order the ids were first written (the table's own order): the same on
      every member, so iterating them is as deterministic as iterating the table.
    - An allocation's node and app never change (a new placement is a new id); a write that
      tries is refused, so no index can go stale.
    - `live_on(n)` maps each app to how many of its allocations on node n are live
      (`Alloc.live`), apps with none left out; `live_count(n)` is their sum. Placement prices
      a node from these, in what the node runs, not in the site's allocations.
    - Every write stamps the app it touched with a number from one process-wide counter
      (`app_stamp`; 0 once the app has no allocation left, so the table holds stamps only of
      apps it holds): a stamp never comes back, so a reader that remembers an app's stamp
      knows the app's allocations are unchanged exactly when the stamp is (in any copy, and
      across a table rebuilt from a snapshot, whose stamps are all new).
    - It pickles as a plain mapping and rebuilds its indexes on load (snapshots of older
      versions hold a plain dict).
    """

    def __init__(self, items: Mapping[str, Alloc] | None = None) -> None:
        super().__init__()
        self._by_node: dict[str, dict[str, None]] = {}
        self._by_app: dict[str, dict[str, None]] = {}
        self._live: dict[str, dict[str, int]] = {}  # node -> app -> live allocations
        self._live_total: dict[str, int] = {}  # node -> live allocations
        self._stamps: dict[str, int] = {}  # app -> stamp of its last write
        if items:
            self._load(items.values())

    def _load(self, allocs: Iterable[Alloc]) -> None:
        """Fill an empty table at once (a snapshot load): what __setitem__ does, per
        allocation, without its checks, which an empty table cannot fail."""
        by_node, by_app, live, total = self._by_node, self._by_app, self._live, self._live_total
        for alloc in allocs:
            alloc_id, node, app = alloc.alloc_id, alloc.node_id, alloc.app
            dict.__setitem__(self, alloc_id, alloc)
            by_node.setdefault(node, {})[alloc_id] = None
            by_app.setdefault(app, {})[alloc_id] = None
            if alloc.desired == DESIRED_RUN and alloc.state not in ALLOC_TERMINAL:  # Alloc.live
                apps = live.setdefault(node, {})
                apps[app] = apps.get(app, 0) + 1
                total[node] = total.get(node, 0) + 1
        stamp = next(_STAMPS)
        self._stamps = dict.fromkeys(by_app, stamp)

    @classmethod
    def of(cls, allocs: Iterable[Alloc]) -> "AllocTable":
        """A table of these allocations, keyed by their ids (each id once)."""
        table = cls()
        table._load(allocs)
        return table

    def _count_live(self, alloc: Alloc, delta: int) -> None:
        node, app = alloc.node_id, alloc.app
        apps = self._live.setdefault(node, {})
        left = apps.get(app, 0) + delta
        if left:
            apps[app] = left
        else:
            apps.pop(app, None)
        total = self._live_total.get(node, 0) + delta
        if total:
            self._live_total[node] = total
        else:
            self._live_total.pop(node, None)
            self._live.pop(node, None)

    def __setitem__(self, alloc_id: str, alloc: Alloc) -> None:
        old = self.get(alloc_id)
        if old is not None:
            if (old.node_id, old.app) != (alloc.node_id, alloc.app):
                raise ValueError(f"allocation {alloc_id} cannot move to another node or app")
            if old.live:
                self._count_live(old, -1)
        else:
            self._by_node.setdefault(alloc.node_id, {})[alloc_id] = None
            self._by_app.setdefault(alloc.app, {})[alloc_id] = None
        if alloc.live:
            self._count_live(alloc, +1)
        self._stamps[alloc.app] = next(_STAMPS)
        super().__setitem__(alloc_id, alloc)

    def __delitem__(self, alloc_id: str) -> None:
        alloc = self[alloc_id]
        super().__delitem__(alloc_id)
        for index, key in ((self._by_node, alloc.node_id), (self._by_app, alloc.app)):
            ids = index[key]
            del ids[alloc_id]
            if not ids:
                del index[key]
        if alloc.live:
            self._count_live(alloc, -1)
        if alloc.app in self._by_app:
            self._stamps[alloc.app] = next(_STAMPS)
        else:
            del self._stamps[alloc.app]  # no allocation left: back to 0, like an app never written

    def pop(self, alloc_id: str, *default: Alloc | None) -> Alloc | None:  # type: ignore[override]
        if alloc_id not in self:
            if default:
                return default[0]
            raise KeyError(alloc_id)
        alloc = self[alloc_id]
        del self[alloc_id]
        return alloc

    def update(self, *args, **kwargs) -> None:  # type: ignore[override]
        for alloc_id, alloc in dict(*args, **kwargs).items():
            self[alloc_id] = alloc

    def setdefault(self, *args):  # type: ignore[override]
        raise TypeError("AllocTable: assign allocations one by one")

    popitem = clear = setdefault  # type: ignore[assignment]

    def copy(self) -> "AllocTable":  # type: ignore[override]
        """A copy whose writes leave this table (and its indexes) alone."""
        copied = AllocTable.__new__(AllocTable)
        dict.update(copied, self)
        copied._by_node = {node: dict(ids) for node, ids in self._by_node.items()}
        copied._by_app = {app: dict(ids) for app, ids in self._by_app.items()}
        copied._live = {node: dict(apps) for node, apps in self._live.items()}
        copied._live_total = dict(self._live_total)
        copied._stamps = dict(self._stamps)
        return copied

    def on_node(self, node_id: str) -> list[Alloc]:
        return [self[i] for i in self._by_node.get(node_id, ())]

    def of_app(self, app: str) -> list[Alloc]:
        return [self[i] for i in self._by_app.get(app, ())]

    def count_of_app(self, app: str) -> int:
        """How many allocations the app has (what len(of_app) says, without building it)."""
        return len(self._by_app.get(app, ()))

    def live_on(self, node_id: str) -> Mapping[str, int]:
        """App -> live allocations on the node (read-only: the table's own index)."""
        return self._live.get(node_id, _EMPTY)

    def live_count(self, node_id: str) -> int:
        return self._live_total.get(node_id, 0)

    def app_stamp(self, app: str) -> int:
        """Changes whenever an allocation of the app is written or removed (0: it has none)."""
        return self._stamps.get(app, 0)

    def apps(self) -> Iterable[str]:
        """Apps with at least one allocation."""
        return self._by_app.keys()

    def __reduce__(self):
        return (AllocTable, (dict(self),))


class AppWatch:
    """Which apps changed since this watch last looked: a replaced record (records are
    replaced, never mutated) or a new allocation stamp (AllocTable.app_stamp). A look costs
    a walk of the apps, never of their allocations.

    `changed(state)` names the apps new, changed or gone since the previous call and counts
    them as seen; `forget(app)` makes the next call name `app` again; `clear()` forgets all.
    """

    def __init__(self) -> None:
        self._seen: dict[str, tuple[object, int]] = {}

    def changed(self, state: "SiteState") -> set[str]:
        seen, stamp, apps = self._seen, state.allocs.app_stamp, state.apps
        names = apps.keys() | state.allocs.apps() | seen.keys()
        out = {app for app in names if (entry := seen.get(app)) is None or entry[0] is not apps.get(app)
               or entry[1] != stamp(app)}
        for app in out:
            if app in apps or stamp(app):
                seen[app] = (apps.get(app), stamp(app))
            else:
                seen.pop(app, None)  # gone for good: nothing left to remember
        return out

    def forget(self, app: str) -> None:
        self._seen.pop(app, None)

    def clear(self) -> None:
        self._seen.clear()


# Digests kept for checkpoints (SiteState.recent_chains): a checkpoint commits a few entries
# after the leader made it; 64 entries is more than a site's busiest second of reports.
KEPT_CHAINS = 64


@dataclass
class SiteState:
    """The whole replicated state of one site. Mutated only by meshd.sitestate.apply()."""

    site: str = ""
    mesh_id: str = ""
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    apps: dict[str, AppRecord] = field(default_factory=dict)
    allocs: AllocTable = field(default_factory=AllocTable)
    tokens: dict[str, JoinToken] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    audit: list[AuditRecord] = field(default_factory=list)
    # request_id -> result of the command that carried it, so a retried command (its
    # first outcome unknown after a failover) is answered, not applied twice.
    applied_requests: dict[str, dict] = field(default_factory=dict)
    applied_order: list[str] = field(default_factory=list)
    applied_at: list[float] = field(default_factory=list)  # last_ts when each was remembered
    last_ts: float = 0.0  # highest command timestamp applied
    # The mesh trust root (attestation): the root's raw Ed25519 public key (hex), its CA
    # certificate (PEM), the signed policy bundle and the signed revocation list in force.
    trust_root: str = ""
    root_cert: str = ""
    policy: dict = field(default_factory=dict)
    revocations: dict = field(default_factory=dict)
    # The latest mesh-document edit of each app this site has taken in (crdt.schema.AppEdit
    # as plain data), whether or not the app runs here: the leader compares it with the
    # document's winner, and re-publishes it if the document lacks it.
    mesh_edits: dict[str, dict] = field(default_factory=dict)
    audit_seq: int = 0  # audit records written so far (the last one's seq)
    # Events written so far: `events --follow` follows by it, since the kept history is capped
    # (its length stops moving once full, its content does not).
    event_seq: int = 0
    # How many times the Raft secret was replaced (after revocations); the secret itself
    # never enters the replicated state, which every member, revoked or not, could read.
    secret_epoch: int = 0
    # Log entries applied so far (refused ones too): the same on every member at the same
    # point of the log, so a copy of the state with a smaller count is an older view of it
    # (a Raft node still replaying its journal after a restart).
    applied: int = 0
    # A digest of every log entry applied so far, each chained onto the one before
    # (sitestate.apply): the same on every member at the same point of the log. The last
    # KEPT_CHAINS of them, as (applied, chain), so that the leader's Checkpoint, made a few
    # entries back, is compared with this member's digest at the same point.
    chain: bytes = b""
    recent_chains: tuple[tuple[int, bytes], ...] = ()
    # Set on the member whose digest differed from the leader's at a Checkpoint (why): it
    # holds another history than the site's, serves nothing from it, and rebuilds it.
    diverged: str = ""
    # The artifact catalog (meshd.artifacts.catalog): digest -> its signed manifest, and
    # digest -> when the manifest last removed from it was pushed (an older copy is a replay).
    artifacts: dict[str, dict] = field(default_factory=dict)
    artifacts_removed: dict[str, float] = field(default_factory=dict)

    def __setattr__(self, name: str, value: object) -> None:
        if name == "allocs" and not isinstance(value, AllocTable):
            value = AllocTable(value)  # type: ignore[arg-type]  # any mapping of allocations: indexed
        object.__setattr__(self, name, value)

    def __setstate__(self, saved: dict) -> None:
        # A snapshot written by an older meshd lacks the fields added since: they take
        # their defaults instead of being missing.
        self.__dict__.update(SiteState().__dict__)
        self.__dict__.update(saved)
        if not isinstance(self.allocs, AllocTable):
            self.allocs = AllocTable(self.allocs)

    def reader_copy(self) -> "SiteState":
        """A copy for readers outside the state machine: later commands leave it alone. The
        request-dedupe records (up to MAX_REMEMBERED_REQUESTS, only ever read by the state
        machine) are left out: copying them was most of a copy's cost."""
        copied = copy.copy(self)
        for name in ("nodes", "apps", "tokens", "mesh_edits", "artifacts", "artifacts_removed"):
            setattr(copied, name, dict(getattr(self, name)))
        copied.allocs = self.allocs.copy()
        copied.events, copied.audit = list(self.events), list(self.audit)
        copied.applied_requests, copied.applied_order, copied.applied_at = {}, [], []
        return copied

    def snapshot_copy(self) -> "SiteState":
        """A copy of the whole replicated state, the request-dedupe records included, that
        later commands leave alone (for a Raft snapshot written on another thread)."""
        copied = self.reader_copy()
        copied.applied_requests, copied.applied_order = dict(self.applied_requests), list(self.applied_order)
        copied.applied_at = list(self.applied_at)
        return copied

    # --- read helpers used by placement, reconcile and the admin layer ---------------
    def node_by_ref(self, ref: str) -> NodeRecord | None:
        """Find a node by id, name or unique id prefix."""
        if ref in self.nodes:
            return self.nodes[ref]
        by_name = [n for n in self.nodes.values() if n.name == ref]
        if len(by_name) == 1:
            return by_name[0]
        by_prefix = [n for n in self.nodes.values() if n.node_id.startswith(ref)]
        if len(by_prefix) == 1 and len(ref) >= 4:
            return by_prefix[0]
        return None

    def allocs_on(self, node_id: str) -> list[Alloc]:
        return self.allocs.on_node(node_id)

    def current_allocs(self, app: str) -> list[Alloc]:
        """Live allocations of the app's current version."""
        record = self.apps[app]
        return [a for a in self.allocs.of_app(app) if record.runs(a.version) and a.live]

    def running_replicas(self, app: str) -> int:
        """Replicas of the app's current version reported running."""
        return sum(1 for a in self.current_allocs(app) if a.state == ALLOC_RUNNING)

    def failing(self, app: str) -> bool:
        """An allocation of the app's current version failed, or is restarting after a crash."""
        record = self.apps[app]
        return any(record.runs(a.version) and (a.state == ALLOC_FAILED or (a.restarts and a.state != ALLOC_RUNNING))
                   for a in self.allocs.of_app(app))

    def live_allocs(self, app: str) -> list[Alloc]:
        return [a for a in self.allocs.of_app(app) if a.live]
