"""`meshd sim`: a scenario run by the real cores on a simulated clock and network.

Each site of the scenario is a meshd.twin.site.SimSite: its nodes run the real node core
(worker, leader duties, liveness, placement, reconcile, deployments) on the real state
machine. Between sites, each site's replica of the mesh document syncs over simulated links
by the real sync sessions (meshd.twin.links), and each site's leader takes in and publishes
through the real mesh duty (meshd.node.meshing). What the twin adds is only what the daemon
leaves to the world: time, failures, elections, the network, operators.

Time moves in steps of the scenario's tick (0.1 s, the daemon's own pace) while anything
happens, and in longer strides over quiet stretches: no stride passes the next event, the
next arrival on a link, an election, a running health check, or the next look a site's
leader asked for (meshd.node.leading.Leading.next_look: lease ends, deployment deadlines;
never more than its safety period, 5 s). A week-long cut is then thousands of strides, not
millions of ticks.

Elections: a site whose leader is gone (down, paused, cut off, expelled) elects one of its
reachable configured voters when a majority of them is reachable, an election timeout after
it noticed (drawn from the daemon's defaults, 0.7-1.2 s, by the seeded generator), as
pysyncobj does; the old leader's duties step down.

Invariants:
- Deterministic: the only randomness is the run's generator (seeded by --seed or the
  scenario's seed), drawn in a fixed order; keys and ids derive from names and counters; the
  timeline and summary of two runs of one scenario and seed are the same byte for byte.
- Nothing here decides what the site does: every placement, liveness verdict, deployment
  step and take-in is the cores' answer; the twin only carries out their effects.
- The run stops at the scenario's duration; events after it were refused by the scenario.
"""

from __future__ import annotations

import dataclasses
import heapq
import random
from dataclasses import dataclass, field

from crdt.document import MeshDocument
from meshd import commands as cmds, meshstate
from meshd import spec as specmod
from meshd.config import DEFAULT_RAFT_MAX_TIMEOUT, DEFAULT_RAFT_MIN_TIMEOUT, DEFAULT_SYNC_INTERVAL
from meshd.node.leading import LEASE_EPSILON, RECONCILE_SAFETY_PERIOD
from meshd.node.meshing import Meshing, readers
from meshd.state import ADMIN_DRAINING, APP_RUNNING, LIVENESS_DOWN, AppSpec
from meshd.twin.links import Network
from meshd.twin.scenario import Event, Scenario
from meshd.twin.site import SimNode, SimSite, describe_command, describe_result, node_names
from meshd.whatif import moves as placement_moves

# Anything said keeps the clock at the tick for this long after: longer than a lease (1 s),
# an election (1.2 s) and a simulated health check's verdict (1 s), so what follows a change
# is seen at the daemon's own pace before the twin strides again.
QUIET_AFTER = 3.0
# The leader's pass over the document happens on every change and this often anyway (as
# meshd.io.mesh.PUBLISH_SAFETY_PERIOD).
MESH_PASS_PERIOD = 5.0


@dataclass
class Failure:
    at: float
    kind: str
    target: str
    site: str
    replicas_lost: int
    leader_lost: bool
    before: dict[str, int] = field(default_factory=dict)  # app -> replicas running just before
    recovered_at: float | None = None
    short: bool = False  # the site ran fewer replicas than before since the failure

    def plain(self) -> dict:
        return {"at": _r(self.at), "kind": self.kind, "target": self.target, "site": self.site,
                "replicas_lost": self.replicas_lost, "leader_lost": self.leader_lost,
                "recovered_after_s": None if self.recovered_at is None else _r(self.recovered_at - self.at)}


@dataclass
class Cut:
    between: tuple[str, str]
    at: float
    healed_at: float | None = None
    converged_at: float | None = None
    bytes_at_heal: int = 0
    bytes_to_converge: int | None = None

    def plain(self) -> dict:
        return {"between": list(self.between), "at": _r(self.at),
                "healed_at": None if self.healed_at is None else _r(self.healed_at),
                "converged_after_s": None if self.converged_at is None or self.healed_at is None
                else _r(self.converged_at - self.healed_at),
                "bytes_to_converge": self.bytes_to_converge}


