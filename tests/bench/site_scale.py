"""Site scale benchmark: a 3-daemon site takes 1,000 apps x 10 replicas (10,000 allocations)
from 8 concurrent clients, then a new member joins it.

    python3 -m tests.bench.site_scale [--apps 1000] [--replicas 10] [--clients 8]
        [--workload short|sleeper] [--runs 1] [--json bench-results/site_scale.json]
    python3 -m tests.bench.site_scale --apps 100        # a quick run (1,000 allocations)

Each run builds a fresh three-node site on loopback (real `meshd run` processes, joins by
mDNS) and:
- deploys `--apps` apps of `--replicas` replicas each from `--clients` threads at once, each
  talking to the admin socket exactly as `meshctl deploy` does (one `deploy` request, no
  --wait, meshctl's 60 s one-shot deadline); client i uses daemon i mod 3, as clients on
  different devices would. A refused or timed-out request is retried (counted in the JSON);
- `accept_all_s`: first request sent -> the last app accepted;
- `settle_s`: first request sent -> the site's allocations reach their final picture, judged
  on the leader's `allocs`: with `--workload sleeper` (replicas `sleep 3600`) every
  allocation running; with `--workload short` (the default, as the original measurement:
  replicas that run `--short-s` seconds and exit 0 under restart policy on-failure, so every
  replica is started, reported running, exits and is reported stopped) no allocation pending
  or running and the picture unchanged for a quiet window;
- `daemons_exited` (target 0): daemons that are not alive at the end of the run, plus log
  lines saying a loop was wedged (the watchdog's exit) and tracebacks, shown with excerpts;
- the leader's (and every daemon's) CPU % of one core over an idle window after settling
  (target < 3 %), and each daemon's RSS;
- a new member joining: `join_ready_s` its process start -> `ready` in its own `nodes`;
  `join_state_s` -> its own `apps` and `allocs` (through its admin socket) show every app and
  every allocation the leader had; `join_ready_with_state_s` the later of both (target 3 s).
Every phase has a deadline, and the wait ends early once the site lost its quorum or had no
leader for 60 s: a site that wedges or dies is reported as such (the metric is missing, the
run's `problems` say why, with the stalled loop's frames) instead of hanging, and every
process is stopped. `machine_busy_pct` says how busy the whole machine was during the idle
window: on a shared machine, read the CPU figures against it.
Prints a table of medians and writes every sample and problem to JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from meshd.io.adminclient import AdminError, AdminUnavailable, admin_call_sync
from meshd.io.localsite import LocalNode, LocalSite
from tests.bench.report import report

TARGETS = {  # metric -> (target, unit); lower is better for all
    "accept_all_s": (None, "s"),
    "settle_s": (None, "s"),
    "deploy_request_s": (None, "s"),  # one client's deploy request -> its answer (all of them)
    "deploy_retries": (None, "count"),
    "daemons_exited": (0.0, "count"),
    "log_wedged_lines": (None, "count"),
    "log_tracebacks": (None, "count"),
    "leader_idle_cpu_pct": (3.0, "% of a core"),
    "idle_cpu_pct": (None, "% of a core"),  # every daemon of the site, leader included
    "leader_rss_mb": (None, "MB"),
    "rss_mb": (None, "MB"),  # every daemon of the site after settling
    # Context: how busy the whole machine was during the idle window (% of all its cores, the
    # measured daemons included); other load on a shared machine inflates every CPU figure.
    "machine_busy_pct": (None, "% machine"),
    "join_ready_s": (None, "s"),
    "join_state_s": (None, "s"),
    "join_ready_with_state_s": (3.0, "s"),
    "joiner_rss_mb": (None, "MB"),
}

SITE_SIZE = 3  # the site under test: three voters, the smallest that survives a failure
# meshctl's own deadline for a one-shot request (meshd.cli.meshctl.ONE_SHOT_TIMEOUT_S): a
# client gets no more patience than an operator's meshctl would.
REQUEST_TIMEOUT_S = 60.0
# A client retries a refused or timed-out deploy (a leader change, a busy site) this often,
# then gives up on that app and the run reports it; enough to ride out an election or two.
MAX_ATTEMPTS = 5
RETRY_PAUSE_S = 1.0  # between attempts: about a Raft election, not a busy loop
# Polling the leader's `allocs` of 10,000 rows costs it a fraction of a second each time;
# every 2 s keeps that load small next to what is being measured, at 2 s resolution.
SETTLE_POLL_S = 2.0
# Short-lived mode: the picture must stay the same this long to count as settled; it covers
# several report periods, so a report still in flight shows up as a change.
QUIET_S = 10.0
START_TIMEOUT_S = 60.0  # three joins on a quiet machine take about 2 s (one_site); generous
JOIN_POLL_S = 0.1  # the joiner's `allocs` answer takes ~0.1-0.3 s at 10,000 rows: the resolution
JOIN_TIMEOUT_S = 120.0  # 40x the target: long enough to measure a slow join, short enough to end
STOP_TIMEOUT_S = 60.0  # SIGTERM -> exit for a daemon stopping thousands of workloads
# A site whose voters all live elects a leader within seconds (one_site: failover ~1 s); no
# leader for this long (four watchdog stall limits) means it will not recover by itself.
LEADERLESS_LIMIT_S = 60.0
PROGRESS_S = 10.0  # a progress line on stderr this often, so a slow phase is visibly alive


def app_spec(name: str, replicas: int, workload: str, short_s: float) -> str:
    if workload == "sleeper":
        return f'[app]\nname = "{name}"\nreplicas = {replicas}\ncommand = ["sleep", "3600"]\n'
    return (f'[app]\nname = "{name}"\nreplicas = {replicas}\ncommand = ["sleep", "{short_s:g}"]\n'
            f'[app.restart]\npolicy = "on-failure"\n')


def log(msg: str) -> None:
    print(f"[site_scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def call(daemon: LocalNode, cmd: str, /, timeout: float = REQUEST_TIMEOUT_S, **args):
    return admin_call_sync(daemon.socket, cmd, args, timeout=timeout)


def try_call(daemon: LocalNode, cmd: str, /, timeout: float = REQUEST_TIMEOUT_S, **args):
    try:
        return call(daemon, cmd, timeout=timeout, **args)
    except (AdminError, AdminUnavailable, OSError, TimeoutError):
        return None


class Problems:
    """What went wrong in a run, in words, for the table's reader and the JSON."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.dead: set[str] = set()  # daemons whose exit was reported already

    def add(self, text: str) -> None:
        log("PROBLEM: " + text)
        self.items.append(text)


