"""The twin's engine: a site of in-memory nodes running the real node core (meshd.node) on
one applied log. The transcript harness (tests/harness) and `meshd sim` (meshd.twin.run)
both drive it; neither holds a copy of any decision.

What is real: the state machine (meshd.sitestate, every command through its wire form), the
cores (leading, worker, trust, attesting, admitting, joining), the admission verdict with
real signatures, tokens and evidence, reconcile and placement. What is simulated, because a
transcript must be exact and fast: Raft (one committed log; a leader and term set by the
transcript; a node applies the log while it is up, reachable and not replaying), the clock,
the network (a node is reachable or not), and the supervisor (a workload runs from the
moment it is asked for until it is stopped; a stop by meshd is reported as such).

Invariants:
- Deterministic: keys, nonces, request ids and allocation ids derive from names and
  counters, so a transcript's output is the same on every run.
- Effects are carried out the way meshd.io.context.NodeContext.execute does: in order, a commit's
  follow-ups once it committed, nothing on a commit that did not.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from attestation.certs import cert_to_pem, make_root
from attestation.evidence import MEASURED_CONFIG, MEASURED_PACKAGE, Claims, make_evidence
from attestation.policy import Policy, open_policy, sign_policy
from attestation.revocation import RevocationList, open_revocations, sign_revocations
from crdt.document import AppResolution
from crdt.schema import AppEdit
from meshd import admission, commands as cmds, meshstate, sitestate, tokens
from meshd.commands import Ok, Refused, Result
from meshd.node import admitting, effects as fx, trust
from meshd.node.attesting import Attesting
from meshd.node.joining import Joining, Unreachable
from meshd.node.leading import LeaderView, Leading
from meshd.node.worker import Worker
from meshd.reporting import ReportSchedule, reflected_in, resources_moved
from meshd.state import SiteState

WALL0 = 1_800_000_000.0  # the wall clock at time 0 of every transcript
LEASE = 1.0
TICK = 0.1
SIM_CHECK_S = 1.0  # a simulated health check gives its verdict this long after the start
DIGEST = hashlib.sha256(b"meshd sim package").hexdigest()
MODIFIED_DIGEST = hashlib.sha256(b"meshd sim package, modified").hexdigest()
CONFIG_DIGEST = hashlib.sha256(b"sim config").hexdigest()
VERSION = "0.1.0"
MESH_ID = "mesh-sim"
# How long (in ticks) a Raft node restarted for a secret rotation replays its journal
# before its state is current again.
REPLAY_TICKS = 3


def _key(name: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"sim key {name}".encode()).digest())


def _raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# The flags that decide whether a member applies the log as it commits (SimSite.applies).
_APPLY_FLAGS = frozenset({"up", "paused", "expelled", "reachable", "member", "replay_left"})


@dataclass(frozen=True)
class Profile:
    """What a simulated node is: its platform, labels and what it reports of its resources."""

    arch: str = "x86_64"
    labels: tuple[tuple[str, str], ...] = ()
    cpu: float = 4.0
    mem_mb: int = 4096
    devices: tuple[tuple[str, int], ...] = ()


@dataclass
class SimNode:
    name: str
    index: int
    key: Ed25519PrivateKey
    site: str
    profile: Profile = field(default_factory=Profile)
    state: SiteState = field(default_factory=SiteState)
    member: bool = False  # holds a membership (joined or founded)
    up: bool = True  # its daemon runs
    paused: bool = False  # its daemon is stopped (SIGSTOP, a hung disk): it neither acts nor answers
    reachable: bool = True  # the network reaches it
    replay_left: int = 0  # ticks until a restarted Raft node caught up
    revoked_notice: str | None = None
    expelled: str | None = None
    running: dict[str, dict] = field(default_factory=dict)  # alloc id -> its report (the fake supervisor)
    # alloc id -> (how its simulated health check goes: good | bad | crash, when it started)
    checks: dict[str, tuple[str, float]] = field(default_factory=dict)
    seq: int = 0
    worker: Worker = field(init=False)
    leading: Leading = field(init=False)
    reports: ReportSchedule = field(default_factory=lambda: ReportSchedule(full_period=10.0))
    secret_epoch: int = 0
    newest: SiteState | None = None  # the newest view readers got (meshd.io.context.NodeContext.snapshot)
    public: bytes = field(init=False)
    node_id: str = field(init=False)
    host: str = field(init=False)
    address: str = field(init=False)
    raft_address: str = field(init=False)
    shared_view: "SharedView | None" = None  # the site's one reader copy of the shared state
    stepped: tuple | None = None  # what the worker last stepped on (view, notice, caught up)
    reported: tuple | None = None  # the allocation reports as of the last report that needed nothing more
    watch: set | None = None  # its site's set of members whose flags changed (SimSite._keep_behind)
    own: set | None = None  # its site's set of members with a state of their own (not the shared one)

    def view(self) -> SiteState:
        """The state as the daemon's readers see it: never older than a view they already had."""
        if self.newest is not None and self.state.applied <= self.newest.applied:
            return self.newest  # the same entries (or fewer, while replaying): the copy already made
        self.newest = self.shared_view() if self.shared_view is not None and self.state is self.shared_view.state \
            else self.state.reader_copy()
        return self.newest

    @property
    def caught_up(self) -> bool:
        return self.replay_left == 0

    @property
    def applied(self) -> int:
        """Log entries applied to its state."""
        return self.state.applied

    def __setattr__(self, name: str, value) -> None:
        object.__setattr__(self, name, value)
        if name in _APPLY_FLAGS:
            watch = self.__dict__.get("watch")
            if watch is not None:
                watch.add(self.name)  # its site looks at whether it still applies the log
        elif name == "state":
            own = self.__dict__.get("own")
            if own is not None:
                (own.discard if value is self.shared_view.state else own.add)(self.name)

    def __post_init__(self) -> None:
        self.public = _raw(self.key)
        self.node_id = tokens.node_id_for(self.public)
        self.worker = Worker(self.node_id)
        self.host = f"198.18.{self.index // 256}.{self.index % 256}"  # 198.18.0.0/15: for benchmarks, never routed
        self.address = f"{self.host}:7700"
        self.raft_address = f"{self.host}:7701"

    @property
    def live(self) -> bool:
        return self.up and not self.paused and self.expelled is None

    def plain(self) -> dict:
        return {"node_id": self.node_id, "name": self.name, "site": self.site, "address": self.address,
                "raft_address": self.raft_address, "public_key": self.public.hex(), "arch": self.profile.arch,
                "labels": dict(self.profile.labels),
                "version": VERSION, "boot_id": self.boot_id, "tpm_ak": ""}

    @property
    def boot_id(self) -> str:
        h = hashlib.sha256(f"boot {self.name}".encode()).hexdigest()
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-8{h[17:20]}-{h[20:32]}"

    def evidence(self, nonce: bytes, digest: str = DIGEST, now: float = WALL0, forged: bool = False) -> dict:
        """Evidence answering `nonce`; `forged` signs it with a key that is not the node's."""
        return make_evidence(_key(f"forger of {self.name}") if forged else self.key, Claims(nonce=nonce.hex(), node_id=self.node_id, boot_id=self.boot_id,
                                              version=VERSION, measurements={MEASURED_PACKAGE: digest,
                                                                             MEASURED_CONFIG: CONFIG_DIGEST},
                                              issued_at=now))


