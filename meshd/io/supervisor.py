"""Runs this node's allocations as OS processes, restarts them per policy, reports their state.

Each allocation gets a task that loops: start the command, copy its output into
`<data_dir>/allocs/<alloc_id>/output.log`, wait for it to exit or to be stopped, then ask
`meshd.restart` whether and when to start it again.

Invariants:
- Every workload runs in its own session and process group (`start_new_session=True`) with
  stdin on /dev/null and stdout+stderr on one pipe, so the log keeps their order as written,
  in its allocation's directory, with a clean environment (`workload_env`): nothing of the
  daemon's own reaches it.
- Stopping a workload means: SIGTERM to its whole process group (and to descendants that
  left the group while the workload was still alive), then SIGKILL to all of them once
  `stop_timeout` has passed. The same happens to processes a workload leaves behind when
  it exits on its own, so no restart ever piles up orphans or keeps the log pipe open.
  With cgroups (meshd.io.cgroups), every process of the workload is in its allocation's
  group from before it execs, limited by its `[app.resources]`, and whatever is left in the
  group when it ends (a descendant that double-forked into a new session) is killed too.
- A memory kill (the group's oom_kill counter moved during the run) ends the run as
  `oom-killed`: its reason, the restart reason and the lifecycle line say so.
- Cancelling `run()` stops workloads the same graceful way (shielded, bounded by
  `stop_timeout` plus PIPE_DRAIN_TIMEOUT), like `trio.run_process` does; `stop_all()` is
  the explicit form.
- An allocation id names a directory: only [A-Za-z0-9._-], never "." or "..". Once an
  allocation reached a final state (failed / stopped) it is never started again by this
  supervisor: allocation ids are not reused, a new run is a new allocation.
- `on_change()` is called synchronously after every change of any report, never while a
  report is half-updated.
- Lifecycle lines in the log are single JSON objects, each on its own line. Every line of
  the workload's own output starts with the time meshd read it (ISO 8601, milliseconds,
  local offset) and a space (`output_stamped`), so a line that starts with "{" is always
  meshd's, whatever the workload prints.
"""

from __future__ import annotations

import collections
import ctypes
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Protocol

import psutil
import trio

from meshd.io.logfiles import RotatingLog, iso_time
from meshd.node.effects import Workload
from meshd.restart import (
    BACKOFF_BASE,
    BACKOFF_CAP,
    STABLE_UPTIME,
    decide_restart,
    describe_exit,
    policy_problem,
)
from meshd.artifacts.use import with_artifacts
from meshd.health import HealthWatch
from meshd.io import cgroups
from meshd.io.artifactstore import ArtifactWait
from meshd.io.devices import DeviceError, DeviceSet, device_env
from meshd.io.healthcheck import run_check
from meshd.usage import CpuSampler
from meshd.state import ALLOC_FAILED, ALLOC_PENDING, ALLOC_RUNNING, ALLOC_STOPPED, HEALTH_NONE, ArtifactRef

# Reports of finished allocations kept after they were final: enough for the daemon to push
# every final state even after a mass stop, small enough to bound memory on a small device.
MAX_FINISHED_REPORTS = 1000
# One path component of reasonable length; sitestate caps ids at 64, this is only a guard.
_ALLOC_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# How often a stopping workload's processes are looked at: short next to any stop_timeout,
# long enough that scanning /proc costs nothing noticeable.
GROUP_POLL_INTERVAL = 0.05
# Output still in the pipe once every writer died is read in microseconds; this bound only
# matters when a process that escaped the group keeps the pipe open.
PIPE_DRAIN_TIMEOUT = 1.0
# Pipe read size: a burst of output is copied in a few steps without holding the loop long.
PIPE_CHUNK = 64 * 1024

# Every report reaches the site as a Raft entry: a fetch's progress goes at most this often
# (a change of what it waits for goes at once).
REASON_REPORT_PERIOD = 3.0
_DIGITS = re.compile(r"\d+")

REASON_WAITING = "waiting to start"
REASON_REMOVED = "no longer assigned to this node"
REASON_SHUTDOWN = "meshd is shutting down"
REASON_NOT_STARTED = "not started: meshd is shutting down"


# What to run for one allocation: the node core's Workload (meshd.node.effects), one type.
DesiredAlloc = Workload


class ArtifactProvider(Protocol):
    """Where workloads' artifacts come from (meshd.io.services.artifacts)."""

    async def ready(self, refs: tuple[ArtifactRef, ...], on_reason: Callable[[str], None]) -> dict[str, str]:
        """Each artifact's path by name once all are on the node; ArtifactWait when one
        cannot be given."""


@dataclass(frozen=True)
class AllocReport:
    alloc_id: str
    state: str  # meshd.state ALLOC_*: pending | running | failed | stopped
    pid: int | None
    restarts: int  # restarts since this supervisor first started the allocation
    exit_code: int | None  # of the last exit (negative: killed by that signal)
    reason: str
    # Ended because meshd stopped it (told to, or shutting down), not by its own exit: the
    # site must not count such a replica as having run its course.
    stopped_by_meshd: bool = False
    health: str = HEALTH_NONE  # meshd.state HEALTH_*: none unless running


