"""Flood benchmark: a 3-node site while one host holds 2,000 connections to one of the
leader's ports, against the same site with no flood, in the same run.

    python3 -m tests.bench.flood [--runs 3] [--json bench-results/flood.json] [--scenarios raft,peer,...]

Each run builds a fresh three-node site (real `meshd run` processes on loopback) per
scenario: `none` (the baseline), `raft` (the leader's Raft port), `peer` (its peer port:
joins, beats, calls, sync) and `admin` (its admin socket). A flooder process (another
"host": TCP from 127.0.0.2; the admin socket from the same uid as meshctl) opens 2,000
connections that send nothing, and reopens those the daemon closes at up to 500 a second
(a sustained flood, kept below what would just compete for this 2-core machine's CPU).
While the flood holds, it measures:
- status_ms: the leader's `status` over the admin socket (median of 20 calls);
- heard_gap_s: the longest the leader went without hearing a member (its Raft heartbeat
  answer or beat; `status.heard_s_ago`, polled every 50 ms for 5 s): what its lease counts;
- handshake_ms: a TLS handshake with the leader's peer port from the daemons' own address
  (median of HANDSHAKES), what every join, member call and sync starts with;
- join_s: a fourth node's `meshd run --join` -> `ready` in the leader's `nodes`;
- downs: members marked down during the flood (must be 0);
- flood_opened: connections the flooder opened in all (2,000, plus those it reopened);
- rss_growth_mb: the leader's RSS after the flood ended, less before it started.
Scenario `followers` is the slow-reader attack instead: 1,000 `events --follow` streams on the
leader's admin socket that never read a byte.
The table shows each figure per scenario and its ratio to the baseline of the same run
(target: within 2x). Medians over runs; these machines are noisy.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import select
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

from meshd.io.localsite import LocalSite, wait_for
from meshd.io.tls import joiner_context
from meshd.wire import ADMIN_MAX_FRAME, encode_frame
from tests.bench.report import report

SCENARIOS = ("none", "raft", "peer", "admin", "followers")
FLOOD_CONNECTIONS = 2_000
REOPEN_PER_S = 500  # sustained reconnection rate of the flooder (see the module docstring)
FLOOD_SOURCE = "127.0.0.2"  # another host as far as the daemon's per-host limits go
STATUS_CALLS = 20
HANDSHAKES = 10
GAP_WINDOW_S = 5.0
GAP_POLL_S = 0.05
SETTLE_S = 2.0  # the flood's connections are open (and the refused ones refused) before measuring
TARGET_RATIO = 2.0
FOLLOWERS = 1_000  # the slow-reader attack: streams that are never read
FOLLOW_REQUEST = encode_frame({"cmd": "events", "args": {"follow": True}}, max_frame=ADMIN_MAX_FRAME)


def flood(kind: str, address: str | tuple[str, int], count: int, stop, opened) -> None:
    """Hold `count` silent connections to `address`, reopening closed ones at REOPEN_PER_S
    (`opened`: a shared counter of connections opened in all)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 1024), hard))

    def connect() -> socket.socket | None:
        try:
            if kind == "followers":  # `events --follow` that never reads a byte of its stream
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(1.0)
                s.connect(address)
                s.sendall(FOLLOW_REQUEST)
                s.setblocking(False)
            elif kind == "admin":
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setblocking(False)
                s.connect_ex(address)
            else:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.bind((FLOOD_SOURCE, 0))
                s.setblocking(False)
                s.connect_ex(address)
            return s
        except OSError:
            return None

    budget = float(count)  # the first 2,000 at once
    last = time.monotonic()
    poller = select.poll()
    by_fd: dict[int, socket.socket] = {}
    while not stop.is_set():
        now = time.monotonic()
        budget = min(float(count), budget + (now - last) * REOPEN_PER_S)
        last = now
        while len(by_fd) < count and budget >= 1:
            s = connect()
            budget -= 1
            if s is not None:
                by_fd[s.fileno()] = s
                poller.register(s, select.POLLRDHUP if kind == "followers" else select.POLLIN)
                opened.value += 1
        for fd, events in poller.poll(50):
            s = by_fd[fd]
            if kind == "followers":  # never read: only the daemon hanging up counts
                if not events & (select.POLLHUP | select.POLLRDHUP | select.POLLERR):
                    continue
            else:  # a silent client has nothing to read: readable means closed
                try:
                    if s.recv(4096):
                        continue
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    pass
            poller.unregister(fd)
            del by_fd[fd]
            s.close()
        time.sleep(0.01)
    conns = list(by_fd.values())
    for s in conns:
        s.close()


def target_of(kind: str, leader) -> str | tuple[str, int]:
    status = leader.call("status")
    if kind in ("admin", "followers"):
        return leader.socket
    host, _, port = status["raft_address" if kind == "raft" else "address"].rpartition(":")
    return (host, int(port))


