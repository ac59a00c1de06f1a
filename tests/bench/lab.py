"""Lab benchmark: meshd across real network stacks with 5 ms of delay, side by side with Serf.

    python3 -m tests.bench.lab [--runs 5] [--delay-ms 5] [--json bench-results/lab.json]

Each run builds a fresh lab (tests.lab): six hosts in their own network namespaces on one
segment, every host's outgoing frames delayed by --delay-ms (the lab switch's netem). Hosts
1-5 run both meshd and a Serf agent (Debian `serf`, default `lan` profile, discovery by mDNS
like meshd); host 6 runs a stock mDNS client (avahi-daemon + avahi-browse). Measured:

- new host seen by all: hosts 2-5 are started one at a time, Serf first, then meshd; the time from its process start until every other member knows it: Serf, every other
  agent has logged `EventMemberJoin` for it; meshd, every other member's `nodes` lists it
  `ready` (admitted: attested, certified, committed through Raft and heartbeating);
- join: meshd's one-site measure, process start -> `ready` in the leader's `nodes`;
- avahi: a meshd process start -> avahi-browse on another host has resolved its announcement
  (address, port and TXT), i.e. a stock client sees the node;
- deploy of 10 replicas across the five hosts -> all running (`deploy --wait`);
- SIGKILLed host detected by all: meshd and Serf on a non-leader host are SIGKILLed together;
  Serf, every other agent has logged `EventMemberFailed`; meshd, every other member's
  `nodes` shows it not `ready`;
- node failover: that kill -> the app has 10 running replicas again, none on the dead host;
- leader failover: SIGKILL of the leader (after the victim is back) -> a deploy is accepted
  by a survivor.

Serf's events are read from its log lines as they arrive (its event handlers run a coalescing
second later); meshd's views are polled every 20 ms, so meshd's figures carry up to 20 ms of
polling on top. Two noisy cores run 11 daemons here: read medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from meshd.io.localsite import LocalNode, LocalSite, wait_for
from tests.bench.one_site import measure_deploy, measure_leader_failover
from tests.bench.report import report
from tests.lab.avahi import AvahiObserver
from tests.lab.lab import Lab
from tests.lab.serf import SerfAgent

SITE = "bench"
MEMBERS = 5  # hosts running meshd and Serf
OBSERVER = f"{SITE}-{MEMBERS + 1}"  # the avahi host
POLL_S = 0.02  # meshd views are polled this often; small next to the figures
TIMEOUT_S = 60.0  # generous: a failed wait is a failed run, not a slow sample

TARGETS = {  # metric -> (target, unit); the one-site targets hold across hosts too
    "meshd_join_s": (1.0, "s"),
    "deploy_10_s": (0.5, "s"),
    "node_failover_s": (2.0, "s"),
    "leader_failover_s": (1.5, "s"),
    # side by side with Serf, no target: the comparison is the figure
    "meshd_seen_by_all_s": (None, "s"),
    "serf_seen_by_all_s": (None, "s"),
    "meshd_kill_detected_s": (None, "s"),
    "serf_kill_detected_s": (None, "s"),
    "avahi_resolves_s": (None, "s"),
}

SIDE_BY_SIDE = (  # (what, meshd metric, Serf metric)
    ("new host seen by all others", "meshd_seen_by_all_s", "serf_seen_by_all_s"),
    ("SIGKILLed host detected by all", "meshd_kill_detected_s", "serf_kill_detected_s"),
)


def hosts() -> list[str]:
    return [f"{SITE}-{j}" for j in range(1, MEMBERS + 1)]


def views_of(members: list[LocalNode], name: str) -> list[str | None]:
    """`name`'s state in each member's own `nodes` (None: absent, or the member did not answer)."""
    states = []
    for member in members:
        rows = member.try_call("nodes") or []
        states.append(next((r["state"] for r in rows if r["name"] == name), None))
    return states


def wait_all_see(members: list[LocalNode], name: str, ready: bool) -> float:
    """Until every member's view has `name` ready (or, ready=False, not ready); returns when."""
    def settled():
        states = views_of(members, name)
        return all((s == "ready") == ready for s in states)
    wait_for(settled, TIMEOUT_S, interval=POLL_S, what=f"all members to see {name} {'ready' if ready else 'down'}")
    return time.monotonic()


def start_serf(agents: dict[str, SerfAgent], host: str) -> float:
    """Start the host's agent; seconds until every running agent has logged it joined."""
    others = [a for h, a in agents.items() if h != host and a.proc is not None]
    agent = agents[host]
    t0 = time.monotonic()
    agent.start()
    agent.wait_event("join", host, after=0.0, timeout=TIMEOUT_S)
    if not others:
        return 0.0
    return max(a.wait_event("join", host, after=t0, timeout=TIMEOUT_S) for a in others) - t0


