"""Nemesis runs: a seeded random schedule of faults against a lab site while a client keeps
deploying, scaling and stopping apps; then heal, a quiet period, and a checker.

    python3 -m tests.lab.nemesis [--duration 600] [--seed N] [--hosts 5]

The checker's invariants (after heal and quiet):
1. every daemon is alive, one leader, every member ready;
2. every acknowledged operation holds: an app's final state is the one its last
   acknowledged operation set, or one set by an operation after it whose outcome the client
   could not know (timed out, connection lost); a refused operation ("nothing was changed")
   must not show;
3. every app runs exactly its replica count, in the state and in real processes, no more;
4. no live allocation sits on a down, drained, left or revoked node.

Invariants of this module: `make_schedule` is pure (seed -> faults); `expected_states` is
pure (history -> allowed final states); a failure message always carries the seed.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from meshd.io.admin import AdminError
from meshd.io.localsite import sleeper_app

STOPPED = -1  # an app's final state after `stop`
MAX_FAULTY = 2  # hosts killed or paused at once: a five-host site keeps a quorum
QUIET_TIMEOUT = 120.0  # after heal: time for the site to converge before the checker judges
CALL_TIMEOUT = 10.0  # a client call that takes longer has an unknown outcome


@dataclass(frozen=True)
class Fault:
    at: float  # seconds from the start
    action: str  # kill, restart, pause, resume, partition, heal, netem, clear
    host: str = ""
    groups: tuple[tuple[str, ...], ...] = ()
    delay: float = 0.0
    loss: float = 0.0


def make_schedule(seed: int, duration: float, hosts: list[str]) -> list[Fault]:
    """Faults every 2-6 s, each undone 2-12 s later; never more than MAX_FAULTY hosts down."""
    rng = random.Random(seed)
    faults: list[Fault] = []
    down_until: dict[str, float] = {}
    cut_until = 0.0
    t = rng.uniform(1, 3)
    while t < duration:
        kind = rng.choice(["kill", "pause", "partition", "netem"])
        end = min(t + rng.uniform(2, 12), duration)
        busy = {h for h, until in down_until.items() if until > t}
        if kind in ("kill", "pause") and len(busy) < MAX_FAULTY:
            host = rng.choice([h for h in hosts if h not in busy])
            faults += [Fault(t, kind, host), Fault(end, "restart" if kind == "kill" else "resume", host)]
            down_until[host] = end
        elif kind == "partition" and t >= cut_until:
            shuffled = rng.sample(hosts, len(hosts))
            cut = rng.randint(1, (len(hosts) - 1) // 2)
            groups = (tuple(shuffled[cut:]), tuple(shuffled[:cut]))
            faults += [Fault(t, "partition", groups=groups), Fault(end, "heal")]
            cut_until = end
        elif kind == "netem":
            host = rng.choice(hosts)
            faults += [Fault(t, "netem", host, delay=rng.uniform(0, 0.1), loss=rng.uniform(0, 0.2)),
                       Fault(end, "clear", host)]
        t += rng.uniform(2, 6)
    return sorted(faults, key=lambda f: f.at)


@dataclass
class Operation:
    app: str
    replicas: int  # STOPPED for a stop
    outcome: str  # "acked", "refused", "unknown"


def expected_states(history: list[Operation]) -> set[int]:
    """The final states an app may be in: the last acknowledged one, or any whose outcome was
    unknown after it (absent app before any ack: -2)."""
    allowed = {-2}
    for op in history:
        if op.outcome == "acked":
            allowed = {op.replicas}
        elif op.outcome == "unknown":
            allowed = allowed | {op.replicas}
    return allowed


@dataclass
class Client:
    lab: object
    hosts: list[str]
    seed: int
    history: dict[str, list[Operation]] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    counts: dict[str, int] = field(default_factory=lambda: {"acked": 0, "refused": 0, "unknown": 0})

    def run(self) -> None:
        rng = random.Random(self.seed + 1)
        made = 0
        while not self.stop.is_set():
            live = [h for h in self.hosts if self.lab.node(h).alive]
            if not live:
                time.sleep(0.2)
                continue
            host = rng.choice(live)
            apps = list(self.history)
            kind = rng.choice(["deploy", "scale", "stop"]) if apps else "deploy"
            if kind == "deploy" and made < 12:
                made += 1
                name, replicas = f"app{made}", rng.randint(1, 4)
            elif kind in ("scale", "deploy") and apps:
                name, replicas = rng.choice(apps), rng.randint(1, 4)
            else:
                name, replicas = rng.choice(apps), STOPPED
            self._do(host, name, replicas)
            time.sleep(rng.uniform(0.2, 1.0))

    def _do(self, host: str, name: str, replicas: int) -> None:
        try:
            if replicas == STOPPED:
                self.lab.call(host, "stop", timeout=CALL_TIMEOUT, app=name)
            else:
                self.lab.call(host, "deploy", timeout=CALL_TIMEOUT, spec_toml=sleeper_app(name, replicas))
            outcome = "acked"
        except AdminError as e:  # the daemon answered: a refusal changed nothing, unless it could not tell
            outcome = "refused" if "nothing was changed" in str(e) or "no app" in str(e) else "unknown"
        except Exception:  # no answer (paused, killed, timed out): the command may or may not commit
            outcome = "unknown"
        self.counts[outcome] += 1
        self.history.setdefault(name, []).append(Operation(name, replicas, outcome))


class NemesisFailure(AssertionError):
    pass


def apply(lab, fault: Fault) -> None:
    if fault.action == "kill":
        lab.kill(fault.host)
    elif fault.action == "restart":
        lab.restart(fault.host)
    elif fault.action == "pause":
        lab.pause(fault.host)
    elif fault.action == "resume":
        lab.resume(fault.host)
    elif fault.action == "partition":
        lab.partition([list(g) for g in fault.groups])
    elif fault.action == "heal":
        lab.heal()
    elif fault.action == "netem":
        lab.netem(fault.host, fault.delay, fault.loss)
    elif fault.action == "clear":
        lab.netem(fault.host, 0.0, 0.0)


def problems(lab, hosts: list[str], client: Client) -> list[str]:
    """Every broken invariant, as text; empty when the site is as it must be."""
    found: list[str] = []
    dead = [h for h in hosts if not lab.node(h).alive]
    if dead:
        return [f"daemons not alive: {dead}"]
    statuses = {h: lab.node(h).try_call("status") for h in hosts}
    leaders = [h for h, s in statuses.items() if s and s.get("role") == "leader"]
    if len(leaders) != 1:
        return [f"{len(leaders)} leaders: {leaders}"]
    leader = leaders[0]
    nodes = {r["name"]: r for r in lab.call(leader, "nodes", site=None)}
    not_ready = {n: r["state"] for n, r in nodes.items() if r["state"] != "ready"}
    if not_ready:
        found.append(f"members not ready: {not_ready}")
    apps = {r["app"]: r for r in lab.call(leader, "apps", all=True)}
    allocs = lab.call(leader, "allocs", app=None, node=None)
    total = 0
    for name, history in client.history.items():
        allowed = expected_states(history)
        row = apps.get(name)
        state = -2 if row is None else (STOPPED if row["status"] == "stopped" else row["replicas"])
        if state not in allowed:
            found.append(f"{name}: final state {state} not allowed by its history {allowed} "
                         f"({[(o.replicas, o.outcome) for o in history]})")
        running = sum(1 for a in allocs if a["app"] == name and a["state"] == "running" and a["desired"] == "run")
        want = max(state, 0)
        total += want
        if running != want:
            found.append(f"{name}: {running} allocations running, want {want}")
    for a in allocs:
        node = nodes.get(a["node"])
        if a["desired"] == "run" and a["state"] in ("running", "starting", "pending") and (
                node is None or node["state"] != "ready"):
            found.append(f"allocation {a['alloc_id'][:8]} of {a['app']} on {a['node']} "
                         f"({node['state'] if node else 'unknown node'})")
    real = sum(lab.workload_processes(h) for h in hosts)
    if real != total:
        found.append(f"{real} workload processes really run, want {total}")
    found.extend(critical_problems([lab.node(h).log_text() for h in hosts]))
    return found


def critical_problems(logs: list[str]) -> list[str]:
    """A critical line in any host's log is a broken invariant even when the state looks
    right: pysyncobj's "truncating already-applied log entries ... state machine may have
    diverged", a watchdog exit, a Raft thread wedged. `logs`: each host's log text."""
    critical = [line for text in logs for line in text.splitlines() if '"level": "critical"' in line]
    return [f"{len(critical)} critical log lines, the first: {critical[0][:400]}"] if critical else []