def handshake_ms(leader) -> float:
    """One TLS handshake with the leader's peer port, as a joiner makes it, in ms."""
    host, _, port = leader.call("status")["address"].rpartition(":")
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        with joiner_context().wrap_socket(raw):
            pass
    return (time.monotonic() - t0) * 1000


def downs_since(leader, since: float) -> int:
    return sum(1 for e in leader.call("events", follow=False, since=since)
               if e["kind"] == "node" and e.get("state") == "down")


def measure(site: LocalSite, kind: str) -> dict[str, float]:
    site.grow(3)
    leader = site.leader()
    stop = multiprocessing.Event()
    opened = multiprocessing.Value("q", 0)
    flooder = None
    started = time.time()
    process = psutil.Process(leader.proc.pid)
    rss_before = process.memory_info().rss / 1e6
    if kind != "none":
        count = FOLLOWERS if kind == "followers" else FLOOD_CONNECTIONS
        flooder = multiprocessing.Process(target=flood, args=(kind, target_of(kind, leader), count, stop, opened),
                                          daemon=True)
        flooder.start()
    try:
        time.sleep(SETTLE_S)
        latencies = []
        for _ in range(STATUS_CALLS):
            t0 = time.monotonic()
            leader.call("status")
            latencies.append((time.monotonic() - t0) * 1000)
        handshakes = [handshake_ms(leader) for _ in range(HANDSHAKES)]
        gap = 0.0
        end = time.monotonic() + GAP_WINDOW_S
        while time.monotonic() < end:
            heard = leader.call("status").get("heard_s_ago") or {}
            gap = max([gap, *heard.values()])
            time.sleep(GAP_POLL_S)
        token = site.token(via=leader)
        node = site.add_node()
        t0 = time.monotonic()
        node.start(join=token)

        def ready():
            rows = leader.try_call("nodes", site=None) or []
            return any(r["name"] == node.name and r["state"] == "ready" for r in rows)
        wait_for(ready, 60, interval=0.02, what=f"{node.name} ready")
        join = time.monotonic() - t0
        downs = downs_since(leader, started)
        if flooder is not None:
            assert flooder.is_alive(), "the flooder died"
    finally:
        stop.set()
        if flooder is not None:
            flooder.join(10)
            if flooder.is_alive():
                flooder.kill()
    time.sleep(SETTLE_S)  # the daemon has seen the flood's connections close
    rss_growth = process.memory_info().rss / 1e6 - rss_before
    return {"status_ms": statistics.median(latencies), "handshake_ms": statistics.median(handshakes),
            "heard_gap_s": gap, "join_s": join, "downs": float(downs),
            "flood_opened": float(opened.value), "rss_growth_mb": rss_growth}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", default="bench-results/flood.json")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="comma-separated, from: " + ", ".join(SCENARIOS) + " (none, the baseline, always runs)")
    args = parser.parse_args(argv)
    chosen = ["none"] + [k for k in args.scenarios.split(",") if k in SCENARIOS and k != "none"]
    figures = ("status_ms", "handshake_ms", "heard_gap_s", "join_s", "downs", "flood_opened", "rss_growth_mb")
    units = {"status_ms": "ms", "handshake_ms": "ms", "heard_gap_s": "s", "join_s": "s", "downs": "nodes",
             "flood_opened": "conns", "rss_growth_mb": "MB"}
    compared = ("status_ms", "handshake_ms", "heard_gap_s", "join_s")  # against the baseline of the same run
    samples: dict[str, list[float]] = {}
    targets: dict[str, tuple[float | None, str]] = {}
    for kind in chosen:
        for figure in figures:
            targets[f"{figure}/{kind}"] = (None, units[figure])
        if kind != "none":
            # a member marked down in any run is a failure: judged on the worst run, not the median
            targets[f"downs_worst/{kind}"] = (0.0, "nodes")
            for figure in compared:
                targets[f"{figure}_ratio/{kind}"] = (TARGET_RATIO, "x baseline")
    with tempfile.TemporaryDirectory(prefix="mf-", dir="/tmp") as root:
        for i in range(args.runs):
            baseline: dict[str, float] = {}
            for kind in chosen:
                site = LocalSite(Path(root) / f"r{i}{kind}", site="flood", prefix=f"f{i}{kind[0]}")
                try:
                    result = measure(site, kind)
                except Exception:
                    print(site.dump_logs(), file=sys.stderr)
                    raise
                finally:
                    site.close()
                for figure, value in result.items():
                    samples.setdefault(f"{figure}/{kind}", []).append(value)
                if kind == "none":
                    baseline = result
                else:
                    for figure in compared:
                        samples.setdefault(f"{figure}_ratio/{kind}", []).append(result[figure] / baseline[figure])
                    samples[f"downs_worst/{kind}"] = [max(samples[f"downs/{kind}"])]
                print(f"run {i + 1}/{args.runs} {kind}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()),
                      file=sys.stderr)
    report("flood", args.json, args.runs, samples, targets, connections=FLOOD_CONNECTIONS,
           reopen_per_s=REOPEN_PER_S, source=FLOOD_SOURCE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