def check_alive(site: LocalSite, problems: Problems) -> bool:
    """True while every started daemon lives; a newly dead one is reported once."""
    ok = True
    for node in site.nodes:
        if node.proc is not None and not node.alive:
            ok = False
            if node.name not in problems.dead:
                problems.dead.add(node.name)
                problems.add(f"{node.name} exited with status {node.proc.returncode}; its log ends:\n"
                             + node.log_text()[-2000:])
    return ok


def deploy_all(site: LocalSite, names: list[str], specs: dict[str, str], clients: int, timeout: float,
               problems: Problems, samples: dict[str, list[float]]) -> float | None:
    """`clients` threads deploy every app; seconds until the last was accepted, or None."""
    todo: queue.Queue[str] = queue.Queue()
    for name in names:
        todo.put(name)
    accepted: dict[str, float] = {}
    latencies: list[float] = []
    retries = [0]
    failures: list[str] = []
    lock = threading.Lock()
    nodes = list(site.nodes)
    stop = threading.Event()
    t0 = time.monotonic()

    def client(i: int) -> None:
        node = nodes[i % len(nodes)]
        while not stop.is_set():
            try:
                name = todo.get_nowait()
            except queue.Empty:
                return
            for attempt in range(MAX_ATTEMPTS):
                if stop.is_set():
                    return
                start = time.monotonic()
                try:
                    result = call(node, "deploy", spec_toml=specs[name], wait=False)
                except (AdminError, AdminUnavailable, OSError, TimeoutError) as exc:
                    with lock:
                        latencies.append(time.monotonic() - start)
                        retries[0] += 1
                        if len(failures) < 20:
                            failures.append(f"{name} via {node.name}, attempt {attempt + 1}: "
                                            f"{type(exc).__name__}: {exc}")
                    if not node.alive:  # its daemon is gone: the operator walks to another device
                        alive = [n for n in nodes if n.alive]
                        if not alive:
                            return
                        node = alive[i % len(alive)]
                    time.sleep(RETRY_PAUSE_S)
                    continue
                done = time.monotonic()
                with lock:
                    latencies.append(done - start)
                    if result.get("accepted"):
                        accepted[name] = done
                break
            else:
                with lock:
                    failures.append(f"{name}: gave up after {MAX_ATTEMPTS} attempts")

    threads = [threading.Thread(target=client, args=(i,), daemon=True, name=f"client-{i}") for i in range(clients)]
    for t in threads:
        t.start()
    deadline = t0 + timeout
    last_progress = t0
    while any(t.is_alive() for t in threads):
        time.sleep(0.2)
        now = time.monotonic()
        if now - last_progress >= PROGRESS_S:
            last_progress = now
            log(f"accepted {len(accepted)}/{len(names)} after {now - t0:.0f} s, retries {retries[0]}")
        check_alive(site, problems)  # keep going on a death: the clients of the survivors may still finish
        if sum(1 for n in nodes if n.alive) <= len(nodes) // 2:
            problems.add(f"quorum lost while deploying: {len(accepted)}/{len(names)} accepted")
            stop.set()
            break
        if now > deadline:
            problems.add(f"deploys not all accepted within {timeout:g} s: {len(accepted)}/{len(names)}")
            stop.set()
            break
    for t in threads:
        t.join(REQUEST_TIMEOUT_S + 1)
    samples["deploy_request_s"].extend(latencies)
    samples["deploy_retries"].append(float(retries[0]))
    for f in failures:
        problems.add("deploy error: " + f)
    if len(accepted) < len(names):
        problems.add(f"only {len(accepted)}/{len(names)} apps accepted")
        return None
    return max(accepted.values()) - t0