def run(lab, seed: int, duration: float, hosts: list[str], log=print) -> dict:
    """One nemesis run on a started site; raises NemesisFailure (with the seed) when an
    invariant is broken after the quiet period."""
    schedule = make_schedule(seed, duration, hosts)
    client = Client(lab, hosts, seed)
    worker = threading.Thread(target=client.run, name="nemesis-client", daemon=True)
    started = time.monotonic()
    worker.start()
    try:
        for fault in schedule:
            time.sleep(max(0.0, started + fault.at - time.monotonic()))
            log(f"[{time.monotonic() - started:6.1f}s] {fault.action} {fault.host or ''}"
                f"{' ' + str([list(g) for g in fault.groups]) if fault.groups else ''}")
            apply(lab, fault)
        time.sleep(max(0.0, started + duration - time.monotonic()))
    finally:
        client.stop.set()
        worker.join(CALL_TIMEOUT + 5)
        lab.heal()
        lab.clear_netem()
        for host in hosts:
            node = lab.node(host)
            if node.alive:
                lab.resume(host)
            else:
                lab.restart(host)
    log(f"healed after {time.monotonic() - started:.0f}s; operations {client.counts}; waiting for quiet")
    deadline = time.monotonic() + QUIET_TIMEOUT
    found = ["not checked yet"]
    while time.monotonic() < deadline:
        try:
            found = problems(lab, hosts, client)
        except Exception as e:  # a daemon still starting: not yet judgeable
            found = [f"checker could not read the site: {e}"]
        if not found:
            break
        time.sleep(1.0)
    if found:
        raise NemesisFailure(f"nemesis seed {seed} (rerun: python3 -m tests.lab.nemesis --seed {seed} "
                             f"--duration {duration:g}): " + "; ".join(found))
    return {"seed": seed, "faults": len(schedule), "operations": dict(client.counts),
            "apps": len(client.history), "converged_s": round(QUIET_TIMEOUT - (deadline - time.monotonic()), 1)}


def main(argv: list[str] | None = None) -> int:
    from tests.lab.lab import Lab

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--hosts", type=int, default=5)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    print(f"nemesis seed {seed}, {args.duration:g}s, {args.hosts} hosts")
    root = tempfile.mkdtemp(prefix="mn-", dir="/tmp")
    lab = Lab(Path(root), {"lab": args.hosts}, seed=seed).build()
    try:
        lab.start_site("lab")
        hosts = [f"lab-{j}" for j in range(1, args.hosts + 1)]
        result = run(lab, seed, args.duration, hosts)
        print(f"ok: {result}")
        return 0
    except NemesisFailure as e:
        print(e, file=sys.stderr)
        kept = lab.keep_logs(Path("test-logs") / f"nemesis-{seed}")
        print(f"host logs kept in {kept}", file=sys.stderr)
        return 1
    finally:
        lab.close()


if __name__ == "__main__":
    raise SystemExit(main())
