"""Document compaction benchmark: a site's replica after a simulated year of one change a
minute, with compaction, against the same changes without it.

    python3 -m tests.bench.doc_compaction [--changes 525600] [--baseline-changes 52560]
                                          [--runs 5] [--json bench-results/doc_compaction.json]

One replica (crdt.document.MeshDocument with its durable store, meshd.io.crdtstore) takes
`--changes` changes, one per simulated minute, as a site's leader makes them: 35 % site
summary overwrites, 20 % app status overwrites (20 apps), 15 % node summary overwrites
(5 nodes), 20 % audit records, 10 % app edits (a new version of one of the 20 apps, a
~250-byte spec). Updates go to the store's log (one fsync per simulated hour of changes; the
store folds its log into a snapshot at 4 MiB, as the daemon's does).

With compaction, the policy is the daemon's (crdt.compaction.compaction_due with the default
30-day retention): the history trigger is looked at every 10 simulated minutes, the expiry
trigger once a simulated day (the daemon looks at both every 10 minutes of real time; the
expiry slack is 3 days, so a day's resolution changes nothing but the benchmark's run time).
A compaction is crdt.compaction.rebuild and DocumentStore.rewrite, as the daemon runs them.

Measured at the end: the store's size on disk, the document's full update (what a peer of
another epoch receives), and the time to open the store (snapshot + log, every record parsed,
every app resolved; median of --runs opens). The baseline without compaction takes
`--baseline-changes` (default a tenth of a year): a full year of it takes minutes to build and
ends at a 37 MB document, over the 32 MiB a replica accepts as one update, so its snapshot
would not even open (say --baseline-changes 525600 to see it refused).
"""

from __future__ import annotations

import argparse
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from crdt import compaction
from crdt.document import MeshDocument, SyncError
from crdt.schema import AppSiteStatus, AuditRecord, NodeSummary, SiteSummary
from meshd.io.crdtstore import DocumentStore
from tests.bench.report import report

T0 = 1_800_000_000.0
MINUTE = 60.0
APPS, NODES = 20, 5
SPEC = ('[app]\nname = "app-{n}"\nreplicas = 3\ncommand = ["python3", "-m", "detector", "--model", '
        '"${{artifact:model}}"]\nsites = ["factory-a"]\n[app.resources]\ncpu = 0.25\nmemory_mb = 64\n'
        '[app.update]\nmax_parallel = 1\n# version {v}\n')
HISTORY_CHECK = 10  # simulated minutes between looks at the history trigger
EXPIRY_CHECK = 1440  # simulated minutes between looks at the expiry trigger

TARGETS = {
    # the brief: a year of one change a minute opens in <= 1 s and stays under a few MB
    "open_s": (1.0, "s"),
    "store_mb": (5.0, "MB"),
    "document_mb": (5.0, "MB"),
    "compactions": (None, ""),
    "compaction_s": (None, "s"),
    "records": (None, ""),
    "build_s": (None, "s"),
    "baseline_open_s": (None, "s"),
    "baseline_store_mb": (None, "MB"),
    "baseline_document_mb": (None, "MB"),
    "baseline_changes": (None, ""),
}


def change(doc: MeshDocument, i: int, rng: random.Random, seq: list[int]):
    """The i-th change (a record), as the site's leader would write it."""
    ts = T0 + MINUTE * i
    r = rng.random()
    if r < 0.35:
        ready = 3 if rng.random() < 0.9 else 2
        return SiteSummary(site="factory-a", nodes=3, ready=ready, leader="node-1",
                           addresses=("198.18.1.11:7700", "198.18.1.12:7700", "198.18.1.13:7700"), ts=ts)
    if r < 0.55:
        app = rng.randrange(APPS)
        return AppSiteStatus(app=f"app-{app}", site="factory-a", edit_id=f"e-{app}", version=1 + i // 10_000,
                             desired=3, running=rng.randrange(4), ts=ts)
    if r < 0.70:
        node = rng.randrange(NODES)
        return NodeSummary(node_id=f"{node:032x}", name=f"node-{node}", site="factory-a",
                           state="ready", address=f"198.18.1.{11 + node}:7700", arch="aarch64", role="follower",
                           allocs=rng.randrange(10), labels=("line=1", "zone=north"), evidence="software", ts=ts)
    if r < 0.90:
        seq[0] += 1
        return AuditRecord(audit_id=f"factory-a/{seq[0]}", ts=ts, actor="ops@console", action="deploy",
                           target=f"app-{rng.randrange(APPS)}", site="factory-a")
    app = rng.randrange(APPS)
    return doc.new_app_edit(edit_id=f"edit-{i:08d}", app=f"app-{app}", site="factory-a", actor="ops@console",
                            ts=ts, spec=SPEC.format(n=app, v=i), targets=("factory-a",), replicas=3)