def alloc_picture(rows: list[dict], apps: set[str]) -> tuple[dict[str, int], str, set[str]]:
    """Counts by state, a digest of (alloc_id, state) and the alloc ids, of the bench's apps."""
    mine = sorted((r["alloc_id"], r["state"]) for r in rows if r["app"] in apps)
    counts: dict[str, int] = {}
    for _, state in mine:
        counts[state] = counts.get(state, 0) + 1
    digest = hashlib.sha256(repr(mine).encode()).hexdigest()
    return counts, digest, {a for a, _ in mine}


def wait_settled(site: LocalSite, apps: set[str], total: int, workload: str, t0: float, timeout: float,
                 problems: Problems) -> tuple[float | None, set[str]]:
    """Seconds from t0 until the final picture, and the alloc ids then; None on timeout."""
    deadline = time.monotonic() + timeout
    last_digest = None
    changed_at = time.monotonic()
    last_progress = 0.0
    leader_seen = time.monotonic()
    ids: set[str] = set()
    while time.monotonic() < deadline:
        check_alive(site, problems)
        alive = sum(1 for n in site.nodes if n.alive)
        if alive <= len(site.nodes) // 2:
            problems.add(f"quorum lost before the site settled: {alive} of {len(site.nodes)} daemons alive")
            return None, ids
        leader = site.leader()
        rows = try_call(leader, "allocs", app=None, node=None) if leader else None
        now = time.monotonic()
        if rows is not None:
            leader_seen = now
            counts, digest, ids = alloc_picture(rows, apps)
            if digest != last_digest:
                last_digest, changed_at = digest, now
            if now - last_progress >= PROGRESS_S:
                last_progress = now
                log(f"allocs after {now - t0:.0f} s: {dict(sorted(counts.items()))} (of {total})")
            if workload == "sleeper":
                if counts.get("running", 0) >= total:
                    return now - t0, ids
            else:
                unfinished = counts.get("pending", 0) + counts.get("running", 0)
                if sum(counts.values()) >= total and unfinished == 0 and now - changed_at >= QUIET_S:
                    return changed_at - t0, ids
        else:
            if now - leader_seen > LEADERLESS_LIMIT_S:
                problems.add(f"no leader answered for {now - leader_seen:.0f} s: the site is wedged")
                return None, ids
            if now - last_progress >= PROGRESS_S:
                last_progress = now
                log(f"no answer from a leader after {now - t0:.0f} s")
        time.sleep(SETTLE_POLL_S)
    problems.add(f"site not settled within {timeout:g} s; last picture: "
                 f"{dict(sorted(counts.items())) if last_digest else 'no answer'}")
    return None, ids