def alloc_id_problem(alloc_id: str) -> str | None:
    """Why `alloc_id` cannot name an allocation directory, or None when it can."""
    if _ALLOC_ID.fullmatch(alloc_id) and alloc_id not in (".", ".."):
        return None
    return f"invalid allocation id {alloc_id!r}: use 1-128 of A-Z a-z 0-9 . _ - (not starting with . _ -)"



# What a workload's environment holds besides its spec's `env` and the MESHD_* ids: the search
# path systemd gives a service, a UTF-8 locale, and its own directory as HOME. Nothing of the
# daemon's environment (its secrets, its service manager's sockets) reaches it.
WORKLOAD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
WORKLOAD_LANG = "C.UTF-8"


def workload_env(spec: DesiredAlloc, home: Path | str) -> dict[str, str]:
    """A clean environment: PATH, LANG and HOME (its allocation directory), then the app's
    env (which may set those three), then the ids (the allocation, the app, the site), which
    nothing overrides."""
    env = {"PATH": WORKLOAD_PATH, "LANG": WORKLOAD_LANG, "HOME": str(home)}
    env.update({key: value for key, value in spec.env.items() if not key.startswith("MESHD_")})
    env["MESHD_ALLOC_ID"] = spec.alloc_id
    env["MESHD_APP"] = spec.app
    if spec.site:
        env["MESHD_SITE"] = spec.site
    return env


def _live_processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every process that has not exited (Linux /proc)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as file:
                stat = file.read()
        except OSError:  # exited while we looked
            continue
        # "pid (comm) state ppid pgrp ...": comm may contain anything, so split after ")"
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) < 3 or fields[0] in (b"Z", b"X"):  # zombies already exited
            continue
        found[int(entry)] = (int(fields[1]), int(fields[2]))
    return found


# A scan of /proc costs ~10 us per process. With every stopping workload scanning on its own,
# a mass stop was quadratic (10,000 sleepers: over a minute of event loop at shutdown). So a
# scan serves every caller that can use it: one that needs the processes as they were at some
# moment (a workload's members when its stop was decided, before any signal) takes a scan
# made after that moment; a stop's poll takes one no older than this (its own poll period).
PROCESS_TABLE_TTL = GROUP_POLL_INTERVAL


class _ProcessTable:
    """The live processes, by parent and by process group, as one scan of /proc saw them."""

    def __init__(self) -> None:
        self.taken_at = time.monotonic()
        self.processes = _live_processes()
        self.children: dict[int, list[int]] = collections.defaultdict(list)
        self.groups: dict[int, list[int]] = collections.defaultdict(list)
        for pid, (ppid, pgrp) in self.processes.items():
            self.children[ppid].append(pid)
            self.groups[pgrp].append(pid)


_table: _ProcessTable | None = None


def _process_table(not_before: float) -> _ProcessTable:
    global _table
    if _table is None or _table.taken_at < not_before:
        _table = _ProcessTable()
    return _table


def workload_processes(leader: int, not_before: float | None = None) -> set[int]:
    """Live processes of the workload whose first process is `leader`: its process group plus
    any still-attached descendant that moved to another group or session, as a scan of /proc
    made after `not_before` (time.monotonic(); default: PROCESS_TABLE_TTL ago) saw them."""
    table = _process_table(time.monotonic() - PROCESS_TABLE_TTL if not_before is None else not_before)
    members = set(table.groups.get(leader, ()))
    todo = [leader] if leader in table.processes else []
    while todo:
        pid = todo.pop()
        members.add(pid)
        todo.extend(child for child in table.children.get(pid, ()) if child not in members)
    return members


def _signal_workload(leader: int, extra: Iterable[int], signum: int) -> None:
    """Send `signum` to the process group `leader` leads and to `extra` processes."""
    try:
        os.killpg(leader, signum)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in extra:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


