"""Document sync benchmark: two replicas cut apart, 10,000 changes on each side, then healed.

    python3 -m tests.bench.crdt_sync [--runs 5] [--changes 10000] [--idle-seconds 60]
                                     [--json bench-results/crdt_sync.json]

Each run: two replica hubs (meshd.io.docsync) with durable stores (fsync'd logs in a temporary
directory) sync over a real TCP connection on loopback; the link is cut; each side makes
`--changes` changes (app edits over 100 apps, with conflicting edits of the same apps on both
sides, audit records and site summaries); the link is restored. Measured:
- converge: reconnect -> both replicas hold the same records (apps, winners, audit);
- bytes: every byte both sessions sent after the reconnect (headers and state vectors
  included), against the minimal deltas (what each side lacked, as pycrdt encodes it);
- idle: bytes a connected pair exchanges per minute with nothing changing (one run of
  `--idle-seconds`, at the daemon's resync interval).
This measures the replica and sync layers over a real socket; sites' daemons add the TLS
channel and the placement around them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import trio

from crdt.schema import AuditRecord, SiteSummary
from crdt.updatecheck import decode_state_vector
from meshd.io.crdtstore import DocumentStore
from meshd.io.docsync import DocumentHub
from tests.bench.report import report
from tests.doclink import link

TARGETS = {
    "converge_s": (1.0, "s"),
    "bytes_vs_minimal": (1.5, "x"),
    "bytes_sent_kb": (None, "KiB"),
    "minimal_deltas_kb": (None, "KiB"),
    "idle_bytes_per_min": (None, "B/min"),
}
APPS = 100  # apps both sides edit while cut: every one of them ends in a conflict
SPEC = '[app]\nname = "{name}"\nreplicas = {replicas}\ncommand = ["sleep", "3600"]\n'


async def changes(hub: DocumentHub, site: str, count: int) -> None:
    for n in range(count):
        kind = n % 10
        if kind < 6:  # most changes are deploys/updates
            app = f"app-{n % APPS}"
            await hub.write([hub.document.new_app_edit(edit_id=f"{site}/{n}", app=app, site=site, actor="bench",
                                                 ts=time.time(), spec=SPEC.format(name=app, replicas=n % 7 + 1),
                                                 targets=(site,), replicas=n % 7 + 1)])
        elif kind < 9:
            await hub.write([AuditRecord(audit_id=f"{site}/audit/{n}", ts=time.time(), actor="bench", action="deploy",
                                   target=f"app-{n % APPS}", site=site)])
        else:
            await hub.write([SiteSummary(site=site, nodes=3, ready=n % 4, leader=f"{site}-1",
                                   addresses=("198.18.1.11:7700",), ts=time.time())])


def durable_hub(path: Path) -> DocumentHub:
    store = DocumentStore(path)
    return DocumentHub(store.open(), store)


def same(a: DocumentHub, b: DocumentHub) -> bool:
    # clocks per client: the encoding's order of clients differs between replicas
    return (decode_state_vector(a.document.state_vector()) == decode_state_vector(b.document.state_vector())
            and a.document.records(AuditRecord) == b.document.records(AuditRecord)
            and a.document.apps() == b.document.apps())


async def one_run(root: Path, count: int, samples: dict[str, list[float]]) -> None:
    a, b = durable_hub(root / "a"), durable_hub(root / "b")
    async with trio.open_nursery() as nursery:
        cut = await nursery.start(link, a, b)
        await changes(a, "site-a", 100)  # some shared history before the cut
        while not same(a, b):
            await trio.sleep(0.01)
        cut.cancel()
        while a.sessions or b.sessions:
            await trio.sleep(0.01)
        before_a, before_b = a.document.state_vector(), b.document.state_vector()
        await changes(a, "site-a", count)
        await changes(b, "site-b", count)
        minimal = len(a.document.delta_since(before_b)) + len(b.document.delta_since(before_a))
        t0 = trio.current_time()
        await nursery.start(link, a, b)
        while not same(a, b):
            await trio.sleep(0.001)
        samples["converge_s"].append(trio.current_time() - t0)
        sent = sum(s.bytes_out for hub in (a, b) for s in hub.live_sessions())
        samples["bytes_sent_kb"].append(sent / 1024)
        samples["minimal_deltas_kb"].append(minimal / 1024)
        samples["bytes_vs_minimal"].append(sent / minimal)
        conflicts = sum(len(r.losers) for r in a.document.apps().values())
        assert conflicts > 0, "the bench should exercise conflicting edits"
        nursery.cancel_scope.cancel()
    for hub in (a, b):
        hub.store.close()


async def idle(root: Path, seconds: float, samples: dict[str, list[float]]) -> None:
    a, b = durable_hub(root / "ia"), durable_hub(root / "ib")
    await changes(a, "site-a", 1000)
    async with trio.open_nursery() as nursery:
        await nursery.start(link, a, b)
        while not same(a, b):
            await trio.sleep(0.01)
        start = sum(s.bytes_out for hub in (a, b) for s in hub.live_sessions())
        await trio.sleep(seconds)
        end = sum(s.bytes_out for hub in (a, b) for s in hub.live_sessions())
        samples["idle_bytes_per_min"].append((end - start) * 60 / seconds)
        nursery.cancel_scope.cancel()
    for hub in (a, b):
        hub.store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--changes", type=int, default=10_000)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--json", default="bench-results/crdt_sync.json")
    args = parser.parse_args(argv)
    samples: dict[str, list[float]] = {k: [] for k in TARGETS}
    with tempfile.TemporaryDirectory(prefix="mb-") as root:
        for i in range(args.runs):
            trio.run(one_run, Path(root) / f"run{i}", args.changes, samples)
            print(f"run {i + 1}/{args.runs} done", file=sys.stderr)
        if args.idle_seconds > 0:
            trio.run(idle, Path(root) / "idle", args.idle_seconds, samples)
    report("crdt_sync", args.json, args.runs, samples, TARGETS, changes_per_side=args.changes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