class MachineBusy:
    """Share of all the machine's cores that were busy (not idle or waiting on I/O) between
    start and stop."""

    def __init__(self) -> None:
        self.before = psutil.cpu_times()

    def stop(self) -> float:
        after = psutil.cpu_times()
        total = sum(after) - sum(self.before)
        idle = (after.idle - self.before.idle) + (getattr(after, "iowait", 0.0) - getattr(self.before, "iowait", 0.0))
        return 100.0 * (total - idle) / total if total > 0 else 0.0


def measure_idle(site: LocalSite, leader: LocalNode | None, window: float,
                 samples: dict[str, list[float]]) -> dict[str, dict]:
    nodes = [n for n in site.nodes if n.alive]
    procs = {n.name: psutil.Process(n.proc.pid) for n in nodes}
    before = {name: p.cpu_times() for name, p in procs.items()}
    busy = MachineBusy()
    time.sleep(window)
    samples["machine_busy_pct"].append(busy.stop())
    per_node = {}
    for name, p in procs.items():
        try:
            a, b = p.cpu_times(), before[name]
            cpu = 100.0 * ((a.user + a.system) - (b.user + b.system)) / window
            rss = p.memory_info().rss / 1e6
        except psutil.NoSuchProcess:
            continue
        per_node[name] = {"cpu_pct": round(cpu, 3), "rss_mb": round(rss, 1),
                          "role": "leader" if leader is not None and name == leader.name else "other"}
        samples["idle_cpu_pct"].append(cpu)
        samples["rss_mb"].append(rss)
        if leader is not None and name == leader.name:
            samples["leader_idle_cpu_pct"].append(cpu)
            samples["leader_rss_mb"].append(rss)
    return per_node


def measure_join(site: LocalSite, apps: set[str], ids: set[str], problems: Problems,
                 samples: dict[str, list[float]]) -> dict:
    token = site.token()
    node = site.add_node()
    t0 = time.monotonic()
    node.start(join=token)
    ready_at = state_at = None
    last: dict = {}
    deadline = t0 + JOIN_TIMEOUT_S
    while time.monotonic() < deadline and (ready_at is None or state_at is None):
        if not node.alive:
            problems.dead.add(node.name)
            problems.add(f"joiner {node.name} exited with status {node.proc.returncode}; its log ends:\n"
                         + node.log_text()[-2000:])
            break
        if ready_at is None:
            rows = try_call(node, "nodes", timeout=5.0, site=None) or []
            if any(r["name"] == node.name and r["state"] == "ready" for r in rows):
                ready_at = time.monotonic()
        if state_at is None:
            app_rows = try_call(node, "apps", timeout=10.0)
            alloc_rows = try_call(node, "allocs", timeout=10.0, app=None, node=None) if app_rows else None
            if app_rows is not None and alloc_rows is not None:
                have_apps = {r["app"] for r in app_rows} & apps
                have_ids = {r["alloc_id"] for r in alloc_rows} & ids
                last = {"apps": len(have_apps), "allocs": len(have_ids)}
                if len(have_apps) == len(apps) and len(have_ids) == len(ids):
                    state_at = time.monotonic()
        time.sleep(JOIN_POLL_S)
    result = {"joiner": node.name, "last_seen": last, "expected": {"apps": len(apps), "allocs": len(ids)}}
    if ready_at is not None:
        samples["join_ready_s"].append(ready_at - t0)
    if state_at is not None:
        samples["join_state_s"].append(state_at - t0)
    if ready_at is not None and state_at is not None:
        samples["join_ready_with_state_s"].append(max(ready_at, state_at) - t0)
    else:
        problems.add(f"joiner {node.name} not ready with the whole state within {JOIN_TIMEOUT_S:g} s "
                     f"(ready: {ready_at is not None}; it showed {last} of {result['expected']})")
    if node.alive:
        samples["joiner_rss_mb"].append(psutil.Process(node.proc.pid).memory_info().rss / 1e6)
    return result