class SharedView:
    """One reader copy of the site's committed state, made once per applied entry count and
    shared by every member that holds that state (in the daemon each member makes its own of
    the same state; copies of one state are equal, so sharing one changes nothing read)."""

    def __init__(self, state: SiteState) -> None:
        self.state = state
        self._copy: SiteState | None = None

    def __call__(self) -> SiteState:
        if self._copy is None or self._copy.applied != self.state.applied:
            self._copy = self.state.reader_copy()
        return self._copy


class SimSite:
    """Every member that is up, reachable and current holds the committed state: they share one
    object (`truth`), applied once per entry, instead of one copy each (a 5,000-member site
    would apply every entry 5,000 times). A member that stops applying gets its own copy
    before the next entry, and shares again once it applied everything."""

    def __init__(self, site: str = "lab", index_base: int = 0) -> None:
        self.site = site
        self.index_base = index_base  # node addresses of several sites in one mesh never collide
        self.now = 0.0  # monotonic seconds
        self.log: list[dict] = []
        self.truth = SiteState()  # the log applied in full: what every caught-up member holds
        self.truth_view = SharedView(self.truth)
        self._watch: set[str] = set()  # members whose flags changed since the last commit
        self._raft_index: dict[str, SimNode] = {}
        self._own: set[str] = set()  # members holding a state of their own
        self.nodes: dict[str, SimNode] = {}
        self.leader: str | None = None
        self.term = 0
        self.configured: set[str] = set()  # Raft configuration: voters' raft addresses
        self.root_key = _key("mesh root")
        self.out: list[str] = []
        self._ids: dict[str, int] = {}
        self._tokens: dict[str, tokens.ParsedToken] = {}
        self.attesting: dict[str, Attesting] = {}
        self._pending_changes: set = set()  # voter changes already said to wait for quorum

    # --- plumbing ------------------------------------------------------------------------

    @property
    def wall(self) -> float:
        return WALL0 + self.now

    def say(self, line: str) -> None:
        self.out.append(line)

    def next_id(self, prefix: str) -> str:
        self._ids[prefix] = self._ids.get(prefix, 0) + 1
        return f"{prefix}{self._ids[prefix]:02d}"

    def node(self, name: str) -> SimNode:
        if name not in self.nodes:
            raise ValueError(f"no node {name}")
        return self.nodes[name]

    def by_id(self, node_id: str) -> SimNode | None:
        return next((n for n in self.nodes.values() if n.node_id == node_id), None)

    def leader_node(self) -> SimNode | None:
        node = self.nodes.get(self.leader) if self.leader else None
        return node if node is not None and node.live and node.reachable else None

    def has_quorum(self) -> bool:
        if self.leader_node() is None:
            return False
        by_raft = self._by_raft()
        voters = [by_raft[a] for a in self.configured if a in by_raft]
        alive = [n for n in voters if n.live and n.reachable]
        return 2 * len(alive) > len(voters)

    def _by_raft(self) -> dict[str, SimNode]:
        if len(self._raft_index) != len(self.nodes):
            self._raft_index = {n.raft_address: n for n in self.nodes.values()}
        return self._raft_index

    @staticmethod
    def applies(node: SimNode) -> bool:
        return node.live and node.reachable and node.member and node.replay_left == 0

    def sync(self, node: SimNode) -> None:
        """The node applies the committed log up to its end, when it can. Its readers only see
        the state once every entry is applied, and applying is deterministic, so it takes the
        shared committed state: the same state its own copy would have become."""
        if node.state is not self.truth and self.applies(node):
            node.state = self.truth

    def _keep_behind(self) -> None:
        """Before the committed state moves on: members that cannot apply it keep their own
        copy (only those whose flags changed since the last look can have stopped applying)."""
        for name in self._watch:
            node = self.nodes.get(name)
            if node is not None and node.state is self.truth and not self.applies(node):
                node.state = self.truth.snapshot_copy()
        self._watch.clear()

    def commit(self, command: cmds.Command, via: SimNode | None = None) -> Result | None:
        """Commit through the leader; None when the site cannot commit (no leader, no quorum,
        or the proposer cannot reach it): the outcome is unknown, as with CommandFailed."""
        leader = self.leader_node()
        if leader is None or not self.has_quorum() or (via is not None and not (via.live and via.reachable)):
            return None
        wire = cmds.encode(command, cmds.Envelope(ts=self.wall, request_id=self.next_id("r")))
        self._keep_behind()
        self.log.append(wire)
        result = sitestate.apply(self.truth, wire)
        for node in {leader.name: leader, **({via.name: via} if via is not None else {})}.values():
            node.replay_left = 0  # its Raft answers only once it applied the entry: it replayed up to there
        for name in sorted(self._own):  # those sharing the committed state have the entry already
            self.sync(self.nodes[name])
        return result

    def execute(self, node: SimNode, effects: list[fx.Effect]) -> None:
        """Carry out effects as the daemon does (meshd.io.context.NodeContext.execute)."""
        for effect in effects:
            if isinstance(effect, fx.Commit):
                result = self.commit(effect.command, via=node)
                if result is None:
                    self.say(f"{node.name}: {describe_command(effect.command)} not committed")
                    return  # the outcome is unknown: the duty looks again later
                if effect.command.op != "heartbeat":
                    self.say(f"{node.name}: {describe_command(effect.command)} -> {describe_result(result)}")
                if effect.then is not None:
                    # the proposer's Raft answers once it applied the entry: its state has it
                    self.execute(node, list(effect.then(result, self.truth.reader_copy())))
            elif isinstance(effect, fx.Emit):
                self.say(f"{node.name}: event {effect.kind}: {effect.message}")
            elif isinstance(effect, (fx.AddVoter, fx.RemoveVoter)):
                if not self.has_quorum():  # a configuration change commits like any entry
                    if effect not in self._pending_changes:
                        self._pending_changes.add(effect)
                        self.say(f"{node.name}: voter change for {effect.name} pending (no quorum)")
                elif isinstance(effect, fx.AddVoter):
                    self.configured.add(effect.address)
                    self.say(f"{node.name}: add voter {effect.name}")
                else:
                    self.configured.discard(effect.address)
                    self.say(f"{node.name}: remove voter {effect.name} ({effect.why})")
            elif isinstance(effect, fx.TellRevoked):
                target = self.by_id(effect.node.node_id)
                reached = target is not None and target.live and target.reachable
                self.say(f"{node.name}: tell {effect.node.name} it is revoked"
                         + ("" if reached else " (not reached)"))
                if reached:
                    entry = open_revocations(effect.revocations, _raw(self.root_key)).entries[target.node_id]
                    target.revoked_notice = f"revoked by {entry.by}" + (f": {entry.reason}" if entry.reason else "")
            elif isinstance(effect, fx.DistributeSecret):
                names = [m.name for m in effect.members]
                self.say(f"{node.name}: new Raft secret epoch {effect.epoch} to {', '.join(names) or 'nobody'}")
                for member in [node, *(self.by_id(m.node_id) for m in effect.members)]:
                    if member is not None and member.live and member.reachable:
                        self.restart_raft(member, effect.epoch)
            elif isinstance(effect, fx.RenewCertificate):
                self.say(f"{node.name}: renew the certificate of {effect.node.name}")
            elif isinstance(effect, fx.SetWorkloads):
                self.set_workloads(node, effect)
            elif isinstance(effect, fx.ForgetAllocs):
                for alloc_id in effect.alloc_ids:
                    if node.running.get(alloc_id, {}).get("state") != "running":
                        node.running.pop(alloc_id, None)
                self.say(f"{node.name}: forget {' '.join(effect.alloc_ids)}")
            elif isinstance(effect, fx.Expel):
                self.say(f"{node.name}: expelled: {effect.reason}")
                for report in node.running.values():
                    report.update(state="stopped", stopped_by_meshd=True, reason="meshd is shutting down")
                node.expelled = effect.reason
            else:
                raise TypeError(f"no simulation of {effect!r}")

    def restart_raft(self, node: SimNode, epoch: int) -> None:
        """A secret switch restarts the node's Raft: it replays its journal from scratch."""
        if epoch <= node.secret_epoch:
            return
        node.secret_epoch = epoch
        self._keep_behind()
        node.state, node.replay_left = SiteState(), REPLAY_TICKS

    def set_workloads(self, node: SimNode, effect: fx.SetWorkloads) -> None:
        wanted = {w.alloc_id for w in effect.workloads}
        started, stopped = [], []
        for alloc_id, report in node.running.items():
            if alloc_id not in wanted and report["state"] == "running":
                report.update(state="stopped", pid=None, stopped_by_meshd=True,
                              reason="no longer assigned to this node")
                stopped.append(alloc_id)
        for w in effect.workloads:
            if w.alloc_id not in node.running:
                node.running[w.alloc_id] = {"alloc_id": w.alloc_id, "state": "running", "pid": 1000 + len(node.running),
                                            "restarts": 0, "exit_code": None, "reason": ""}
                if w.health.kind != "process":  # a check that cannot run here: `sim-health HOW` says how it goes
                    sim = w.health.kind == "exec" and w.health.command[:1] == ("sim-health",)
                    node.running[w.alloc_id]["health"] = "checking"
                    node.checks[w.alloc_id] = (w.health.command[1] if sim else "good", self.now)
                started.append(w.alloc_id)
        if started or stopped:
            self.say(f"{node.name}: workloads" + (f" start {' '.join(started)}" if started else "")
                     + (f" stop {' '.join(stopped)}" if stopped else ""))

    # --- one step of simulated time --------------------------------------------------------

    def tick(self, dt: float = TICK) -> None:
        self.now = round(self.now + dt, 6)
        for name in sorted(self._own):  # those sharing the committed state are current already
            node = self.nodes[name]
            if node.live and node.member and node.replay_left > 0 and node.reachable:
                node.replay_left -= 1
            self.sync(node)
        led = self.leader_node() is not None
        for node in list(self.nodes.values()):
            if not (node.up and not node.paused and node.expelled is None and node.member):  # live members
                continue
            view = node.view()
            stepped = node.stepped
            if stepped is None or stepped[0] is not view or stepped[1] != node.revoked_notice \
                    or stepped[2] != node.caught_up:
                # the worker is a function of these: on the same ones it has nothing new to do
                node.stepped = (view, node.revoked_notice, node.caught_up)
                self.execute(node, node.worker.step(view, node.revoked_notice, caught_up=node.caught_up))
                led = self.leader_node() is not None
            if node.live:
                if node.checks:
                    self.check_health(node)
                if led and node.reachable:
                    self.report(node)
                    led = self.leader_node() is not None
        leader = self.leader_node()
        if leader is not None:
            self.lead(leader)

    def check_health(self, node: SimNode) -> None:
        """Simulated health checks (an exec check `sim-health good|bad|crash`): the verdict
        comes SIM_CHECK_S after the start, as a real check's first results would."""
        for alloc_id, (how, since) in list(node.checks.items()):
            report = node.running.get(alloc_id)
            if report is None or report["state"] != "running":
                node.checks.pop(alloc_id, None)
                continue
            if self.now - since < SIM_CHECK_S:
                continue
            node.checks.pop(alloc_id)
            if how == "crash":  # its restart policy gave up on it
                report.update(state="failed", pid=None, exit_code=1, reason="exited with status 1", health="none")
            else:
                report.update(health="healthy" if how == "good" else "unhealthy")
            self.say(f"{node.name}: {alloc_id} check: {how}")

    def report(self, node: SimNode) -> None:
        if not node.reachable or self.leader_node() is None:
            return
        running = tuple((a, tuple(r.items())) for a, r in node.running.items()) if node.running else ()
        if running == node.reported and not node.reports.full_due(self.now):
            return  # nothing changed since a report that needed nothing more: none is due
        p = node.profile
        resources = {"cpu_total": p.cpu, "cpu_free": p.cpu, "mem_total_mb": p.mem_mb, "mem_free_mb": p.mem_mb,
                     "enforces": ["cpu", "memory", "pids"], "cgroup": 2, "reserved_cpu": 0.0, "reserved_mem_mb": 0,
                     "devices": dict(p.devices), "oom_kills": 0}
        own = node.view().nodes.get(node.node_id)
        report = node.reports.due(self.now, resources, [dict(r) for r in node.running.values()],
                                  reflected_in(node.view().allocs.get),
                                  lambda r: own is not None and not resources_moved(vars(own.resources), r))
        if report is None:
            node.reported = running
            return
        if not report.needed:
            node.reports.sent(self.now, report)
            node.reported = running
            return
        node.seq += 1
        command = cmds.Heartbeat(node_id=node.node_id, seq=node.seq,
                                 reports=tuple(cmds.AllocReport.from_wire(r) for r in report.allocs),
                                 resources=cmds.resources_from_wire(report.resources) if report.resources_moved
                                 else None)
        result = self.commit(command, via=node)
        if isinstance(result, Ok):
            node.reports.sent(self.now, report)
            node.reported = running

    def contacts(self) -> tuple[tuple[str, float], ...]:
        """Raft heartbeat answers: every reachable voter answers at once."""
        return tuple((n.raft_address, self.now) for n in self.nodes.values()
                     if n.raft_address in self.configured and n.live and n.reachable)

    def beats(self, leader: SimNode) -> tuple[tuple[str, float], ...]:
        """Beats on the peer port: every reachable member that does not vote beats now."""
        state = leader.view()
        return tuple((n.node_id, self.now) for n in self.nodes.values()
                     if n.live and n.reachable and n.member and n.node_id in state.nodes
                     and not state.nodes[n.node_id].voter)

    def lead(self, leader: SimNode) -> None:
        for _ in range(20):  # the runtime looks again at once after a pass that committed
            view = LeaderView(state=leader.view(), term=self.term, own_id=leader.node_id,
                              own_raft_address=leader.raft_address,
                              configured=tuple(sorted(self.configured - {leader.raft_address})),
                              contacts=self.contacts(), beats=self.beats(leader), caught_up=leader.caught_up,
                              wall=self.wall)
            effects = leader.leading.step(view, self.now)
            self.execute(leader, effects)
            if not any(isinstance(e, fx.Commit) for e in effects):
                return

    def settle(self, limit: int = 100) -> int:
        """Tick until a tick says nothing (heartbeats aside); the number of ticks."""
        for count in range(1, limit + 1):
            before = len(self.out)
            self.tick()
            behind = [n for n in self.nodes.values() if n.live and n.reachable and n.member
                      and (not n.caught_up or n.applied < len(self.log))]
            if len(self.out) == before and not behind:
                return count
        self.say(f"not settled after {limit} ticks")
        return limit

    # --- the site's life -------------------------------------------------------------------

    def add_node(self, name: str, profile: Profile = Profile()) -> SimNode:
        if name in self.nodes:
            raise ValueError(f"node {name} exists")
        node = SimNode(name=name, index=self.index_base + len(self.nodes) + 1, key=_key(name), site=self.site,
                       profile=profile, shared_view=self.truth_view, watch=self._watch, own=self._own)
        self._own.add(name)  # it starts with a state of its own (empty until it is a member)
        node.leading = Leading(lease=LEASE, new_alloc_id=lambda: self.next_id("a"))
        self.nodes[name] = node
        return node

    def kill(self, name: str) -> SimNode:
        """The daemon dies (SIGKILL); its workloads die with it (they get SIGKILL when meshd dies)."""
        node = self.node(name)
        node.up = False
        node.running.clear()
        return node

    def restart(self, name: str) -> None:
        """The daemon starts again on its data dir: a new process (fresh cores, nothing
        running), the state rebuilt from its journal (the entries it had applied)."""
        node = self.node(name)
        journal, node.up, node.state = node.applied, True, SiteState()
        for wire in self.log[:journal]:  # its own journal: no peer needed
            sitestate.apply(node.state, wire)
        node.worker, node.reports = Worker(node.node_id), ReportSchedule(full_period=10.0)
        node.stepped = node.reported = None  # a new process: its cores start from nothing
        node.leading = Leading(lease=LEASE, new_alloc_id=lambda: self.next_id("a"))
        self.say(f"{node.name} restarted")

    def found(self, name: str) -> None:
        node = self.nodes.get(name) or self.add_node(name)
        root_cert = make_root(self.root_key, MESH_ID, self.wall)
        policy = Policy(mesh_id=MESH_ID, serial=1, min_version=VERSION, allowed_digests={VERSION: frozenset({DIGEST})},
                        issued_at=self.wall)
        trust_docs = {"root": _raw(self.root_key).hex(), "root_cert": cert_to_pem(root_cert),
                      "policy": sign_policy(self.root_key, policy),
                      "revocations": sign_revocations(self.root_key, RevocationList(MESH_ID, 0))}
        node.member = True
        self.leader, self.term = name, 1
        self.configured = {node.raft_address}
        result = self.commit(cmds.Bootstrap(site=self.site, mesh_id=MESH_ID, node=cmds.node_from_wire(node.plain()),
                                            trust=trust_docs, actor=name))
        self.say(f"{name}: bootstrap -> {describe_result(result)}")

    def token(self, name: str, via: str | None = None, ttl: float = 3600.0) -> None:
        member = self.node(via) if via else self.leader_node()
        secret = hashlib.sha256(f"sim token {name}".encode()).digest()
        token_id = hashlib.sha256(f"sim token id {name}".encode()).hexdigest()[:16]
        self._tokens[name] = tokens.ParsedToken(site=self.site, token_id=token_id, secret=secret)
        result = self.commit(cmds.CreateToken(token_id=token_id, site=self.site, secret=secret.hex(),
                                              expires_at=self.wall + ttl, actor="operator"), via=member)
        self.say(f"token {name}: {describe_result(result)}")

    def join(self, name: str, token: str, candidates: list[str], give_up_after: float | None = None) -> None:
        """`name` joins with `token`, asking `candidates` (names) in the order the joiner's
        core picks; every attempt is printed."""
        joiner = self.nodes.get(name) or self.add_node(name)
        parsed = self._tokens[token]
        joining = Joining(site=self.site, started=self.now, **({"timeout": give_up_after} if give_up_after else {}))
        addresses = {self.node(c).address: self.node(c) for c in candidates}
        for _ in range(50):
            for address in joining.candidates(list(addresses), [], self.now):
                member = addresses.get(address) or next(n for n in self.nodes.values() if n.address == address)
                outcome = self.ask_to_admit(member, joiner, parsed)
                if isinstance(outcome, Ok):
                    self.say(f"{name} asks {member.name}: admitted as {'voter' if outcome['voter'] else 'non-voter'}")
                    joiner.member = True  # its state arrives with the log (next tick)
                    return
                new, give_up = joining.failed(address, outcome, self.now)
                what = outcome.code if isinstance(outcome, admitting.JoinRefusal) else "unreachable"
                if new:  # the runtime logs each distinct outcome once
                    self.say(f"{name} asks {member.name}: {what}: {outcome.reason}")
                if give_up is not None:
                    self.say(f"{name} gives up: {give_up.reason}")
                    return
            expired = joining.expired(self.now)
            if expired is not None:
                self.say(f"{name} gives up: {expired.reason}")
                return
            self.tick()
        self.say(f"{name} still joining: {joining.waiting_for()}")

    def ask_to_admit(self, member: SimNode, joiner: SimNode, token: tokens.ParsedToken
                     ) -> Ok | admitting.JoinRefusal | Unreachable:
        """The member side of one join attempt, as meshd.io.services.peers.PeerService.handle_join does it."""
        if not (member.live and member.reachable):
            return Unreachable("connection refused")
        leader = self.leader_node()
        known = member.view().nodes.get(leader.node_id) if leader is not None and leader is not member else None
        hint = known.address if known is not None else None  # as the daemon finds it: in its own state
        state = member.view()
        busy = admitting.cannot_decide(state, member.member, hint, site=token.site)
        if busy is not None:
            return busy
        nonce = hashlib.sha256(f"nonce {self.next_id('n')}".encode()).digest()
        challenge = admission.Challenge(nonce=nonce, member_eph=b"\x02" * 32, issued_at=self.wall, tpm=None)
        node = joiner.plain()
        transcript = tokens.join_transcript(nonce, b"\x01" * 32, challenge.member_eph, token.token_id, node)
        request = admission.JoinRequest(token_id=token.token_id, node=node, joiner_eph=b"\x01" * 32,
                                        proof=tokens.token_proof(token.secret, transcript),
                                        signature=tokens.sign(joiner.key, transcript),
                                        evidence=joiner.evidence(nonce, now=self.wall))
        verdict = admission.decide(state, challenge, request, now=self.wall)
        if not verdict.admit:
            return admitting.verdict_refusal(state, verdict, request.token_id)
        own = state.nodes.get(member.node_id)
        unable = admitting.cannot_issue(state.root_cert, own is not None and own.voter, hint)
        if unable is not None:  # only voters hold the mesh root key
            return unable
        command = admitting.admission_command(state, verdict, request.token_id, request.node, "", member.name)
        if isinstance(command, admitting.JoinRefusal):
            return command
        result = self.commit(command, via=member)
        if result is None:
            return admitting.not_committed("no leader", "admission")
        if isinstance(result, Refused):
            return admitting.commit_refusal(result)
        return result

    def revoke(self, target: str, by: str, reason: str = "") -> None:
        member, node = self.node(by), self.node(target)
        record = member.view().nodes[node.node_id]
        command = trust.revocation(member.view(), record, f"operator@{by}", reason, self.root_key, self.wall)
        if isinstance(command, Refused):
            self.say(f"{by}: revoke {target} refused: {command.text}")
            return
        self.commit_revocation(member, record, command)

    def commit_revocation(self, member: SimNode, record, command: cmds.RevokeNode) -> None:
        result = self.commit(command, via=member)
        if result is None:
            self.say(f"{member.name}: revoke {record.name} not committed")
            return
        self.say(f"{member.name}: {describe_command(command)} -> {describe_result(result)}")
        self.execute(member, trust.after_revocation(record, command, result, member.node_id, member.name))

    def allow(self, digest: str) -> None:
        """The operator allows a package digest (`meshctl policy allow`): the next policy."""
        leader = self.leader_node()
        assert leader is not None
        current = open_policy(leader.view().policy, _raw(self.root_key))
        allowed = {v: frozenset(d) for v, d in current.allowed_digests.items()}
        allowed[VERSION] = allowed.get(VERSION, frozenset()) | {digest}
        policy = dataclasses.replace(current, serial=current.serial + 1, allowed_digests=allowed, issued_at=self.wall)
        result = self.commit(cmds.SetPolicy(policy=sign_policy(self.root_key, policy), actor="operator"), via=leader)
        self.say(f"{leader.name}: set_policy {policy.serial} -> {describe_result(result)}")

    def reattest(self, target: str, digest: str, revoked_meanwhile: bool = False, forged: bool = False,
                 clock_skew: float = 0.0) -> None:
        """The leader challenges `target`; its evidence measures `digest`, dated by the
        member's clock (`clock_skew` seconds off the leader's). With `revoked_meanwhile` the
        member is revoked while the answer is on its way: the leader appraises it against the
        view it had when it asked."""
        leader = self.leader_node()
        assert leader is not None
        attesting = self.attesting.setdefault(leader.name, Attesting(leader_name=leader.name, own_id=leader.node_id,
                                                                     interval=600.0))
        node = self.node(target)
        nonce = hashlib.sha256(f"attest {self.next_id('n')}".encode()).digest()
        evidence = node.evidence(nonce, digest=digest, now=self.wall + clock_skew, forged=forged)
        view = leader.view()
        record = view.nodes[node.node_id]
        if revoked_meanwhile:
            self.revoke(target, by=leader.name, reason="meanwhile")
        self.execute(leader, attesting.appraise(view, record, evidence, nonce, self.wall, self.wall, self.root_key,
                                                self.now))

    def attestation_due(self) -> None:
        """Who the leader's re-attestation would challenge now, in order (none are asked)."""
        leader = self.leader_node()
        assert leader is not None
        attesting = self.attesting.setdefault(leader.name, Attesting(leader_name=leader.name, own_id=leader.node_id,
                                                                     interval=600.0))
        due = []
        view = leader.view()
        while (record := attesting.next_due(view, self.wall, self.now)) is not None and record.name not in due:
            due.append(record.name)
            attesting.unreachable(record, self.now)  # look past it, as an unanswered challenge does
        for name in due:
            attesting.retry_after.pop(view.nodes[self.node(name).node_id].node_id, None)
        self.say(f"{leader.name}: due for re-attestation: {', '.join(due) or 'none'}")

    def take_in(self, app: str, from_site: str, replicas: int, targets: tuple[str, ...], version: int,
                stopped: bool = False, spec_name: str | None = None) -> None:
        """The leader takes in an edit made in another site, as meshd.io.mesh does."""
        leader = self.leader_node()
        assert leader is not None
        spec = "" if stopped else (f'[app]\nname = "{spec_name or app}"\nreplicas = {replicas}\ncommand = ["sleep", "3600"]\n'
                                   f'sites = [{", ".join(repr(t).replace(chr(39), chr(34)) for t in targets)}]\n')
        edit = AppEdit(edit_id=f"e{version}-{from_site}", app=app, version=version, base="", site=from_site,
                       actor="operator", ts=self.wall, spec=spec, targets=targets, replicas=replicas, stopped=stopped)
        resolutions = {app: AppResolution(app=app, winner=edit, losers=())}
        edits = meshstate.edits_to_take_in(leader.view(), resolutions)
        if not edits:
            self.say(f"{leader.name}: nothing to take in")
        for wanted in edits:
            command = meshstate.take_in_command(wanted)
            if isinstance(command, str):
                self.say(f"{leader.name}: {app} v{version} from site {from_site} cannot run here: {command}")
                continue
            result = self.commit(command, via=leader)
            self.say(f"{leader.name}: take in {app} v{version} from {from_site} -> {describe_result(result)}")

    # --- views -----------------------------------------------------------------------------

    def view_state(self, via: str | None = None) -> SiteState:
        node = self.node(via) if via else (self.leader_node() or next(iter(self.nodes.values())))
        return node.view()

    def allocs(self, via: str | None = None) -> None:
        state = self.view_state(via)
        for alloc in sorted(state.allocs.values(), key=lambda a: (a.app, a.replica, a.alloc_id)):
            node = state.nodes.get(alloc.node_id)
            self.say(f"{alloc.alloc_id} {alloc.app} v{alloc.version} #{alloc.replica} on "
                     f"{node.name if node else alloc.node_id}: {alloc.desired}/{alloc.state}"
                     + (f" {alloc.health}" if alloc.health != "none" else "") + (" canary" if alloc.canary else "")
                     + (f" ({alloc.reason})" if alloc.reason else ""))

    def deployments(self, app: str, via: str | None = None) -> None:
        record = self.view_state(via).apps[app]
        for d in record.deployments:
            self.say(f"v{d.version} from v{d.from_version}: {d.state}" + (" (revert)" if d.revert else "")
                     + (f" canary={d.canary}{' promoted' if d.promoted else ''}" if d.canary else "")
                     + (f": {d.reason}" if d.reason else ""))

    def history(self, app: str, via: str | None = None) -> None:
        record = self.view_state(via).apps[app]
        self.say(f"current v{record.version}" + (f" (same spec as {record.same_spec})" if record.same_spec else ""))
        for e in record.history:
            self.say(f"v{e.version} {e.state}" + (" pinned" if e.pinned else "") + (f": {e.reason}" if e.reason else ""))

    def members(self, via: str | None = None) -> None:
        state = self.view_state(via)
        for node in sorted(state.nodes.values(), key=lambda n: n.name):
            configured = "voter" if node.raft_address in self.configured else ("non-voter" if not node.voter
                                                                                 else "voter (not configured)")
            self.say(f"{node.name}: {node.state}, {configured}")

    def apps(self, via: str | None = None) -> None:
        state = self.view_state(via)
        for name, record in sorted(state.apps.items()):
            running = sum(1 for a in state.current_allocs(name) if a.state == "running")
            self.say(f"{name} v{record.version} {record.status}: {running}/{record.spec.replicas} running")

    def processes(self) -> None:
        for node in self.nodes.values():
            running = sorted(a for a, r in node.running.items() if r["state"] == "running")
            self.say(f"{node.name}: {' '.join(running) or '-'}"
                     + ("" if node.live else " (down)" if node.expelled is None else " (expelled)"))