def _r(value: float) -> float:
    return round(value, 3)


@dataclass
class Series:
    """Step functions, recorded on change: (time, value)."""
    points: dict[str, list[tuple[float, object]]] = field(default_factory=dict)

    def record(self, key: str, t: float, value: object) -> None:
        points = self.points.setdefault(key, [])
        if points and points[-1][1] == value:
            return
        if points and points[-1][0] == t:
            points[-1] = (t, value)
            if len(points) > 1 and points[-2][1] == value:
                points.pop()
            return
        points.append((t, value))


class Twin:
    def __init__(self, scenario: Scenario, seed: int | None = None) -> None:
        self.scenario = scenario
        self.seed = scenario.seed if seed is None else seed
        self.rng = random.Random(self.seed)
        self.now = 0.0
        self.timeline: list[dict] = []
        self.sites: dict[str, SimSite] = {}
        self.documents: dict[str, MeshDocument] = {}
        self.meshing: dict[str, Meshing] = {}
        base = 0
        for index, spec in enumerate(scenario.sites):
            self.sites[spec.name] = SimSite(spec.name, index_base=base)
            base += len(spec.nodes)
            self.documents[spec.name] = MeshDocument(client_id=1000 + index)
            self.meshing[spec.name] = Meshing()
        self.network = Network(scenario.links, self.documents, self.rng)
        self.queue: list[tuple[float, int, object]] = []
        self._serial = 0
        self.elections: dict[str, float] = {}  # site -> when its election ends
        self.busy_until = 0.0
        self.failures: list[Failure] = []
        self.cuts: list[Cut] = []
        self.series = Series()
        self.deficit_seconds = 0.0
        self.max_deficit = 0
        self._last_deficit = 0
        self._last_t = 0.0
        self._mesh_seen: dict[str, tuple[int, float]] = {}  # site -> (log length, time) at its last pass
        self._edit_serial = 0
        self._sampled: dict[str, tuple[tuple, int]] = {}  # site -> (what its last sample saw, its deficit)
        self.steps = 0

    # --- the timeline ----------------------------------------------------------------------

    def say(self, site: str, text: str) -> None:
        self.timeline.append({"t": _r(self.now), "site": site, "text": text})
        self.busy_until = self.now + QUIET_AFTER

    def _collect(self) -> None:
        for name, site in self.sites.items():
            if site.out:
                for line in node_names(site, "\n".join(site.out)).split("\n"):
                    self.say(name, line)
                site.out = []

    # --- building the fleet ----------------------------------------------------------------

    def form(self) -> None:
        """Every site founded by its first node, the others joined by token: the fleet as it
        stands at time 0 (the formation's own steps are in the timeline)."""
        for spec in self.scenario.sites:
            site = self.sites[spec.name]
            first, *rest = spec.nodes
            site.add_node(first.name, first.profile)
            site.found(first.name)
            for node in rest:
                site.add_node(node.name, node.profile)
                site.token(f"t-{node.name}")
                site.join(node.name, f"t-{node.name}", [first.name])
        start = max(site.now for site in self.sites.values())
        for site in self.sites.values():
            site.now = start
        self.now = start
        self._collect()
        self.network.open(self.now)
        for event in self.scenario.events:
            self.schedule(event.at, event)

    def schedule(self, at: float, what: object) -> None:
        self._serial += 1
        heapq.heappush(self.queue, (at, self._serial, what))

    # --- the run ---------------------------------------------------------------------------

    def run(self, progress=None) -> None:
        """The whole run; `progress(now)` is called after every step (for the CLI's progress)."""
        self.form()
        end = self.scenario.duration
        tick = self.scenario.tick
        self._sample()
        while self.now < end - 1e-9:
            dt = tick if self.now < self.busy_until or self._busy() else self._stride(end)
            if self.queue and self.queue[0][0] > self.now:  # land on the next event, not past it
                dt = min(dt, self.queue[0][0] - self.now)
            dt = min(dt, end - self.now)
            self.now = round(self.now + dt, 6)
            self.steps += 1
            for site in self.sites.values():
                site.tick(round(self.now - site.now, 6) or tick)
            self._collect()
            self.network.deliver(self.now)
            while self.queue and self.queue[0][0] <= self.now + 1e-9:
                _, _, what = heapq.heappop(self.queue)
                self._happen(what)
                self._collect()
            self._elect()
            self._mesh()
            self._collect()
            self._sample()
            if progress is not None:
                progress(self.now)
        self._finish()

    def _busy(self) -> bool:
        for site in self.sites.values():
            if site.leader_node() is None:
                return True
            for node in site.nodes.values():
                if node.checks or node.replay_left:
                    return True
        return False

    def _stride(self, end: float) -> float:
        """The longest step over a quiet stretch (see the module's header)."""
        limit = min(end, self.now + RECONCILE_SAFETY_PERIOD)
        if self.queue:
            limit = min(limit, self.queue[0][0])
        arrival = self.network.next_arrival()
        if arrival is not None:
            limit = min(limit, arrival)
        for name, site in self.sites.items():
            leader = site.leader_node()
            if leader is not None:
                view = leader.view()
                # Every member that answers does so at every step here, so leases matter only
                # while one that stopped answering is not marked down yet.
                if any(not (n.live and n.reachable) and n.node_id in view.nodes
                       and view.nodes[n.node_id].liveness != LIVENESS_DOWN for n in site.nodes.values()):
                    limit = min(limit, self.now + leader.leading.next_look(view, site.now))
                wake = leader.leading.deployment_wake()
                if wake is not None:
                    limit = min(limit, self.now + max(0.0, wake - site.wall) + LEASE_EPSILON)
            wake = self.meshing[name].rollout_wake
            if wake is not None:
                limit = min(limit, max(self.now, wake - site.wall + self.now))
        return max(round(limit - self.now, 6), 1e-3)

    # --- elections -------------------------------------------------------------------------

    def _elect(self) -> None:
        for name, site in self.sites.items():
            if site.leader_node() is not None:
                self.elections.pop(name, None)
                continue
            if name not in self.elections:
                self.elections[name] = self.now + self.rng.uniform(DEFAULT_RAFT_MIN_TIMEOUT, DEFAULT_RAFT_MAX_TIMEOUT)
                continue
            if self.now < self.elections[name]:
                continue
            voters = [n for n in site.nodes.values() if n.raft_address in site.configured]
            able = sorted((n for n in voters if n.live and n.reachable and n.member and n.caught_up),
                          key=lambda n: n.name)
            if 2 * len(able) <= len(voters):
                self.elections[name] = self.now + self.rng.uniform(DEFAULT_RAFT_MIN_TIMEOUT, DEFAULT_RAFT_MAX_TIMEOUT)
                continue
            chosen = self.rng.choice(able)
            if site.leader and site.leader in site.nodes:
                site.nodes[site.leader].leading.stepped_down()
            site.leader, site.term = chosen.name, site.term + 1
            self.elections.pop(name, None)
            self.say(name, f"{chosen.name} elected leader (term {site.term})")

    # --- the mesh between sites ------------------------------------------------------------

    def _mesh(self) -> None:
        changed = self.network.changed
        self.network.changed = set()
        for name, site in self.sites.items():
            leader = site.leader_node()
            if leader is None:
                continue
            core = self.meshing[name]
            seen = self._mesh_seen.get(name)
            due = (seen is None or seen[0] != len(site.log) or name in changed
                   or self.now - seen[1] >= MESH_PASS_PERIOD
                   or (core.rollout_wake is not None and core.rollout_wake <= site.wall))
            if not due:
                continue
            document = self.documents[name]
            items, told = core.take_in(leader.view(), document, site.wall)
            for emit in told:
                self.say(name, f"{leader.name}: event {emit.kind}: {emit.message}")
            for item in items:
                result = site.commit(item.command, via=leader)
                if result is None:
                    break
                what = (f"take in {item.edit.app} v{item.edit.version} from {item.edit.site}" if item.edit is not None
                        else describe_command(item.command))
                self.say(name, f"{leader.name}: {what} -> {describe_result(result)}")
                for emit in core.taken(item, result):
                    self.say(name, f"{leader.name}: event {emit.kind}: {emit.message}")
            self._collect()
            facts = meshstate.SiteFacts(leader.name, (leader.address,))
            records = core.publish(leader.view(), document, facts, site.term, site.wall, self.now,
                                   DEFAULT_SYNC_INTERVAL)
            if records:
                update = document.put_many(records)
                self.network.push(name, update, self.now)
            self._mesh_seen[name] = (len(site.log), self.now)

    # --- events ----------------------------------------------------------------------------

    def _happen(self, what: object) -> None:
        if callable(what):
            what()
            return
        assert isinstance(what, Event)
        getattr(self, "_do_" + what.kind)(what)

    def _node(self, name: str) -> tuple[SimSite, SimNode]:
        site = self.sites[self.scenario.site_of(name)]
        return site, site.nodes[name]

    def _failure(self, kind: str, target: str, site: SimSite, nodes: list[SimNode]) -> None:
        lost = sum(1 for n in nodes for r in n.running.values() if r["state"] == "running")
        leader_lost = site.leader in {n.name for n in nodes}
        before = {app: counts[1] for app, counts in self._counts(site)[2].items()}
        self.failures.append(Failure(self.now, kind, target, site.site, lost, leader_lost, before))

    def _later(self, event: Event, action) -> None:
        if event.duration is not None:
            self.schedule(self.now + event.duration, action)

    def _do_kill(self, event: Event) -> None:
        site, node = self._node(event.node)
        self._failure("kill", node.name, site, [node])
        site.kill(node.name)
        self.say(site.site, f"{node.name} killed")

    def _do_restart(self, event: Event) -> None:
        site, node = self._node(event.node)
        if node.up:
            self.say(site.site, f"{node.name} is running: not restarted")
            return
        site.restart(node.name)

    def _do_pause(self, event: Event) -> None:
        site, node = self._node(event.node)
        self._failure("pause", node.name, site, [node])
        node.paused = True
        self.say(site.site, f"{node.name} paused (its workloads keep running)")
        self._later(event, lambda: self._resume(site, node))

    def _resume(self, site: SimSite, node: SimNode) -> None:
        node.paused = False
        self.say(site.site, f"{node.name} resumed")

    def _do_resume(self, event: Event) -> None:
        self._resume(*self._node(event.node))

    def _do_reboot(self, event: Event) -> None:
        site, node = self._node(event.node)
        self._failure("reboot", node.name, site, [node])
        site.kill(node.name)
        if event.offline:
            node.reachable = False
        self.say(site.site, f"{node.name} rebooting" + (" with its network down" if event.offline else ""))

        def back() -> None:
            site.restart(node.name)
        self._later(event, back)

    def _do_partition(self, event: Event) -> None:
        site = self.sites[self.scenario.site_of(event.nodes[0])]
        nodes = [site.nodes[n] for n in event.nodes]
        self._failure("partition", ",".join(event.nodes), site, nodes)
        for node in nodes:
            node.reachable = False
        self.say(site.site, f"{' '.join(event.nodes)} cut off from the rest of the site")

        self._later(event, lambda: self._reconnect(site, event.nodes))

    def _reconnect(self, site: SimSite, names: tuple[str, ...]) -> None:
        for name in names:
            site.nodes[name].reachable = True
        self.say(site.site, f"{' '.join(names)} reachable again")

    def _do_heal(self, event: Event) -> None:
        if event.nodes:
            self._reconnect(self.sites[self.scenario.site_of(event.nodes[0])], event.nodes)
        if event.between is not None:
            self._heal_link(event.between)
        if not event.nodes and event.between is None:  # everything
            for name, site in self.sites.items():
                for node in site.nodes.values():
                    if not node.reachable and node.up:
                        node.reachable = True
                        self.say(name, f"{node.name} reachable again")
            for key, link in self.network.links.items():
                if link.cut:
                    self._heal_link(key)

    def _do_cut(self, event: Event) -> None:
        assert event.between is not None
        a, b = event.between
        if self.network.links[event.between].cut:
            return
        self.network.cut(event.between)
        self.cuts.append(Cut(event.between, self.now))
        self.say(a, f"link {a}-{b} cut")
        self._later(event, lambda: self._heal_link(event.between))

    def _heal_link(self, key: tuple[str, str]) -> None:
        if not self.network.links[key].cut:
            return
        self.network.heal(key, self.now)
        for cut in self.cuts:
            if cut.between == key and cut.healed_at is None:
                cut.healed_at = self.now
                cut.bytes_at_heal = self._bytes_total()
        self.say(key[0], f"link {key[0]}-{key[1]} back")

    def _via(self, event: Event, spec: AppSpec) -> str:
        return event.via or (spec.sites[0] if spec.sites else self.scenario.sites[0].name)

    def _deploy_spec(self, event: Event, spec: AppSpec, stopped: bool = False) -> None:
        """A deploy (or stop) made on a member of the `via` site, as meshctl does it: the edit
        committed through that site's Raft, then written to its replica of the document."""
        name = self._via(event, spec)
        site = self.sites[name]
        leader = site.leader_node()
        if leader is None:
            self.say(name, f"operator: {event.kind} {spec.name} refused: site {name} has no leader")
            return
        document = self.documents[name]
        self._edit_serial += 1
        edit = document.new_app_edit(edit_id=f"edit-{self._edit_serial:04d}", app=spec.name, site=name,
                                     actor="operator", ts=site.wall, spec=specmod.spec_to_toml(spec),
                                     targets=tuple(spec.sites) or (name,), replicas=spec.replicas, stopped=stopped)
        if stopped:
            command: cmds.Command = cmds.StopApp(app=spec.name, edit=edit, actor="operator")
        else:
            status_of, controls_of = readers(document)
            command = meshstate.hold_for_wave(leader.view(), cmds.SubmitApp(spec=spec, edit=edit, actor="operator"),
                                              status_of, controls_of, site.wall)
        result = site.commit(command, via=leader)
        self.say(name, f"operator: {event.kind} {spec.name} v{edit.version}"
                       + ("" if stopped else f" ({spec.replicas} replica{'s' if spec.replicas != 1 else ''})") + f" -> {describe_result(result)}")
        if result is not None and not isinstance(result, cmds.Refused):
            self.network.push(name, document.put_many([edit]), self.now)

    def _do_deploy(self, event: Event) -> None:
        self._deploy_spec(event, self.scenario.apps[event.app])

    def _do_scale(self, event: Event) -> None:
        spec = self.scenario.apps[event.app]
        current = self._current_spec(self._via(event, spec), spec.name) or spec
        self._deploy_spec(event, dataclasses.replace(current, replicas=event.replicas))

    def _do_stop(self, event: Event) -> None:
        self._deploy_spec(event, self.scenario.apps[event.app], stopped=True)

    def _current_spec(self, site: str, app: str) -> AppSpec | None:
        record = self.sites[site].truth.apps.get(app)
        return record.spec if record is not None else None

    def _operator(self, site: SimSite, command: cmds.Command, what: str) -> None:
        leader = site.leader_node()
        result = site.commit(command, via=leader) if leader is not None else None
        self.say(site.site, f"operator: {what} -> {describe_result(result)}")

    def _do_drain(self, event: Event) -> None:
        site, node = self._node(event.node)
        self._failure("drain", node.name, site, [node])
        self._operator(site, cmds.Drain(node=node.node_id, actor="operator"), f"drain {node.name}")

    def _do_undrain(self, event: Event) -> None:
        site, node = self._node(event.node)
        self._operator(site, cmds.Undrain(node=node.node_id, actor="operator"), f"undrain {node.name}")

    def _do_revoke(self, event: Event) -> None:
        site, node = self._node(event.node)
        leader = site.leader_node()
        if leader is None:
            self.say(site.site, f"operator: revoke {node.name} refused: site {site.site} has no leader")
            return
        self._failure("revoke", node.name, site, [node])
        site.revoke(node.name, by=leader.name, reason=event.reason)

    def _do_rollout(self, event: Event) -> None:
        spec = self.scenario.apps[event.app]
        site = self.sites[event.site or self._via(event, spec)]
        record = site.truth.apps.get(spec.name)
        if record is None:
            self.say(site.site, f"operator: rollout {spec.name} {event.action} refused: not deployed here")
            return
        self._operator(site, cmds.Rollout(app=spec.name, version=record.version, action=event.action,
                                          actor="operator"), f"rollout {spec.name} {event.action}")

    # --- measurements ----------------------------------------------------------------------

    def _counts(self, site: SimSite) -> tuple[int, int, dict[str, tuple[int, int, int]]]:
        """(replicas wanted, replicas running, by app (wanted, running, on the newest edit)):
        running as processes on the members the site reaches (those it can count on; a
        cut-off member's go on, as duplicates once replaced). On the newest edit: of the
        current version of the edit the site took in last (none while that edit is held for
        its rollout wave): how far a rollout has come here."""
        truth = site.truth
        by_app: dict[str, list[int]] = {}
        current: dict[str, int] = {}
        for name, record in truth.apps.items():
            if record.status == APP_RUNNING:
                by_app[name] = [record.spec.replicas, 0, 0]
                taken = truth.mesh_edits.get(name, {}).get("edit_id", record.edit_id)
                current[name] = record.version if taken == record.edit_id else -1
        for node in site.nodes.values():
            if not (node.live and node.reachable):
                continue  # a paused or cut-off member's workloads run, but its site cannot count on them
            for alloc_id, report in node.running.items():
                alloc = truth.allocs.get(alloc_id)
                if report["state"] == "running" and alloc is not None and alloc.app in by_app:
                    by_app[alloc.app][1] += 1
                    by_app[alloc.app][2] += alloc.version == current[alloc.app]
        counts = {app: (w, min(r, w), min(n, w)) for app, (w, r, n) in by_app.items()}
        return sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values()), counts

    def _node_state(self, site: SimSite, node: SimNode) -> str:
        if node.expelled is not None:
            return "revoked"
        if not node.up:
            return "down"
        if node.paused:
            return "paused"
        if not node.reachable:
            return "cut off"
        record = site.truth.nodes.get(node.node_id)
        if record is not None and record.admin == ADMIN_DRAINING:
            return "draining"
        return "leader" if site.leader == node.name else "up"

    def _sample(self) -> None:
        t = self.now
        deficit = 0
        for name, site in self.sites.items():
            # What is sampled changes only with the log, the leader, or something said (every
            # start, stop, check, failure and heal is): otherwise the last sample stands.
            key = (len(site.log), site.leader, len(self.timeline))
            if self._sampled.get(name, (None,))[0] == key and not any(
                    f.site == name and f.recovered_at is None for f in self.failures):
                deficit += self._sampled[name][1]
                continue
            wanted, running, by_app = self._counts(site)
            self._sampled[name] = (key, wanted - running)
            deficit += wanted - running
            self.series.record(f"site/{name}/wanted", t, wanted)
            self.series.record(f"site/{name}/running", t, running)
            self.series.record(f"site/{name}/newest", t, sum(c[2] for c in by_app.values()))
            for node in site.nodes.values():
                self.series.record(f"node/{name}/{node.name}", t, self._node_state(site, node))
            led = site.leader_node() is not None
            for failure in self.failures:
                if failure.site != name or failure.recovered_at is not None:
                    continue
                # Back once a leader leads and every app runs as many replicas as before (or as
                # it wants now, if that is fewer): what the failure took is replaced. A failure
                # that took nothing within QUIET_AFTER (a revoked node leaves a tick later) took
                # nothing at all.
                whole = led and all(by_app.get(app, (0, 0))[1] >= min(count, by_app.get(app, (0, 0))[0])
                                    for app, count in failure.before.items())
                failure.short = failure.short or not whole
                if whole and (failure.short or t >= failure.at + QUIET_AFTER):
                    failure.recovered_at = t if failure.short else failure.at
        self.deficit_seconds += self._last_deficit * (t - self._last_t)
        self.max_deficit = max(self.max_deficit, deficit)
        self._last_deficit, self._last_t = deficit, t
        self.series.record("deficit", t, deficit)
        for cut in self.cuts:
            if cut.healed_at is not None and cut.converged_at is None and self._converged(cut.between):
                cut.converged_at = t
                cut.bytes_to_converge = self._bytes_total() - cut.bytes_at_heal

    def _converged(self, key: tuple[str, str]) -> bool:
        a, b = key
        return (not self.network.in_flight_between(key)
                and self.documents[a].state_vector() == self.documents[b].state_vector())

    def _bytes_total(self) -> int:
        return sum(self.network.bytes_between().values())

    def _finish(self) -> None:
        self.say("-", f"end of the run at {_r(self.now)} s")

    # --- the summary -----------------------------------------------------------------------

    def summary(self) -> dict:
        sites = {}
        unplaced = []
        placed = 0
        for name, site in self.sites.items():
            _, _, by_app = self._counts(site)
            truth = site.truth
            reasons: dict[str, list[str]] = {}
            serial = iter(range(1, 10**9))
            for move in placement_moves(truth.snapshot_copy(), lambda: f"twin-{next(serial)}"):
                if move["to"] is None:
                    reasons.setdefault(move["app"], []).append(f"replica {move['replica']}: {move['reason']}")
            apps = {}
            for app, (wanted, running, _) in sorted(by_app.items()):
                placed += running
                where = sorted({n.name for n in site.nodes.values() if n.up for a, r in n.running.items()
                                if r["state"] == "running" and (alloc := truth.allocs.get(a)) is not None
                                and alloc.app == app})
                apps[app] = {"wanted": wanted, "running": running, "nodes": where}
                if running < wanted:
                    why = reasons.get(app) or ["replacements not running yet"]
                    apps[app]["unplaced_reasons"] = why
                    unplaced.append({"site": name, "app": app, "missing": wanted - running, "reasons": why})
            sites[name] = {"nodes": len(site.nodes), "leader": site.leader if site.leader_node() else None,
                           "term": site.term, "apps": apps}
        found: dict[tuple[str, str], dict] = {}  # (app, winning edit) -> the conflict, with where it is seen
        for name, document in self.documents.items():
            for app, resolution in document.apps().items():
                if resolution.losers:
                    conflict = found.setdefault((app, resolution.winner.edit_id), {
                        "app": app, "winner": resolution.winner.edit_id, "winner_site": resolution.winner.site,
                        "losers": sorted(e.site for e in resolution.losers), "seen_in": []})
                    conflict["seen_in"].append(name)
        conflicts = [found[key] for key in sorted(found)]
        return {
            "scenario": self.scenario.name, "seed": self.seed, "duration_s": _r(self.scenario.duration),
            "steps": self.steps, "placed": placed, "unplaced": unplaced, "sites": sites,
            "failures": [f.plain() for f in self.failures],
            "cuts": [c.plain() for c in self.cuts],
            "below_wanted": {"replica_seconds": _r(self.deficit_seconds), "max": self.max_deficit,
                             "series": [[_r(t), v] for t, v in self.series.points.get("deficit", [])]},
            "bytes_between_sites": self.network.bytes_between(),
            "conflicts": conflicts,
        }
