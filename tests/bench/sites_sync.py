"""Cross-site sync between real sites: after a cut in which each site made N changes, how fast
and how cheaply do they converge; and what an idle pair of sites sends.

    python3 -m tests.bench.sites_sync [--runs 3] [--changes 10000] [--idle-seconds 60]

Each run builds a fresh lab (tests.lab, needs root): two one-host sites of one mesh, each host
its own network namespace and `meshd run` process, the second site founded inside the mesh
(founder token + --peer), the router between them. Site b is cut off at the router; once both
sessions noticed (10 s of silence, the least a session waits), each site takes N changes through its
admin socket, from 16 concurrent clients: deploys of apps that name a third site (so nothing is
placed; the changes are real edits, Raft commits and audit records), 100 of the apps edited on
both sides, so every one of them ends in a conflict. Once both replicas are quiet, the state
vectors give the minimal deltas each side needs; then the link returns. Measured:

- converge_s: the router link back up -> both replicas hold the same document (polled every
  20 ms through `meshctl document --since`: neither lacks an item of the other); it includes
  the redial (every 0.125-0.375 s during the first 10 minutes a link is down);
- sync_s: the new session up -> converged (the sync itself);
- bytes_vs_minimal: bytes both sessions sent on the wire (frames included, large updates
  zlib-compressed) / the two minimal deltas;
- updates_vs_minimal: the update bytes they carried before compression / the minimal deltas
  (what was sent twice or needlessly, whatever compression saved);
- idle_bytes_per_min_per_site: a separate pair at the default sync interval (30 s), in sync and
  left alone: sync bytes sent per site per minute.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sys
import tempfile
import time
from pathlib import Path

from meshd.io.localsite import wait_for
from tests.bench.report import report, showing_logs
from tests.lab.lab import Lab, require_lab

TARGETS: dict[str, tuple[float | None, str]] = {
    "converge_s": (1.0, "s"),
    "sync_s": (None, "s"),
    "bytes_vs_minimal": (1.5, "x"),
    "updates_vs_minimal": (None, "x"),
    "bytes_sent_kb": (None, "KiB"),
    "minimal_deltas_kb": (None, "KiB"),
    "changes_per_s": (None, "1/s"),
    "idle_bytes_per_min_per_site": (None, "B/min"),
}
SHARED_APPS = 100  # edited on both sides while cut: each ends in a conflict
CLIENTS = 16  # concurrent admin clients per site
FAST_SYNC = ("--sync-interval", "1")


def spec(name: str, replicas: int) -> str:
    return f'[app]\nname = "{name}"\nreplicas = {replicas}\ncommand = ["sleep", "3600"]\nsites = ["elsewhere"]\n'


def make_changes(lab: Lab, host: str, site: str, count: int) -> None:
    def one(n: int) -> None:
        name = f"shared-{n // 10 % SHARED_APPS}" if n % 10 == 0 else f"{site}-{n % 2000}"
        lab.call(host, "deploy", spec_toml=spec(name, n % 7 + 1), wait=False, timeout=60)
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(one, range(count)))


def document(lab: Lab, host: str, since: str | None = None) -> dict:
    """The replica's state vector and sessions (brief: no pass over the whole document, which
    would compete with the sync being measured)."""
    return lab.call(host, "document", since=since, brief=True, timeout=30)


def quiet(lab: Lab, host: str) -> dict:
    """Wait until the replica stops changing (the leader has published its audit backlog)."""
    last, same_since = None, time.monotonic()
    while True:
        doc = document(lab, host)
        key = doc["state_vector"]
        if key != last:
            last, same_since = key, time.monotonic()
        elif time.monotonic() - same_since > 2.0:
            return doc
        time.sleep(0.2)


def cross_sessions(doc: dict, other: str) -> list[dict]:
    return [s for s in doc["sessions"] if s["site"] == other]


def sent_between(lab: Lab) -> int:
    """Sync bytes a sent to b and b to a, every session counted (ended ones too)."""
    return sent_totals(lab)[0]


def sent_totals(lab: Lab) -> tuple[int, int]:
    """(bytes on the wire, update bytes before compression) a sent to b and b to a."""
    a, b = document(lab, "a-1"), document(lab, "b-1")
    return (a["sent_by_site"].get("b", 0) + b["sent_by_site"].get("a", 0),
            a["updates_sent_by_site"].get("b", 0) + b["updates_sent_by_site"].get("a", 0))


def converged(lab: Lab) -> bool:
    a, b = document(lab, "a-1"), document(lab, "b-1")
    return document(lab, "a-1", since=b["state_vector"])["delta_items"] == 0 and \
        document(lab, "b-1", since=a["state_vector"])["delta_items"] == 0


def start_two_sites(lab: Lab) -> Lab:
    lab.start_site("a")
    lab.start_site_in_mesh("b", via="a-1")
    wait_for(lambda: cross_sessions(document(lab, "a-1"), "b") and cross_sessions(document(lab, "b-1"), "a"), 30,
             what="the sites syncing")
    return lab


def one_run(lab: Lab, count: int, samples: dict[str, list[float]]) -> None:
    wait_for(lambda: converged(lab), 30, what="agreement before the cut")
    lab.isolate_site("b")
    wait_for(lambda: not cross_sessions(document(lab, "a-1"), "b") and not cross_sessions(document(lab, "b-1"), "a"),
             30, what="both sessions to notice the cut")
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda hs: make_changes(lab, hs[0], hs[1], count), [("a-1", "a"), ("b-1", "b")]))
    samples["changes_per_s"].append(2 * count / (time.monotonic() - started))
    a, b = quiet(lab, "a-1"), quiet(lab, "b-1")
    minimal = sum(lab.call(host, "document", since=other["state_vector"], timeout=30)["delta_bytes"]
                  for host, other in (("a-1", b), ("b-1", a)))
    sent_before, updates_before = sent_totals(lab)
    healed = time.monotonic()
    lab.reconnect_site("b")
    session_up = None
    while True:
        if session_up is None and cross_sessions(document(lab, "a-1"), "b"):
            session_up = time.monotonic()
        if converged(lab):
            break
        if time.monotonic() - healed > 120:
            raise TimeoutError("no convergence within 120 s of the heal")
        time.sleep(0.02)
    done = time.monotonic()
    samples["converge_s"].append(done - healed)
    samples["sync_s"].append(done - (session_up or done))
    sent, updates = (after - before for after, before in zip(sent_totals(lab), (sent_before, updates_before)))
    samples["bytes_sent_kb"].append(sent / 1024)
    samples["minimal_deltas_kb"].append(minimal / 1024)
    samples["bytes_vs_minimal"].append(sent / minimal)
    samples["updates_vs_minimal"].append(updates / minimal)
    conflicts = [e for e in lab.call("a-1", "events", follow=False) if e["kind"] == "conflict"]
    assert len(conflicts) >= min(SHARED_APPS, count // 10), "every shared app should end in a conflict"


def idle(lab: Lab, seconds: float, samples: dict[str, list[float]]) -> None:
    wait_for(lambda: converged(lab), 60, what="agreement")
    time.sleep(2.0)

    before = sent_between(lab)
    time.sleep(seconds)
    samples["idle_bytes_per_min_per_site"].append((sent_between(lab) - before) / 2 / (seconds / 60))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--changes", type=int, default=10_000)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--json", default="bench-results/sites_sync.json")
    args = parser.parse_args(argv)
    require_lab()
    samples: dict[str, list[float]] = {k: [] for k in TARGETS}
    with tempfile.TemporaryDirectory(prefix="mb-", dir="/tmp") as root:  # short: admin socket paths
        runs = [("run", i) for i in range(args.runs)] + ([("idle", 0)] if args.idle_seconds > 0 else [])
        for kind, i in runs:
            args_of = FAST_SYNC if kind == "run" else ()
            with showing_logs(Lab(Path(root) / f"{kind}{i}", {"a": 1, "b": 1}, meshd_args=args_of, seed=i).build()) \
                    as lab:
                start_two_sites(lab)
                if kind == "run":
                    one_run(lab, args.changes, samples)
                else:
                    idle(lab, args.idle_seconds, samples)
            print(f"{kind} {i + 1} done", file=sys.stderr)
    report("sites_sync", args.json, args.runs, samples, TARGETS, changes_per_side=args.changes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