def describe_command(command: cmds.Command) -> str:
    if isinstance(command, cmds.ApplyPlan):
        placed = " ".join(f"#{p.replica}->{p.node_id[:6]}" for p in command.placements)
        stops = " ".join(f"{a}({why})" for a, why in command.stops)
        return f"apply_plan {command.app} v{command.version}" + (f" place {placed}" if placed else "") + \
            (f" stop {stops}" if stops else "")
    if isinstance(command, cmds.SetLiveness):
        return f"set_liveness {command.node_id[:6]} {command.liveness}"
    if isinstance(command, cmds.RevokeNode):
        return f"revoke_node {command.node_id[:6]} (list {command.number})"
    if isinstance(command, cmds.Attested):
        return f"attested {command.node_id[:6]}"
    if isinstance(command, cmds.Rollout):
        return f"rollout {command.app} v{command.version} {command.action}" + (
            f" ({command.reason})" if command.reason else "")
    if isinstance(command, cmds.Quarantine):
        return f"quarantine {command.node_id[:6]} (digest {command.software[:16]}...)"
    return command.op


def describe_result(result: Result | None) -> str:
    if result is None:
        return "not committed"
    if isinstance(result, Refused):
        return f"refused {result.code}: {result.text}"
    return "ok"


def node_names(site: SimSite, text: str) -> str:
    """Replace node id prefixes with names, so transcripts read by name."""
    for node in site.nodes.values():
        text = text.replace(node.node_id[:6], node.name).replace(node.address, node.name)
    return text