def start_meshd(site: LocalSite, observer: AvahiObserver, samples: dict[str, list[float]]) -> LocalNode:
    """Found the site or join it, recording join, seen-by-all and the avahi resolution."""
    if not site.nodes:
        node = site.found(TIMEOUT_S)
    else:
        token = site.token()
        others = [n for n in site.nodes if n.alive]
        leader = site.leader() or others[0]
        node = site.add_node()
        node.start(join=token)
        leader_sees = wait_all_see([leader], node.name, ready=True)
        all_see = wait_all_see(others, node.name, ready=True)
        samples["meshd_join_s"].append(leader_sees - node.started_at)
        samples["meshd_seen_by_all_s"].append(all_see - node.started_at)
    node_id = node.call("status")["node_id"]
    resolved = observer.wait_resolved(node_id, after=node.started_at, timeout=TIMEOUT_S)
    samples["avahi_resolves_s"].append(resolved.at - node.started_at)
    return node


def measure_kill(site: LocalSite, agents: dict[str, SerfAgent], app: str,
                 samples: dict[str, list[float]]) -> LocalNode:
    leader = site.leader()
    victim = next(n for n in site.nodes if n.alive and n is not leader)
    survivors = [n for n in site.nodes if n.alive and n is not victim]
    serf_others = [a for h, a in agents.items() if h != victim.name]
    t_meshd = time.monotonic()
    victim.kill()
    t_serf = time.monotonic()
    agents[victim.name].kill()
    samples["meshd_kill_detected_s"].append(wait_all_see(survivors, victim.name, ready=False) - t_meshd)

    def replaced():
        running = [a for a in (leader.try_call("allocs", app=app, node=None) or [])
                   if a["state"] == "running" and a["desired"] == "run"]
        return len(running) == 10 and all(a["node"] != victim.name for a in running)
    wait_for(replaced, TIMEOUT_S, interval=POLL_S, what="replacements running")
    samples["node_failover_s"].append(time.monotonic() - t_meshd)
    samples["serf_kill_detected_s"].append(
        max(a.wait_event("failed", victim.name, after=t_serf, timeout=TIMEOUT_S) for a in serf_others) - t_serf)
    return victim


def one_run(lab: Lab, delay_s: float, samples: dict[str, list[float]]) -> None:
    for host in lab.hosts:
        lab.netem(host, delay=delay_s)
    observer = AvahiObserver(lab, OBSERVER, lab.root / "observer").start()
    site = lab.sites[SITE]
    agents = {h: SerfAgent(lab, h) for h in hosts()}
    for host in hosts():  # one at a time, Serf then meshd, so neither competes with the other
        seen = start_serf(agents, host)
        if host != hosts()[0]:
            samples["serf_seen_by_all_s"].append(seen)
        start_meshd(site, observer, samples)
    samples["deploy_10_s"].append(measure_deploy(site, "bench"))
    victim = measure_kill(site, agents, "bench", samples)
    victim.start()  # back on its data dir, so the leader failover starts from five voters
    site.wait_ready(victim, TIMEOUT_S)
    samples["leader_failover_s"].append(measure_leader_failover(site))


def side_by_side(samples: dict[str, list[float]]) -> list[dict]:
    rows = []
    for what, ours, theirs in SIDE_BY_SIDE:
        if samples.get(ours) and samples.get(theirs):
            rows.append({"measure": what, "meshd_median_s": statistics.median(samples[ours]),
                         "serf_median_s": statistics.median(samples[theirs]),
                         "n_meshd": len(samples[ours]), "n_serf": len(samples[theirs])})
    print(f"\n{'side by side (medians)':<34} {'meshd':>8} {'Serf':>8}")
    for r in rows:
        print(f"{r['measure']:<34} {r['meshd_median_s']:>7.3f}s {r['serf_median_s']:>7.3f}s")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--delay-ms", type=float, default=5.0)
    parser.add_argument("--json", default="bench-results/lab.json")
    args = parser.parse_args(argv)
    samples: dict[str, list[float]] = {k: [] for k in TARGETS}
    with tempfile.TemporaryDirectory(prefix="mb-", dir="/tmp") as root:  # short: admin socket paths
        for i in range(args.runs):
            lab = Lab(Path(root) / f"run{i}", {SITE: MEMBERS + 1}, seed=i).build()
            try:
                one_run(lab, args.delay_ms / 1000, samples)
            except Exception:
                for site in lab.sites.values():
                    print(site.dump_logs(), file=sys.stderr)
                raise
            finally:
                lab.close()
            print(f"run {i + 1}/{args.runs} done", file=sys.stderr)
    rows = side_by_side(samples)
    print()
    report("lab", args.json, args.runs, samples, TARGETS, delay_ms=args.delay_ms, side_by_side=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