def main_thread_stack(text: str, frames: int = 8) -> str:
    """The innermost frames of the main (trio) thread in the watchdog's last stack dump: what
    the loop was doing when it stalled."""
    dumps = text.split("(most recent call first):")
    for block in reversed(dumps[1:]):
        lines = [ln for ln in block.splitlines() if ln.startswith("  File ")]
        if any("_run_module_as_main" in ln for ln in lines):
            return "main thread, innermost first:\n" + "\n".join(lines[:frames])
    return "(no stack dump of the main thread)"


def scan_logs(site: LocalSite, problems: Problems, samples: dict[str, list[float]]) -> None:
    wedged = tracebacks = 0
    for node in site.nodes:
        text = node.log_text()
        lines = text.splitlines()
        w = [ln for ln in lines if "wedged" in ln]
        t = text.count("Traceback (most recent call last)")
        wedged += len(w)
        tracebacks += t
        if w:
            problems.add(f"{node.name} log says wedged: {w[0][:500]}\n" + main_thread_stack(text))
        if t:
            at = text.find("Traceback (most recent call last)")
            problems.add(f"{node.name} log has {t} traceback(s), the first:\n{text[max(0, at - 300):at + 1500]}")
        errors = [ln for ln in lines if '"level": "error"' in ln or '"level": "critical"' in ln]
        if errors:
            problems.add(f"{node.name} logged {len(errors)} error line(s), the first: {errors[0][:600]}")
    samples["log_wedged_lines"].append(float(wedged))
    samples["log_tracebacks"].append(float(tracebacks))


def one_run(site: LocalSite, args: argparse.Namespace, samples: dict[str, list[float]], run: int,
            problems: Problems) -> dict:
    names = [f"app-{run}-{i:04d}" for i in range(args.apps)]
    specs = {n: app_spec(n, args.replicas, args.workload, args.short_s) for n in names}
    total = args.apps * args.replicas
    info: dict = {}
    log(f"starting a {SITE_SIZE}-daemon site")
    site.start(SITE_SIZE, timeout=START_TIMEOUT_S)
    started = list(site.nodes)
    log(f"deploying {args.apps} apps x {args.replicas} replicas ({args.workload}) from {args.clients} clients")
    t0 = time.monotonic()
    accept = deploy_all(site, names, specs, args.clients, args.accept_timeout, problems, samples)
    if accept is not None:
        samples["accept_all_s"].append(accept)
        log(f"all accepted after {accept:.1f} s")
    remaining = max(0.0, args.settle_timeout - (time.monotonic() - t0))
    settle, ids = wait_settled(site, set(names), total, args.workload, t0, remaining, problems)
    info["settled"] = settle is not None
    if settle is not None:
        samples["settle_s"].append(settle)
        log(f"settled after {settle:.1f} s")
    leader = site.leader()
    info["leader"] = leader.name if leader else None
    if leader is None:
        problems.add("no leader after the deploys")
    if sum(1 for n in started if n.alive) <= len(started) // 2:  # no idling to measure, nothing to join
        problems.add("no idle window and no join: the site lost its quorum")
        return info
    log(f"idle window of {args.idle_window:g} s")
    info["idle"] = measure_idle(site, leader, args.idle_window, samples)
    if ids:
        log("a new member joins")
        info["join"] = measure_join(site, set(names), ids, problems, samples)
    check_alive(site, problems)
    return info


