"""Site-core benchmark: what the pure cores cost on large sites, on one core.

    python3 -m tests.bench.site_core [--runs 5] [--json bench-results/site_core.json]

- placement: one plan of 1,000 replicas of a new app on 5,000 nodes that already run
  100,000 allocations (1,000 apps x 100), spread and binpack: placements per second. The
  baseline in the same run is the obvious planner (every replica weighs every node, usage
  summed over every allocation: tests/unit/placement_reference.py) and this planner side by
  side on a site small enough for the baseline (200 nodes, 2,000 allocations, 20 replicas).
- leader pass: `Leading.step` on 1,000 nodes / 100,000 allocations when nothing changed,
  after one heartbeat (a node record replaced) and after one allocation report; a new
  leader's look at the whole site: its first pass, and all the passes it takes (the
  baseline: what every pass cost when each reconciled everything).
- Raft thread: applying a 10-placement plan and a heartbeat with a report at 100,000
  allocations; the snapshot: what it costs the Raft thread (meshd.io.snapshots: a copy and
  a hard link) against pysyncobj's own dump (pickle + gzip 9 on that thread, the baseline),
  with the writer thread's time; a snapshot sent by the leader: what opening it costs the
  Raft thread, and its load (on a thread of its own) for context; the reader copy the trio
  side takes.
Prints medians and writes every sample to JSON. Times are per operation, in ms unless said.
"""

from __future__ import annotations

import argparse
import gzip
import io
import itertools
import os
import pickle
import statistics
import tempfile
import time
from dataclasses import replace

from pysyncobj.config import SERIALIZER_STATE

from meshd import sitestate
from meshd.io import snapshots
from meshd.io.snapshots import SnapshotStore
from meshd.commands import ApplyPlan, Envelope, encode
from meshd.node.leading import LeaderView, Leading
from meshd.placement.plan import Placement, make_plan
from meshd.state import (ALLOC_RUNNING, LIVENESS_READY, Alloc, AppRecord, AppSpec, NodeRecord, NodeResources,
                         ResourceRequest, SiteState)
from tests.bench.report import report
from tests.unit import placement_reference

TARGETS = {
    # >= 5,000 placements/s on one core: at most 200 us per placement.
    "place_us_spread": (200.0, "us/placement"),
    "place_us_binpack": (200.0, "us/placement"),
    "baseline_small_obvious_us": (None, "us/placement"),
    "baseline_small_planner_us": (None, "us/placement"),
    # A leader pass over an unchanged 1,000-node / 100,000-allocation site: <= 50 ms.
    "pass_idle_ms": (50.0, "ms"),
    "pass_after_heartbeat_ms": (50.0, "ms"),
    "pass_after_report_ms": (50.0, "ms"),
    # A new leader looks at the whole site once, in passes of bounded size.
    "pass_first_of_term_ms": (None, "ms"),
    "term_whole_look_ms": (None, "ms"),
    # Nothing on the Raft thread beyond 50 ms at 100,000 allocations.
    "raft_apply_plan_ms": (50.0, "ms"),
    "raft_apply_heartbeat_ms": (50.0, "ms"),
    "raft_snapshot_pysyncobj_ms": (None, "ms"),
    "raft_snapshot_ms": (50.0, "ms"),
    "snapshot_writer_thread_ms": (None, "ms"),
    # A snapshot the leader sends: the Raft thread opens it, a thread of its own loads it.
    "raft_snapshot_open_ms": (50.0, "ms"),
    "snapshot_load_ms": (None, "ms"),
    "reader_copy_ms": (50.0, "ms"),
}

T0 = 1_800_000_000.0


def build(nodes: int, apps: int, per_app: int, cpu: float = 0.01, mem: int = 1) -> SiteState:
    state = SiteState(site="s1", mesh_id="m1")
    for i in range(nodes):
        node_id = f"{i:032x}"
        state.nodes[node_id] = NodeRecord(
            node_id=node_id, name=f"n{i}", site="s1", address=f"198.18.{i // 250}.{i % 250 + 1}:7700",
            raft_address=f"198.18.{i // 250}.{i % 250 + 1}:7701", public_key="00", liveness=LIVENESS_READY,
            voter=i < 5, resources=NodeResources(cpu_total=64, cpu_free=64, mem_total_mb=1 << 20, mem_free_mb=1 << 20))
    ids = sorted(state.nodes)
    n = 0
    for a in range(apps):
        name = f"app{a}"
        spec = AppSpec(name=name, replicas=per_app, command=("sleep", "1"),
                       resources=ResourceRequest(cpu=cpu, memory_mb=mem))
        state.apps[name] = AppRecord(spec=spec, version=1)
        for r in range(per_app):
            alloc_id = f"{n:012x}"
            state.allocs[alloc_id] = Alloc(alloc_id=alloc_id, app=name, version=1, replica=r,
                                           node_id=ids[n % nodes], state=ALLOC_RUNNING, created_at=T0)
            n += 1
    return state


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_placement(samples: dict, runs: int) -> None:
    state = build(5_000, 1_000, 100)
    spec = AppSpec(name="new", replicas=1_000, command=("x",), resources=ResourceRequest(cpu=0.1, memory_mb=16))
    for algorithm, metric in (("spread", "place_us_spread"), ("binpack", "place_us_binpack")):
        for _ in range(runs):
            ids = itertools.count()
            seconds = timed(lambda: make_plan(state, spec, 1, range(1_000), lambda: f"p{next(ids)}",
                                              algorithm=algorithm))
            samples[metric].append(seconds / 1_000 * 1e6)
    small = build(200, 100, 20)
    spec = replace(spec, replicas=20)
    for _ in range(runs):
        ids = itertools.count()
        seconds = timed(lambda: placement_reference.make_plan(small, spec, 1, range(20), lambda: f"p{next(ids)}"))
        samples["baseline_small_obvious_us"].append(seconds / 20 * 1e6)
        seconds = timed(lambda: make_plan(small, spec, 1, range(20), lambda: f"p{next(ids)}"))
        samples["baseline_small_planner_us"].append(seconds / 20 * 1e6)