# Each running workload's process group id is written here, so that a daemon that died
# without stopping its workloads (SIGKILL, power cut of the daemon only) can end them on its
# next start instead of running every replica twice.
PGID_FILE = "pgid"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_daemon() -> None:
    """In the child before exec: get SIGKILL if the daemon dies (Linux); best effort elsewhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class _WorkloadProcess:
    """A workload's first process, started from the daemon's trio thread, with its exit and
    its output pipe as trio objects.

    Why not `trio.lowlevel.open_process`: it forks on a worker thread, and Linux sends the
    PDEATHSIG when the *thread* that forked exits, not the process. Trio's idle worker threads
    exit after 10 s, so every workload started that way would be SIGKILLed about 10 s after
    the daemon last used a worker thread. Forked from the trio thread, which lives as long as
    the daemon, the signal means what it should: the daemon is gone. (The fork blocks the
    loop for about a millisecond.)
    """

    def __init__(self, command: list[str], env: dict[str, str], cwd: Path, join: tuple[str, ...] = (),
                 user: tuple[int, int] | None = None) -> None:
        """`join`: the cgroup.procs files the child writes itself into before it execs;
        `user`: (uid, gid) it becomes then, after joining (which needs the daemon's rights)."""
        read_end, write_end = os.pipe()

        def before_exec() -> None:
            _die_with_daemon()
            cgroups.join(join)  # an error here fails the start: never unconfined
            if user is not None:  # last: nothing it does from here has the daemon's rights
                os.setgroups([user[1]])
                os.setgid(user[1])
                os.setuid(user[0])

        try:
            self._popen = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=write_end, stderr=subprocess.STDOUT,
                env=env, cwd=cwd, start_new_session=True, preexec_fn=before_exec)
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        self.stdout = trio.lowlevel.FdStream(read_end)  # owns the fd from here on
        self.pid = self._popen.pid
        try:
            self._exit_fd: int | None = os.pidfd_open(self.pid)  # readable once it exits
        except (AttributeError, OSError):  # no pidfd here (old kernel): poll instead
            self._exit_fd = None

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    def poll(self) -> int | None:
        return self._popen.poll()

    async def wait(self) -> int:
        if self._exit_fd is not None and self.poll() is None:
            await trio.lowlevel.wait_readable(self._exit_fd)
        while self.poll() is None:  # the fallback, or a pidfd readable a moment early
            await trio.sleep(GROUP_POLL_INTERVAL)
        self._close_exit_fd()
        assert self.returncode is not None
        return self.returncode

    def _close_exit_fd(self) -> None:
        if self._exit_fd is not None:
            trio.lowlevel.notify_closing(self._exit_fd)
            os.close(self._exit_fd)
            self._exit_fd = None


class UserError(Exception):
    """The user a workload must run as cannot be had here; the message says why."""