def simulate(directory: Path, changes: int, compact: bool) -> dict[str, float]:
    """Write `changes` changes into a store at `directory`; returns build figures."""
    store = DocumentStore(directory)
    doc = store.open(MeshDocument(client_id=secrets.randbits(52)))
    rng, seq = random.Random(1), [0]
    pending: list[bytes] = []
    grown, base = 0, 0
    compactions, compaction_times = 0, []
    started = time.perf_counter()
    for i in range(changes):
        update = doc.put(change(doc, i, rng, seq))
        pending.append(update)
        grown += len(update)
        if len(pending) >= 60:  # an hour of changes per fsync
            store.append(*pending)
            pending.clear()
            if store.needs_compaction():
                store.compact(doc)
        if not compact or i % HISTORY_CHECK:
            continue
        now = T0 + MINUTE * i
        oldest = compaction.oldest_expiring(doc.all_records(), retention=compaction.DEFAULT_RETENTION) if i % EXPIRY_CHECK == 0 else None
        reason = compaction.compaction_due(now=now, retention=compaction.DEFAULT_RETENTION, grown=grown, base=base,
                                           oldest=oldest)
        if reason is None:
            continue
        at = time.perf_counter()
        store.append(*pending)
        pending.clear()
        doc, _ = compaction.rebuild(doc.all_records(), now=now, retention=compaction.DEFAULT_RETENTION,
                                    client_id=secrets.randbits(52), epoch=doc.epoch.successor(secrets.token_bytes(16)))
        full = doc.full_update()
        store.rewrite(doc.epoch, full)
        grown, base = 0, len(full)
        compactions += 1
        compaction_times.append(time.perf_counter() - at)
    store.append(*pending)
    store.close()
    return {"build_s": time.perf_counter() - started, "compactions": compactions,
            "compaction_s": statistics.median(compaction_times) if compaction_times else 0.0,
            "document_bytes": len(doc.full_update()), "records": len(doc.all_records())}


def open_once(directory: Path) -> float:
    started = time.perf_counter()
    store = DocumentStore(directory)
    doc = store.open(MeshDocument(client_id=secrets.randbits(52)))
    doc.all_records()
    doc.apps()
    elapsed = time.perf_counter() - started
    store.close()
    if (directory / "snapshot.bad").exists():
        raise SyncError("the store's snapshot was refused on open")
    return elapsed


def store_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--changes", type=int, default=525_600)
    parser.add_argument("--baseline-changes", type=int, default=52_560)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", default="bench-results/doc_compaction.json")
    args = parser.parse_args(argv)
    samples: dict[str, list[float]] = {k: [] for k in TARGETS}
    root = Path(tempfile.mkdtemp(prefix="doc-compaction-"))
    try:
        for label, changes, compact in (("", args.changes, True), ("baseline_", args.baseline_changes, False)):
            directory = root / (label or "compacted")
            print(f"{'with' if compact else 'without'} compaction: {changes} changes ...", file=sys.stderr, flush=True)
            built = simulate(directory, changes, compact)
            for _ in range(args.runs):
                try:
                    samples[f"{label}open_s"].append(open_once(directory))
                except SyncError as e:
                    print(f"{label or 'compacted '}store does not open: {e}", file=sys.stderr)
                    break
            samples[f"{label}store_mb"].append(store_bytes(directory) / 1e6)
            samples[f"{label}document_mb"].append(built["document_bytes"] / 1e6)
            if compact:
                for key in ("build_s", "compactions", "compaction_s", "records"):
                    samples[key].append(float(built[key]))
            else:
                samples["baseline_changes"].append(float(changes))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report("doc_compaction", args.json, args.runs, samples, TARGETS, changes=args.changes,
           baseline_changes=args.baseline_changes,
           mix={"site_summary": 0.35, "app_status": 0.20, "node_summary": 0.15, "audit": 0.20, "app_edit": 0.10},
           retention_s=compaction.DEFAULT_RETENTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