def leader_view(state: SiteState, now: float) -> LeaderView:
    voters = tuple(n.raft_address for n in state.nodes.values() if n.voter)
    return LeaderView(state=state, term=1, own_id=f"{0:032x}", own_raft_address=voters[0], configured=voters[1:],
                      contacts=tuple((n.raft_address, now) for n in state.nodes.values()))


def bench_leader(samples: dict, runs: int) -> None:
    state = build(1_000, 1_000, 100)
    ids = itertools.count()
    core = Leading(lease=1.0, new_alloc_id=lambda: f"p{next(ids)}")
    first = leader_view(state, 0.0)
    samples["pass_first_of_term_ms"].append(timed(lambda: core.step(first, 0.0)) * 1e3)
    started = time.perf_counter()
    while core.next_look(state, 0.0) == 0.0:  # the rest of the new leader's look, pass by pass
        core.step(first, 0.0)
    samples["term_whole_look_ms"].append((time.perf_counter() - started) * 1e3 + samples["pass_first_of_term_ms"][-1])
    node_ids = sorted(state.nodes)
    allocs = list(state.allocs.values())
    for i in range(runs * 4):
        now = 0.2 + i * 0.01  # within one safety period: what a pass costs between sweeps
        view = leader_view(state, now)
        samples["pass_idle_ms"].append(timed(lambda: core.step(view, now)) * 1e3)
        node = state.nodes[node_ids[i]]
        state.nodes[node.node_id] = replace(node, heartbeat_seq=node.heartbeat_seq + 1)
        view = leader_view(state, now)
        samples["pass_after_heartbeat_ms"].append(timed(lambda: core.step(view, now)) * 1e3)
        alloc = allocs[i * 997 % len(allocs)]
        state.allocs[alloc.alloc_id] = replace(alloc, restarts=alloc.restarts + 1)
        view = leader_view(state, now)
        samples["pass_after_report_ms"].append(timed(lambda: core.step(view, now)) * 1e3)


def bench_raft(samples: dict, runs: int) -> None:
    state = build(1_000, 1_000, 100)
    state.apps["new"] = AppRecord(spec=AppSpec(name="new", replicas=10_000, command=("x",)), version=1)
    node_ids = sorted(state.nodes)
    counter = itertools.count()
    for _ in range(runs):
        placements = tuple(Placement(f"q{next(counter)}", "new", 1, next(counter), node_ids[i]) for i in range(10))
        wire = encode(ApplyPlan(app="new", version=1, placements=placements), Envelope(ts=T0))
        samples["raft_apply_plan_ms"].append(timed(lambda: sitestate.apply(state, wire)) * 1e3)
        node = node_ids[next(counter) % len(node_ids)]
        alloc = state.allocs.on_node(node)[0]
        wire = {"op": "heartbeat", "ts": T0, "node_id": node, "seq": next(counter), "reports": [{
            "alloc_id": alloc.alloc_id, "state": "running", "restarts": 1, "pid": 10, "exit_code": None,
            "reason": "", "stopped_by_meshd": False}]}
        samples["raft_apply_heartbeat_ms"].append(timed(lambda: sitestate.apply(state, wire)) * 1e3)
        samples["reader_copy_ms"].append(timed(state.reader_copy) * 1e3)

    def pysyncobj_dump() -> None:  # what pysyncobj's Serializer does with useFork=False
        with io.BytesIO() as out:
            with gzip.GzipFile(fileobj=out, mode="wb") as g:
                pickle.dump(({"site_state": state}, None, None, None), g)

    for _ in range(max(1, runs // 2)):
        samples["raft_snapshot_pysyncobj_ms"].append(timed(pysyncobj_dump) * 1e3)
    with tempfile.TemporaryDirectory() as tmp:
        store = SnapshotStore()
        store.state = lambda: state
        final = os.path.join(tmp, "snapshot")
        for _ in range(runs):
            samples["raft_snapshot_ms"].append(timed(lambda: store.write(final + ".tmp", ((), (), ()))) * 1e3)
            os.replace(final + ".tmp", final)  # what pysyncobj does when write returns
            started = time.perf_counter()
            while store.check() == SERIALIZER_STATE.SERIALIZING:
                time.sleep(0.005)
            samples["snapshot_writer_thread_ms"].append((time.perf_counter() - started) * 1e3)
        data = open(final, "rb").read()
        for _ in range(runs):
            opened: list = []
            samples["raft_snapshot_open_ms"].append(timed(lambda: opened.append(snapshots.open_snapshot(data))) * 1e3)
            samples["snapshot_load_ms"].append(timed(opened[0].finish) * 1e3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", default="bench-results/site_core.json")
    args = parser.parse_args(argv)
    samples: dict[str, list[float]] = {k: [] for k in TARGETS}
    for part in (bench_placement, bench_leader, bench_raft):
        part(samples, args.runs)
        print(f"{part.__name__} done: " + ", ".join(
            f"{k}={statistics.median(v):.2f}" for k, v in samples.items() if v), flush=True)
    report("site_core", args.json, args.runs, samples, TARGETS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
