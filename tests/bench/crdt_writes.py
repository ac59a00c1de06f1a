"""Document write benchmark: the update one small write makes, as the document's history of
overwrites grows.

    python3 -m tests.bench.crdt_writes [--overwrites 1000000] [--json bench-results/crdt_writes.json]

One replica (crdt.document.MeshDocument) takes `--overwrites` writes the way a site makes
them: the site summary overwritten in place between records that stay (audit records), so
the document's delete set fragments with every overwrite. At checkpoints it measures the
update a 119-byte-record write returns (what the durable log stores and every peer gets),
against the baseline in the same run: the update `get_update(state before the write)` makes,
which carries the document's whole delete set. Also: microseconds per write.
"""

from __future__ import annotations

import argparse
import sys
import time

from crdt.document import MeshDocument
from crdt.schema import AuditRecord, SiteSummary
from tests.bench.report import report

TARGETS = {
    # An update for a small write stays the size of that write (bytes; the record is ~119 B).
    "update_bytes_at_end": (256.0, "B"),
    "baseline_update_bytes_at_end": (None, "B"),
    "us_per_write": (None, "us"),
}


def summary(n: int) -> SiteSummary:
    return SiteSummary(site="factory-a", nodes=3, ready=3, leader="node-1", addresses=("198.18.1.11:7700",),
                       ts=1_800_000_000.0 + n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--overwrites", type=int, default=1_000_000)
    parser.add_argument("--json", default="bench-results/crdt_writes.json")
    args = parser.parse_args(argv)
    doc = MeshDocument(client_id=1)
    checkpoints = sorted({min(args.overwrites, c) for c in (1_000, 10_000, 100_000, 1_000_000)})
    samples: dict[str, list[float]] = {"update_bytes_at_end": [], "baseline_update_bytes_at_end": [],
                                       "us_per_write": []}
    print(f"{'overwrites':>10} {'update B':>9} {'baseline B':>11} {'us/write':>9}")
    done, started = 0, time.perf_counter()
    for checkpoint in checkpoints:
        while done < checkpoint:
            doc.put(summary(done))
            if done % 4 == 0:  # a record that stays: the next overwrite's deletion is not contiguous
                doc.put(AuditRecord(audit_id=f"factory-a/{done}", ts=1_800_000_000.0 + done, actor="op",
                                    action="deploy", target="svc", site="factory-a"))
            done += 1
        per_write = (time.perf_counter() - started) / done * 1e6
        before = doc.doc.get_state()
        update = doc.put(summary(done))
        baseline = doc.doc.get_update(before)
        print(f"{done:>10} {len(update):>9} {len(baseline):>11} {per_write:>9.1f}", flush=True)
    samples["update_bytes_at_end"].append(float(len(update)))
    samples["baseline_update_bytes_at_end"].append(float(len(baseline)))
    samples["us_per_write"].append(per_write)
    report("crdt_writes", args.json, 1, samples, TARGETS, overwrites=args.overwrites)
    return 0


if __name__ == "__main__":
    sys.exit(main())