def _own_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _process_tree_usage(pid: int) -> tuple[int | None, int | None]:
    """(CPU microseconds, resident bytes) of a process and its live descendants."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None, None
    usec = memory = 0
    for proc in procs:
        try:
            times, info = proc.cpu_times(), proc.memory_info()
        except psutil.Error:
            continue
        usec += int((times.user + times.system) * 1e6)
        memory += info.rss
    return usec, memory


def remove_dirs(paths: Iterable[Path]) -> None:
    """Blocking: remove allocation directories (`Supervisor.forget` chose them)."""
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def kill_leftover_workloads(data_dir: Path) -> list[int]:
    """Kill the process groups recorded by an earlier run of the daemon; returns their ids."""
    killed = []
    for pgid_file in sorted((Path(data_dir) / "allocs").glob(f"*/{PGID_FILE}")):
        try:
            pgid = int(pgid_file.read_text().strip())
            if pgid > 1:
                os.killpg(pgid, signal.SIGKILL)
                killed.append(pgid)
        except (ValueError, OSError):
            pass
        pgid_file.unlink(missing_ok=True)
    return killed


class _Slot:
    """Mutable bookkeeping of one allocation; only its own task and set_desired touch it."""

    def __init__(self, spec: DesiredAlloc, report: AllocReport) -> None:
        self.spec = spec
        self.next_spec: DesiredAlloc | None = None  # set when the spec changed while it ran
        self.report = report
        self.stop_reason: str | None = None  # set once: the allocation must end
        self.stop_decided_at: float | None = None  # time.monotonic() when stop_reason was set
        self.wake = trio.Event()  # set when stop_reason or next_spec was set
        self.done = trio.Event()  # set when its task has finished
        self.log: RotatingLog | None = None
        self.mid_line = False  # the log's last byte is not a newline
        self.backoff_count = 0
        self.group: cgroups.Group | None = None  # its cgroup, once made (kept across restarts)
        self.group_since = time.monotonic()  # when the CPU time its group (or process) counts began
        self.user: tuple[int, int] | None = None  # (uid, gid) its current run has (None: the daemon's)
        self.final_seen = False  # it reached its final state
        self.reason_at = 0.0  # time.monotonic() its pending reason was last reported

    @property
    def report(self) -> AllocReport:
        return self._report

    @report.setter
    def report(self, report: AllocReport) -> None:
        self._report = report
        # As a dict, made once per report (what meshd.reporting takes): a node running
        # thousands of workloads looks at all of them every few seconds.
        self.plain_report = asdict(report)

    @property
    def interrupted(self) -> bool:
        return self.stop_reason is not None or self.next_spec is not None

    @property
    def final(self) -> bool:
        return self.report.state in (ALLOC_FAILED, ALLOC_STOPPED)


@dataclass(frozen=True)
class _Exit:
    exit_code: int | None
    uptime: float
    cause: str | None = None  # why there is no exit code, or what it does not say (oom-killed)
    unhealthy: str | None = None  # ended by meshd because its health checks failed (why)


def output_stamped(data: bytes, mid_line: bool, now: float) -> bytes:
    """`data` with the time `now` put at the start of every line it starts (the first
    one too, unless the log is `mid_line`: in the middle of a line the workload began)."""
    if not data:
        return data
    stamp = iso_time(now).encode() + b" "
    lines = data.split(b"\n")
    out = [lines[0] if mid_line else stamp + lines[0]]
    out += [stamp + line for line in lines[1:-1]]
    if len(lines) > 1:
        out.append(stamp + lines[-1] if lines[-1] else b"")
    return b"\n".join(out)


def output_log(data_dir: Path, alloc_id: str) -> Path:
    """Where an allocation's output goes: <data_dir>/allocs/<alloc_id>/output.log;
    ValueError (with the reason) for a bad id."""
    problem = alloc_id_problem(alloc_id)
    if problem is not None:
        raise ValueError(problem)
    return data_dir / "allocs" / alloc_id / "output.log"


class Supervisor:
    def __init__(
        self,
        data_dir: Path,
        on_change: Callable[[], None],
        log_max_bytes: int = 1 << 20,
        log_keep: int = 3,
        stop_timeout: float = 5.0,
        *,
        backoff_base: float = BACKOFF_BASE,
        backoff_cap: float = BACKOFF_CAP,
        stable_uptime: float = STABLE_UPTIME,
        workload_user: str | None = None,
        limits: cgroups.Cgroups | None = None,
        devices: DeviceSet | None = None,
        artifacts: "ArtifactProvider | None" = None,
    ) -> None:
        """`limits`: this node's cgroup subtree, opened (None: workloads run unconfined, and
        one that asks for limits fails to start)."""
        self.workload_user = workload_user  # who a spec that names nobody runs as (None: the daemon's user)
        self.artifacts = artifacts  # where a workload's artifacts come from (None: one that needs any cannot start)
        self.limits = limits
        self.devices = devices if devices is not None else DeviceSet([])  # which allocation holds which
        self.data_dir = Path(data_dir)
        self.on_change = on_change
        self.log_max_bytes = log_max_bytes
        self.log_keep = log_keep
        self.stop_timeout = stop_timeout
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.stable_uptime = stable_uptime
        self._slots: dict[str, _Slot] = {}
        self._finished: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._desired_ids: set[str] = set()
        self._nursery: trio.Nursery | None = None
        self._unlaunched: list[_Slot] = []
        self._closed = False
        # What happened since this supervisor started, for the metrics (meshd.io.metrics):
        # "starts", "restarts", "oom_kills", "health_passed", "health_failed". Only ever incremented.
        self.counts: collections.Counter[str] = collections.Counter()
        self._cpu = CpuSampler()  # CPU % between `usage` readings

    # --- public API ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Supervise until cancelled; cancelling it stops every workload gracefully."""
        if self._nursery is not None:
            raise RuntimeError("this supervisor is already running")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    kill_leftover_workloads(self.data_dir)
                    if self.limits is not None:
                        self.limits.sweep()
                    for slot in self._unlaunched:
                        nursery.start_soon(self._supervise, slot)
                    self._unlaunched.clear()
                    task_status.started()
                    await trio.sleep_forever()
                finally:
                    self._nursery = None
        finally:
            if self.limits is not None:  # every workload has ended: their groups are gone
                self.limits.close()  # (what is still busy stays for the next start's sweep)

    def set_desired(self, allocs: Iterable[DesiredAlloc]) -> None:
        """Run exactly `allocs` from now on: start new ones, stop ones no longer listed.

        An allocation already known keeps running; if its spec changed it is stopped and
        started again with the new one (not counted as a restart). Allocations that already
        reached a final state stay there.
        """
        wanted = {alloc.alloc_id: alloc for alloc in allocs}
        self._desired_ids = set(wanted)
        for alloc_id, slot in list(self._slots.items()):
            if alloc_id not in wanted and not slot.final and slot.stop_reason is None:
                self._request_stop(slot, REASON_REMOVED)
        for alloc_id, spec in wanted.items():
            slot = self._slots.get(alloc_id)
            if slot is None:
                self._add(spec)
            elif not slot.final and slot.stop_reason is None and spec != (slot.next_spec or slot.spec):
                slot.next_spec = spec
                slot.wake.set()
        self._prune()

    def reports(self) -> list[AllocReport]:
        return [slot.report for slot in self._slots.values()]

    def usage(self) -> list[dict]:
        """What each live allocation uses now (`meshctl top`): from its cgroup's own counters,
        or, without cgroups, from its live processes (the time of exited ones is not seen)."""
        now = time.monotonic()
        rows = []
        for slot in self._slots.values():
            report = slot.report
            if report.state not in (ALLOC_RUNNING, ALLOC_PENDING) or slot.final_seen:
                continue
            usec, memory = None, None
            if slot.group is not None:
                usec, memory = slot.group.cpu_usec(), slot.group.memory_bytes()
            elif report.pid is not None:
                usec, memory = _process_tree_usage(report.pid)
            limits = slot.spec.limits
            rows.append({"alloc_id": slot.spec.alloc_id, "app": slot.spec.app, "state": report.state,
                         "pid": report.pid, "restarts": report.restarts,
                         "cpu_percent": self._cpu.percent(slot.spec.alloc_id, usec, now, slot.group_since),
                         "cpu_limit": limits.cpu or None,
                         "memory_mb": round(memory / 2**20, 1) if memory is not None else None,
                         "memory_limit_mb": limits.memory_mb or None, "pids_limit": limits.pids or None})
        self._cpu.forget_older_than(now)
        return rows

    def plain_reports(self) -> list[dict]:
        """The reports as plain dicts (what meshd.reporting takes)."""
        return [slot.plain_report for slot in self._slots.values()]

    def allocation_dirs(self) -> frozenset[str]:
        """The allocation directories on disk (an earlier run's included)."""
        root = self.data_dir / "allocs"
        try:
            return frozenset(p.name for p in root.iterdir() if p.is_dir() and alloc_id_problem(p.name) is None)
        except OSError:
            return frozenset()

    def forget(self, alloc_ids: Iterable[str]) -> list[Path]:
        """Forget allocations the site forgot: their reports go, and their directories (logs)
        are returned for the caller to remove (`remove_dirs`, off the trio thread). One still
        running here, or an id that names no allocation directory, is left alone."""
        dirs = []
        for alloc_id in alloc_ids:
            slot = self._slots.get(alloc_id)
            if alloc_id_problem(alloc_id) is not None or (slot is not None and not slot.final) \
                    or alloc_id in self._desired_ids:
                continue
            if slot is not None:
                del self._slots[alloc_id]
                self._finished.pop(alloc_id, None)
            dirs.append(self.data_dir / "allocs" / alloc_id)
        return dirs

    def log_path(self, alloc_id: str) -> Path:
        """<data_dir>/allocs/<alloc_id>/output.log; ValueError (with the reason) for a bad id."""
        return output_log(self.data_dir, alloc_id)

    async def stop_all(self) -> None:
        """Stop every workload (SIGTERM, then SIGKILL after stop_timeout) and wait for it.

        From now on set_desired starts nothing new.
        """
        self._closed = True
        for slot in list(self._slots.values()):
            if not slot.final and slot.stop_reason is None:
                self._request_stop(slot, REASON_SHUTDOWN)
        for slot in list(self._slots.values()):
            await slot.done.wait()

    # --- bookkeeping -------------------------------------------------------------------

    def _add(self, spec: DesiredAlloc) -> None:
        slot = _Slot(spec, AllocReport(spec.alloc_id, ALLOC_PENDING, None, 0, None, REASON_WAITING))
        self._slots[spec.alloc_id] = slot
        problem = (
            alloc_id_problem(spec.alloc_id)
            or policy_problem(spec.restart_policy)
            or (None if spec.command else "empty command")
        )
        if problem is None and self._closed:
            problem = REASON_NOT_STARTED
        if problem is not None:
            state = ALLOC_STOPPED if problem == REASON_NOT_STARTED else ALLOC_FAILED
            self._finish(slot, state, None, problem)
            slot.done.set()
            return
        self.on_change()
        if self._nursery is None:
            self._unlaunched.append(slot)
        else:
            self._nursery.start_soon(self._supervise, slot)

    def _request_stop(self, slot: _Slot, reason: str) -> None:
        slot.stop_reason = reason
        slot.stop_decided_at = time.monotonic()
        slot.wake.set()
        if slot in self._unlaunched:
            self._unlaunched.remove(slot)
            self._finish(slot, ALLOC_STOPPED, None, reason)
            slot.done.set()
        elif slot.report.state == ALLOC_RUNNING:
            self._report(slot, reason=f"stopping: {reason}")

    def _report(self, slot: _Slot, **changes: object) -> None:
        new = replace(slot.report, **changes)
        if new != slot.report:
            slot.report = new
            self.on_change()

    def _finish(self, slot: _Slot, state: str, exit_code: int | None, reason: str) -> None:
        slot.final_seen = True
        self.devices.release(slot.spec.alloc_id)  # its processes are gone: its devices are free
        self._lifecycle(slot, state, f"{state}: {reason}", exit_code=exit_code)
        if slot.group is not None:
            slot.group.kill_all()
            slot.group.remove()  # (one still busy with a dying process goes at the next start's sweep)
            slot.group = None
        if slot.log is not None:
            slot.log.close()
            slot.log = None
        by_meshd = slot.stop_reason is not None or reason in (REASON_SHUTDOWN, REASON_NOT_STARTED)
        self._report(slot, state=state, pid=None, exit_code=exit_code, reason=reason, stopped_by_meshd=by_meshd,
                     health=HEALTH_NONE)
        self._finished[slot.spec.alloc_id] = None
        self._prune()

    def _prune(self) -> None:
        """Forget the oldest final reports beyond MAX_FINISHED_REPORTS (never a desired one,
        whose report is what keeps it from being started again)."""
        excess = len(self._finished) - MAX_FINISHED_REPORTS
        for alloc_id in list(self._finished):
            if excess <= 0:
                break
            if alloc_id not in self._desired_ids:
                del self._finished[alloc_id]
                del self._slots[alloc_id]
                excess -= 1

    # --- log ---------------------------------------------------------------------------

    def _write_output(self, slot: _Slot, data: bytes) -> None:
        """What the workload printed, each line stamped with the time it was read."""
        self._write_log(slot, output_stamped(data, slot.mid_line, time.time()))

    def _write_log(self, slot: _Slot, data: bytes) -> None:
        if slot.log is None or not data:
            return
        try:
            slot.log.write(data)
        except OSError:
            # disk full or gone: keep the workload running, its output is lost meanwhile
            return
        slot.mid_line = not data.endswith(b"\n")

    def _lifecycle(self, slot: _Slot, event: str, message: str, **fields: object) -> None:
        record = {"ts": round(time.time(), 3), "meshd": event, **fields, "message": f"meshd: {message}"}
        line = json.dumps(record).encode() + b"\n"
        self._write_log(slot, (b"\n" if slot.mid_line else b"") + line)

    # --- one allocation ----------------------------------------------------------------

    async def _supervise(self, slot: _Slot) -> None:
        final: tuple[str, int | None, str] = (ALLOC_STOPPED, None, REASON_SHUTDOWN)
        try:
            try:
                slot.log = RotatingLog(self.log_path(slot.spec.alloc_id), self.log_max_bytes, self.log_keep)
            except OSError as exc:
                final = (ALLOC_FAILED, None, f"cannot open the log: {exc}")
                return
            while True:
                if slot.next_spec is not None:
                    if slot.group is not None and slot.next_spec.limits != slot.spec.limits:
                        slot.group.remove()  # its processes ended: made again with the new limits
                        slot.group = None
                    slot.spec, slot.next_spec = slot.next_spec, None
                    slot.backoff_count = 0
                    slot.wake = trio.Event()
                if slot.stop_reason is not None:
                    final = (ALLOC_STOPPED, slot.report.exit_code, slot.stop_reason)
                    return
                ended = await self._run_once(slot)
                if slot.stop_reason is not None:
                    how = describe_exit(ended.exit_code, ended.cause)
                    final = (ALLOC_STOPPED, ended.exit_code, f"{slot.stop_reason}; {how}")
                    return
                if slot.next_spec is not None:
                    continue
                decision = decide_restart(
                    slot.spec.restart_policy,
                    ended.exit_code,
                    slot.backoff_count,
                    ended.uptime,
                    cause=ended.cause,
                    unhealthy=ended.unhealthy,
                    base=self.backoff_base,
                    cap=self.backoff_cap,
                    stable_after=self.stable_uptime,
                )
                if not decision.restart:
                    assert decision.final_state is not None
                    final = (decision.final_state, ended.exit_code, decision.reason)
                    return
                slot.backoff_count = decision.backoff_count
                self._report(
                    slot, state=ALLOC_PENDING, pid=None, exit_code=ended.exit_code, reason=decision.reason,
                    health=HEALTH_NONE,
                )
                self._lifecycle(
                    slot, "restarting", decision.reason, exit_code=ended.exit_code, delay=decision.delay
                )
                with trio.move_on_after(decision.delay):
                    await slot.wake.wait()
                if not slot.interrupted:
                    self.counts["restarts"] += 1
                    self._report(slot, restarts=slot.report.restarts + 1)
        finally:
            self._finish(slot, *final)
            slot.done.set()

    def _waiting_for(self, slot: _Slot, why: str) -> None:
        """Say why the allocation is still pending; its progress ("fetching model 37 %") at
        most every REASON_REPORT_PERIOD, any other change of reason at once."""
        now = time.monotonic()
        if why == slot.report.reason:
            return
        if _DIGITS.sub("", why) == _DIGITS.sub("", slot.report.reason) and now - slot.reason_at < REASON_REPORT_PERIOD:
            return
        slot.reason_at = now
        self._report(slot, state=ALLOC_PENDING, pid=None, reason=why)

    async def _artifacts_of(self, slot: _Slot) -> dict[str, str] | str | None:
        """Each artifact's path by name once the node holds them all (the allocation stays
        pending meanwhile, with the reason), a reason it cannot start, or None when it was
        told to stop or change first."""
        if self.artifacts is None:
            return "this node serves no artifacts"
        outcome: dict[str, object] = {}
        async with trio.open_nursery() as nursery:
            async def fetch() -> None:
                try:
                    outcome["paths"] = await self.artifacts.ready(slot.spec.artifacts,
                                                                  lambda why: self._waiting_for(slot, why))
                except ArtifactWait as exc:
                    outcome["error"] = str(exc)
                nursery.cancel_scope.cancel()

            async def interrupted() -> None:
                await slot.wake.wait()
                nursery.cancel_scope.cancel()
            nursery.start_soon(fetch)
            nursery.start_soon(interrupted)
        if "paths" in outcome:
            return outcome["paths"]  # type: ignore[return-value]
        return outcome.get("error")  # type: ignore[return-value]

    async def _run_once(self, slot: _Slot) -> _Exit:
        """Start the workload once and return when it has ended, all of its processes too."""
        spec = slot.spec
        assert slot.log is not None
        paths: dict[str, str] = {}
        if spec.artifacts:
            got = await self._artifacts_of(slot)
            if got is None:
                return _Exit(exit_code=None, uptime=0.0, cause="not started: its artifacts were not all on the node")
            if isinstance(got, str):
                cause = f"cannot start it: {got}"
                self._lifecycle(slot, "exec-failed", cause)
                return _Exit(exit_code=None, uptime=0.0, cause=cause)
            paths = got
        try:
            group = self._group(slot)
        except cgroups.CgroupError as exc:
            cause = f"cannot confine it: {exc}"
            self._lifecycle(slot, "exec-failed", cause)
            return _Exit(exit_code=None, uptime=0.0, cause=cause)
        ooms_before = group.oom_kills() if group is not None else 0
        env = workload_env(spec, self.log_path(spec.alloc_id).parent)
        command, env = with_artifacts(spec.command, env, paths) if paths else (list(spec.command), env)
        try:
            user = slot.user = self._user_of(spec, self.log_path(spec.alloc_id).parent)
        except UserError as exc:
            cause = f"cannot start it: {exc}"
            self._lifecycle(slot, "exec-failed", cause)
            return _Exit(exit_code=None, uptime=0.0, cause=cause)
        if spec.limits.devices:
            try:
                env.update(device_env(self.devices.take(spec.alloc_id, spec.limits.devices)))
            except DeviceError as exc:
                cause = f"cannot start it: {exc}"
                self._lifecycle(slot, "exec-failed", cause)
                return _Exit(exit_code=None, uptime=0.0, cause=cause)
        try:
            proc = _WorkloadProcess(command, env, self.log_path(spec.alloc_id).parent,
                                    join=group.join_paths if group is not None else (), user=user)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:  # ValueError: e.g. a NUL byte in an argument
            error = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            cause = f"cannot execute {spec.command[0]!r}: {error}"
            self._lifecycle(slot, "exec-failed", cause)
            return _Exit(exit_code=None, uptime=0.0, cause=cause)
        # no checkpoint before this try: the process is always ended and its pipe closed
        pgid_file = self.log_path(spec.alloc_id).parent / PGID_FILE
        try:
            pgid_file.write_text(str(proc.pid))
            started = trio.current_time()
            watch = HealthWatch(spec.health, started_at=started)
            self.counts["starts"] += 1
            self._report(slot, state=ALLOC_RUNNING, pid=proc.pid, exit_code=None, reason="", health=watch.health)
            self._lifecycle(
                slot, "started", f"started pid {proc.pid}", pid=proc.pid, restarts=slot.report.restarts
            )
            unhealthy = await self._wait_exit_or_interrupt(slot, proc, watch)
            uptime = trio.current_time() - started
        finally:
            with trio.CancelScope(shield=True):
                await self._end_workload(slot, proc)
                if group is not None and group.kill_all():  # what escaped its session: gone too
                    await trio.sleep(GROUP_POLL_INTERVAL)
            pgid_file.unlink(missing_ok=True)
        assert proc.returncode is not None
        if group is not None and group.oom_kills() > ooms_before:
            self.counts["oom_kills"] += 1
            cause = f"oom-killed (memory limit {spec.limits.memory_mb} MiB)"
            self._lifecycle(slot, "oom-killed", cause, exit_code=proc.returncode)
            return _Exit(exit_code=proc.returncode, uptime=uptime, unhealthy=unhealthy, cause=cause)
        return _Exit(exit_code=proc.returncode, uptime=uptime, unhealthy=unhealthy)

    def _user_of(self, spec: DesiredAlloc, directory: Path) -> tuple[int, int] | None:
        """(uid, gid) the workload runs as, its directory made its own; None: as the daemon.
        UserError when that user cannot be had here."""
        name = spec.user or self.workload_user
        if os.geteuid() != 0:
            if spec.user and spec.user != _own_user():
                raise UserError(f"cannot run as {spec.user}: this node's meshd is not root")
            return None  # as the daemon's own user, which is not root
        if name is None or name == "root":  # none configured (a bare supervisor), or asked for by name
            return None
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            how = "the meshd package creates it, or set workload-user" if not spec.user else "app.user names it"
            raise UserError(f"user {name} does not exist on this node ({how})") from None
        try:
            os.chmod(directory.parent, 0o711)  # allocs/: others pass through to their own, list nothing
            os.chown(directory, entry.pw_uid, entry.pw_gid)
        except OSError as e:
            raise UserError(f"cannot give {directory} to {name}: {e.strerror or e}") from None
        return entry.pw_uid, entry.pw_gid

    def _group(self, slot: _Slot) -> cgroups.Group | None:
        """The allocation's cgroup, made on its first start; CgroupError when its limits
        cannot be enforced here."""
        if slot.group is None:
            if self.limits is None:
                if slot.spec.limits.controllers:
                    raise cgroups.CgroupError("this node enforces no limits (no cgroups)")
                return None
            slot.group = self.limits.make(slot.spec.alloc_id, slot.spec.limits)
            slot.group_since = time.monotonic()
        return slot.group

    async def _wait_exit_or_interrupt(self, slot: _Slot, proc: _WorkloadProcess, watch: HealthWatch) -> str | None:
        """Copy output and check health until the first process exits, the allocation is
        interrupted, or it turned unhealthy (the reason, which ends it)."""
        unhealthy: list[str] = []
        async with trio.open_nursery() as nursery:

            async def on_interrupt() -> None:
                await slot.wake.wait()
                nursery.cancel_scope.cancel()

            async def check_health() -> None:
                where = self.log_path(slot.spec.alloc_id).parent
                env = workload_env(slot.spec, where)
                while watch.probes:
                    await trio.sleep(watch.due(trio.current_time()))
                    passed, reason = await run_check(watch.check, where, env, slot.user)
                    self.counts["health_passed" if passed else "health_failed"] += 1
                    verdict = watch.checked(passed, reason, trio.current_time())
                    if verdict.health != slot.report.health:
                        said = f"{verdict.health}: {verdict.reason}" if verdict.reason else verdict.health
                        self._lifecycle(slot, "health", said, health=verdict.health)
                    self._report(slot, health=verdict.health, **({"reason": verdict.reason} if verdict.restart else {}))
                    if verdict.restart:
                        unhealthy.append(verdict.reason)
                        nursery.cancel_scope.cancel()

            nursery.start_soon(self._copy_output, slot, proc)
            nursery.start_soon(on_interrupt)
            nursery.start_soon(check_health)
            await proc.wait()
            nursery.cancel_scope.cancel()
        return unhealthy[0] if unhealthy else None

    async def _copy_output(self, slot: _Slot, proc: _WorkloadProcess) -> None:
        assert proc.stdout is not None
        while data := await proc.stdout.receive_some(PIPE_CHUNK):
            self._write_output(slot, data)

    async def _end_workload(self, slot: _Slot, proc: _WorkloadProcess) -> None:
        """Make sure no process of the workload is left (SIGTERM, then SIGKILL after
        stop_timeout), copy the rest of its output, close the pipe. Runs shielded."""
        assert proc.stdout is not None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._copy_output, slot, proc)
                await self._terminate(slot, proc)
                nursery.cancel_scope.deadline = trio.current_time() + PIPE_DRAIN_TIMEOUT
        finally:
            await proc.stdout.aclose()

    def _copy_ready_output(self, slot: _Slot, proc: _WorkloadProcess) -> None:
        """Copy what is already in the pipe, without waiting, so that a lifecycle line written
        next lands after the output that preceded it."""
        assert proc.stdout is not None
        fd = proc.stdout.fileno()  # trio keeps it non-blocking
        while True:
            try:
                data = os.read(fd, PIPE_CHUNK)
            except OSError:  # BlockingIOError: nothing more waiting right now
                return
            if not data:
                return
            self._write_output(slot, data)

    async def _terminate(self, slot: _Slot, proc: _WorkloadProcess) -> None:
        leader = proc.pid
        # Its members as they were before any signal (a descendant that left the group is
        # found only while its parent lives): a scan made after the stop was decided, which
        # every workload stopped at once shares.
        members = workload_processes(leader, not_before=slot.stop_decided_at or time.monotonic())
        self._copy_ready_output(slot, proc)
        if proc.poll() is None:
            self._lifecycle(slot, "stopping", f"stopping pid {leader}: SIGTERM", pid=leader)
        elif members:
            self._lifecycle(
                slot, "stopping", f"pid {leader} {describe_exit(proc.returncode)}; stopping "
                f"{len(members)} process(es) it left behind: SIGTERM", pid=leader)
        else:
            return
        deadline = trio.current_time() + self.stop_timeout
        _signal_workload(leader, members, signal.SIGTERM)
        while (proc.poll() is None or members) and trio.current_time() < deadline:
            await trio.sleep(GROUP_POLL_INTERVAL)
            members = workload_processes(leader)
        if proc.poll() is None or members:
            self._lifecycle(
                slot, "killing", f"pid {leader} group still running after {self.stop_timeout:g} s: SIGKILL",
                pid=leader)
            _signal_workload(leader, members, signal.SIGKILL)
        await proc.wait()