def stop_site(site: LocalSite, problems: Problems, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM every daemon still running; one that does not exit 0 on it is a problem."""
    for node in site.nodes:
        if not node.alive:
            node.terminate(timeout)  # reaps leftover workloads of a dead daemon
            continue
        t0 = time.monotonic()
        code = node.terminate(timeout)
        if code != 0:
            problems.add(f"{node.name} stopped with status {code} after {time.monotonic() - t0:.1f} s "
                         f"(SIGTERM; SIGKILL after {timeout:g} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--apps", type=int, default=1000)
    parser.add_argument("--replicas", type=int, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workload", choices=("short", "sleeper"), default="short",
                        help="short: replicas exit 0 after --short-s (policy on-failure); sleeper: `sleep 3600`")
    parser.add_argument("--short-s", type=float, default=1.0, help="how long a short-lived replica runs")
    parser.add_argument("--idle-window", type=float, default=20.0,
                        help="CPU window after settling (covers many heartbeat, report and Raft periods)")
    parser.add_argument("--accept-timeout", type=float, default=900.0,
                        help="give up on the deploys after this long (a wedged site)")
    parser.add_argument("--settle-timeout", type=float, default=1200.0,
                        help="give up waiting for the final picture this long after the first deploy")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--json", default="bench-results/site_scale.json")
    args = parser.parse_args(argv)
    samples: dict[str, list[float]] = {k: [] for k in TARGETS}
    runs = []
    # A short root: admin socket paths must fit in 107 bytes.
    with tempfile.TemporaryDirectory(prefix="mb-", dir="/tmp") as root:
        for i in range(args.runs):
            site = LocalSite(Path(root) / f"run{i}", site="bench", prefix=f"s{i}")
            problems = Problems()
            info: dict = {"problems": problems.items}
            interrupted = False
            try:
                info.update(one_run(site, args, samples, i, problems))
            except KeyboardInterrupt:  # Ctrl-C: stop the site, still report what was measured
                problems.add("interrupted")
                interrupted = True
            except Exception as exc:  # a run that could not even start: report it, stop everything
                problems.add(f"run failed: {type(exc).__name__}: {exc}")
                print(site.dump_logs(), file=sys.stderr)
            finally:
                check_alive(site, problems)
                # before the stop: a daemon that died on its own (or wedged and exited) counts
                samples["daemons_exited"].append(float(sum(1 for n in site.nodes
                                                           if n.proc is not None and not n.alive)))
                log("stopping the daemons")
                stop_site(site, problems)
                scan_logs(site, problems, samples)  # after the stop: what stopping logged counts too
                runs.append(info)
            log(f"run {i + 1}/{args.runs} done")
            if interrupted:
                break
    config = {"apps": args.apps, "replicas": args.replicas, "allocations": args.apps * args.replicas,
              "clients": args.clients, "workload": args.workload,
              "workload_command": app_spec("x", 1, args.workload, args.short_s).splitlines()[3],
              "idle_window_s": args.idle_window}
    print(f"site_scale: {args.apps} apps x {args.replicas} replicas ({args.apps * args.replicas} allocations), "
          f"{args.clients} clients, workload {args.workload}")
    report("site_scale", args.json, args.runs, samples, TARGETS, config=config, runs_detail=runs)
    problems = [p for r in runs for p in r.get("problems", [])]
    if problems:
        print(f"\n{len(problems)} problem(s); the first lines of each (all in the JSON):")
        for p in problems:
            print("  - " + p.splitlines()[0][:300])
    if any(samples.get(k) for k in ("join_ready_with_state_s",)):
        print(f"join: {runs[-1].get('join')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
