"""The twin against the lab: one scenario (five hosts; a deploy, a host killed and restarted,
two hosts cut off and healed) run for real in the lab (tests.lab: namespaces, real daemons,
mDNS, real processes) and on the twin (meshd.twin, `meshd sim`), on the same schedule.

What must match: the outcome (the replicas the kill took, that every failure's replicas were
replaced, and at the end the number of replicas per host, sorted: node ids differ between the
two, so which of two equal hosts wins a tie may too), and every recovery time within FACTOR
of the lab's.
"""

from __future__ import annotations

import collections
import json
import time

import pytest

from meshd.io.localsite import sleeper_app, wait_for
from meshd.twin.run import Twin
from meshd.twin.scenario import parse

pytestmark = pytest.mark.system

HOSTS = [f"lab-{j}" for j in range(1, 6)]
REPLICAS = 10
# The schedule, in seconds from the deploy: each phase longer than any recovery.
KILL_AT, RESTART_AT, PARTITION_AT, HEAL_AT, END_AT = 15.0, 30.0, 45.0, 65.0, 85.0
# The twin's recoveries are the cores' own timeouts (lease, election); the lab adds process
# starts, Raft round trips and this test's polling (every 0.05 s). Measured on this machine:
# the lab took 0.97 s and 1.12 s where the twin said 1.2 s and 1.2 s (0.8-0.95x); a factor
# of 3 either way leaves room for a loaded CI machine.
FACTOR = 3.0


def running_by_host(lab, via: str) -> collections.Counter:
    allocs = lab.call(via, "allocs", app="web", node=None)
    return collections.Counter(a["node"] for a in allocs if a["state"] == "running" and a["desired"] == "run")


def leader_of(lab) -> str:
    def find():
        for host in HOSTS:
            if (lab.node(host).try_call("status") or {}).get("role") == "leader":
                return host
        return None
    return wait_for(find, 20, what="a leader")


def scenario(order: list[str], victim: str, minority: list[str], app_file: str) -> str:
    nodes = "".join(f'[[site.node]]\nname = "{h}"\n' for h in order)
    return (f'[sim]\nname = "lab fidelity"\nduration = {END_AT + 5:g}\nseed = 1\n'
            f'[[site]]\nname = "lab"\n{nodes}'
            f'[[app]]\nfile = "{app_file}"\n'
            f'[[event]]\nat = 5\ndo = "deploy"\napp = "web"\n'
            f'[[event]]\nat = {5 + KILL_AT:g}\ndo = "kill"\nnode = "{victim}"\n'
            f'[[event]]\nat = {5 + RESTART_AT:g}\ndo = "restart"\nnode = "{victim}"\n'
            f'[[event]]\nat = {5 + PARTITION_AT:g}\ndo = "partition"\nnodes = {json.dumps(minority)}\n'
            f'[[event]]\nat = {5 + HEAL_AT:g}\ndo = "heal"\n')


def test_the_twin_predicts_the_lab(make_lab, tmp_path):
    lab = make_lab({"lab": 5})
    lab.start_site("lab")
    leader = leader_of(lab)
    others = [h for h in HOSTS if h != leader]
    victim, minority = others[-1], others[:2]
    majority = [h for h in HOSTS if h not in minority]

    # --- the lab ---------------------------------------------------------------------------
    lab.call(leader, "deploy", spec_toml=sleeper_app("web", REPLICAS), wait=True, timeout=30)
    start = time.monotonic()
    wait_for(lambda: sum(running_by_host(lab, leader).values()) == REPLICAS, 30, what="all running")

    def at(offset: float) -> None:
        time.sleep(max(0.0, start + offset - time.monotonic()))

    real: dict[str, float] = {}
    lost: dict[str, int] = {}
    at(KILL_AT)
    lost["kill"] = running_by_host(lab, leader)[victim]
    lab.kill(victim)
    killed = time.monotonic()
    wait_for(lambda: sum(n for h, n in running_by_host(lab, leader).items() if h != victim) == REPLICAS, 30,
             what="the killed host's replicas replaced")
    real["kill"] = time.monotonic() - killed
    at(RESTART_AT)
    lab.restart(victim)

    def victim_ready() -> bool:
        rows = lab.meshctl_json(leader, "nodes")
        return any(r["name"] == victim and r["state"] == "ready" for r in rows)
    # The twin's restart is back at once; a daemon takes seconds (more on a loaded machine).
    # The scenario's premise is that it is back before the cut: wait for it if need be.
    wait_for(victim_ready, 60, interval=0.2, what=f"{victim} ready again after its restart")
    at(PARTITION_AT)
    before = running_by_host(lab, leader)
    lost["partition"] = sum(before[h] for h in minority)
    lab.partition([majority, minority])
    cut = time.monotonic()
    wait_for(lambda: sum(n for h, n in running_by_host(lab, leader).items() if h in majority) == REPLICAS, 30,
             what="the cut-off hosts' replicas replaced")
    real["partition"] = time.monotonic() - cut
    at(HEAL_AT)
    lab.heal()
    wait_for(lambda: sum(lab.workload_processes(h) for h in HOSTS) == REPLICAS, 40, what="extras stopped")
    at(END_AT)
    final_lab = sorted(running_by_host(lab, leader).values())
    processes = sorted(lab.workload_processes(h) for h in HOSTS if lab.workload_processes(h))

    # --- the twin --------------------------------------------------------------------------
    (tmp_path / "web.toml").write_text(sleeper_app("web", REPLICAS))
    text = scenario([leader] + others, victim, minority, "web.toml")
    twin = Twin(parse(text, lambda name: (tmp_path / name).read_text()))
    twin.run()
    summary = twin.summary()
    failures = {f["kind"]: f for f in summary["failures"]}
    twin_final = sorted(len([r for r in n.running.values() if r["state"] == "running"])
                        for n in twin.sites["lab"].nodes.values()
                        if n.up and any(r["state"] == "running" for r in n.running.values()))

    print(f"lab: recovered after kill {real['kill']:.2f} s, after partition {real['partition']:.2f} s; "
          f"twin: {failures['kill']['recovered_after_s']} s, {failures['partition']['recovered_after_s']} s")
    assert failures["kill"]["replicas_lost"] == lost["kill"] == REPLICAS // 5  # spread evenly: 2 per host
    # Which hosts took the killed host's replicas is a tie between equal hosts, broken by node
    # id: the cut-off pair held 4 or 5 of them. Both sides replaced what they lost, and end alike:
    assert failures["partition"]["replicas_lost"] in (4, 5) and lost["partition"] in (4, 5)
    assert twin_final == final_lab == processes  # the majority's three hosts run all ten, evenly
    assert summary["sites"]["lab"]["apps"]["web"]["running"] == REPLICAS
    for kind in ("kill", "partition"):
        predicted = failures[kind]["recovered_after_s"]
        assert predicted is not None
        assert predicted / FACTOR <= real[kind] <= predicted * FACTOR, (kind, predicted, real[kind])
