"""Containment of workloads with Linux cgroups: each allocation in its own group under a
subtree this daemon owns, with its `[app.resources]` as limits: `cpu` a CPU quota, `memory_mb`
a hard memory limit (swap included where the kernel accounts it), `pids` a process limit.

cgroup v2 where the unified hierarchy has the controllers (Debian 12, Raspberry Pi OS), v1
where only v1 controllers are mounted: found from /proc/self/mounts and /proc/self/cgroup,
never assumed. `Hierarchy` is what was found (pure: `detect` takes the files' text); the
functions below it are the pure rules; `Cgroups` does the file system work.

Invariants:
- The subtree is `<daemon's own group>/meshd/<node key>/<alloc id>` in every hierarchy used,
  so limits nest inside whatever confines the daemon (a systemd unit, a container), and two
  daemons on one host never share a group. On v2 a group with processes cannot hand out
  controllers: there the subtree starts at the root's `meshd/` when the daemon runs in the
  root group, and only where `cgroup.subtree_control` lets it.
- A workload's first process enters its group before it execs (`join_paths`, written by the
  child itself), so nothing it forks is ever outside it; a group that cannot be joined fails
  the start, never runs the workload unconfined.
- Limits are written before any process joins; a limit the node cannot enforce is never
  silently dropped: `enforceable` says what this node can, and placement keeps an app whose
  limits it cannot off the node (meshd.placement.feasible.check_limits).
- A memory kill is known from the group's own oom_kill counter (memory.events on v2,
  memory.oom_control on v1), not guessed from SIGKILL.
- Groups are removed once their processes are gone; at start, groups an earlier run of this
  node left behind are emptied (SIGKILL) and removed (`sweep`).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from meshd.state import ResourceRequest

log = logging.getLogger("meshd.daemon")

CONTROLLERS = ("cpu", "memory", "pids")  # what `[app.resources]` limits
# v1 counts CPU time in its own controller (v2: every group's cpu.stat): used, never limited.
CPU_ACCOUNTING = "cpuacct"
CGROUP_ROOT = "/sys/fs/cgroup"
# The CFS period the CPU quota is a share of: the kernel's default, 100 ms.
CPU_PERIOD_US = 100_000
# The kernel refuses a quota below 1 ms of each period.
MIN_CPU_QUOTA_US = 1_000
SUBTREE = "meshd"  # this program's directory inside the daemon's own group


@dataclass(frozen=True)
class Hierarchy:
    """Where each controller can be used: version 2 (one directory for all) or 1 (a
    directory per controller), each the daemon's own group in it; version 0: none."""

    version: int
    dirs: tuple[tuple[str, str], ...] = ()  # (controller, the daemon's own group's directory)

    @property
    def controllers(self) -> frozenset[str]:
        """The limiting controllers it has (not the CPU accounting of v1)."""
        return frozenset(c for c, _ in self.dirs if c in CONTROLLERS)

    def dir_of(self, controller: str) -> str:
        return dict(self.dirs)[controller]


NO_CGROUPS = Hierarchy(0)


def detect(mounts: str, own: str, v2_controllers: dict[str, str]) -> Hierarchy:
    """The hierarchy to use. `mounts`: /proc/self/mounts; `own`: /proc/self/cgroup;
    `v2_controllers`: for a cgroup2 mount point, the text of its `cgroup.controllers` at the
    daemon's own group's parent level (what a child of its group may have)."""
    own_paths: dict[str, str] = {}  # controller ("" for v2) -> path of the daemon's group
    for line in own.splitlines():
        number, _, rest = line.partition(":")
        names, _, path = rest.partition(":")
        if not number.isdigit():
            continue
        for name in names.split(",") if names else [""]:
            own_paths[name] = path
    v1: dict[str, str] = {}
    v2_mount = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        where, kind, options = fields[1], fields[2], fields[3].split(",")
        if kind == "cgroup2":
            v2_mount = where
        elif kind == "cgroup":
            for controller in CONTROLLERS + (CPU_ACCOUNTING,):
                if controller in options and controller in own_paths and controller not in v1:
                    v1[controller] = _join(where, own_paths[controller])
    if v2_mount is not None and "" in own_paths:
        usable = set(v2_controllers.get(v2_mount, "").split()) & set(CONTROLLERS) - set(v1)
        if usable:
            base = _join(v2_mount, own_paths[""])
            return Hierarchy(2, tuple((c, base) for c in CONTROLLERS if c in usable))
    if any(c in v1 for c in CONTROLLERS):
        return Hierarchy(1, tuple((c, v1[c]) for c in CONTROLLERS + (CPU_ACCOUNTING,) if c in v1))
    return NO_CGROUPS


def _join(mount: str, path: str) -> str:
    return os.path.normpath(mount + "/" + path.lstrip("/"))


def limit_files(version: int, limits: ResourceRequest, present: frozenset[str] = frozenset()) -> list[tuple[str, str, str]]:
    """(controller, file, value) to write, in order, for `limits` on cgroup `version`.
    `present`: optional files the kernel offers (swap accounting), by name."""
    writes: list[tuple[str, str, str]] = []
    if limits.cpu:
        quota = max(MIN_CPU_QUOTA_US, round(limits.cpu * CPU_PERIOD_US))
        if version == 2:
            writes.append(("cpu", "cpu.max", f"{quota} {CPU_PERIOD_US}"))
        else:
            writes += [("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US)), ("cpu", "cpu.cfs_quota_us", str(quota))]
    if limits.memory_mb:
        size = str(limits.memory_mb * 1024 * 1024)
        if version == 2:
            writes.append(("memory", "memory.max", size))
            if "memory.swap.max" in present:  # no swap beyond the limit: it is a memory limit
                writes.append(("memory", "memory.swap.max", "0"))
        else:
            writes.append(("memory", "memory.limit_in_bytes", size))
            if "memory.memsw.limit_in_bytes" in present:  # memory + swap, at most the same
                writes.append(("memory", "memory.memsw.limit_in_bytes", size))
    if limits.pids:
        writes.append(("pids", "pids.max", str(limits.pids)))
    return writes


def cpu_stat_usec(text: str) -> int | None:
    """usage_usec from a v2 cpu.stat."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec" and value.strip().isdigit():
            return int(value)
    return None


def oom_kills(version: int, text: str) -> int:
    """The oom_kill count from memory.events (v2) or memory.oom_control (v1)."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return 0


OOM_FILE = {2: "memory.events", 1: "memory.oom_control"}
PROCS_FILE = "cgroup.procs"


class CgroupError(Exception):
    """A group could not be made or limited; the message says which file and why."""


@dataclass(frozen=True)
class Group:
    """One allocation's group: a directory per hierarchy directory used."""

    version: int
    dirs: tuple[str, ...]  # distinct directories (v2: one)
    memory_dir: str | None  # where its oom_kill counter and memory use are
    cpu_dir: str | None = None  # where its CPU time is counted (v2 cpu.stat, v1 cpuacct.usage)

    @property
    def join_paths(self) -> tuple[str, ...]:
        """The files the workload's first process writes itself into (before exec)."""
        return tuple(os.path.join(d, PROCS_FILE) for d in self.dirs)

    def oom_kills(self) -> int:
        if self.memory_dir is None:
            return 0
        try:
            return oom_kills(self.version, Path(self.memory_dir, OOM_FILE[self.version]).read_text())
        except OSError:
            return 0

    def cpu_usec(self) -> int | None:
        """CPU time its processes used, all of them, the exited ones too (microseconds)."""
        if self.cpu_dir is None:
            return None
        try:
            if self.version == 2:
                return cpu_stat_usec(Path(self.cpu_dir, "cpu.stat").read_text())
            return int(Path(self.cpu_dir, "cpuacct.usage").read_text()) // 1000  # nanoseconds
        except (OSError, ValueError):
            return None

    def memory_bytes(self) -> int | None:
        """Memory its processes use now (the kernel's charge: resident and page cache)."""
        if self.memory_dir is None:
            return None
        try:
            return int(Path(self.memory_dir, "memory.current" if self.version == 2 else "memory.usage_in_bytes")
                       .read_text())
        except (OSError, ValueError):
            return None

    def pids(self) -> set[int]:
        found: set[int] = set()
        for directory in self.dirs:
            try:
                found.update(int(p) for p in Path(directory, PROCS_FILE).read_text().split())
            except (OSError, ValueError):
                pass
        return found

    def kill_all(self) -> int:
        """SIGKILL every process still in the group (a descendant that left the workload's
        session is still here); how many there were."""
        left = self.pids()
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        return len(left)

    def remove(self) -> bool:
        """Remove the group once it is empty; False while processes remain."""
        done = True
        for directory in self.dirs:
            try:
                os.rmdir(directory)
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno != errno.EBUSY:
                    log.warning("cgroup not removed", extra={"cgroup": directory, "reason": e.strerror})
                done = False
        return done


class Cgroups:
    """This daemon's subtree in the hierarchy `detect` found."""

    def __init__(self, hierarchy: Hierarchy, node_key: str) -> None:
        self.hierarchy = hierarchy
        self.node_key = node_key
        self.enforceable: frozenset[str] = frozenset()  # set by `open`
        self.accounting: frozenset[str] = frozenset()  # v1's cpuacct, when it could be made
        self.problem = "" if hierarchy.version else "no cgroup controller is mounted"

    @classmethod
    def found(cls, node_key: str) -> "Cgroups":
        """Detect on this machine."""
        try:
            mounts = Path("/proc/self/mounts").read_text()
            own = Path("/proc/self/cgroup").read_text()
        except OSError:
            return cls(NO_CGROUPS, node_key)
        v2: dict[str, str] = {}
        for line in mounts.splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[2] == "cgroup2":
                v2[fields[1]] = _v2_offered(fields[1], own)
        return cls(detect(mounts, own, v2), node_key)

    def base(self, directory: str) -> str:
        return os.path.join(directory, SUBTREE, self.node_key)

    def open(self) -> None:
        """Make this node's subtree; what it can enforce is what it could make and hand out."""
        able = set()
        for controller, directory in self.hierarchy.dirs:
            base = self.base(directory)
            try:
                os.makedirs(base, exist_ok=True)
                if self.hierarchy.version == 2:
                    _enable_v2(directory, base, controller)
            except OSError as e:
                self.problem = f"cannot use the {controller} cgroup at {base}: {e.strerror or e}"
                log.warning("workload limits of this kind are not enforced here",
                            extra={"controller": controller, "reason": self.problem})
                continue
            able.add(controller)
        self.enforceable = frozenset(able) & frozenset(CONTROLLERS)
        self.accounting = frozenset(able) - frozenset(CONTROLLERS)

    def make(self, alloc_id: str, limits: ResourceRequest) -> Group:
        """The group of one allocation, with its limits written; CgroupError if it cannot be."""
        wanted = limits.controllers
        missing = wanted - self.enforceable
        if missing:
            raise CgroupError(f"this node cannot enforce {', '.join(sorted(missing))} limits "
                              f"({self.problem or 'not offered'})")
        dirs: dict[str, str] = {}
        # A group in every hierarchy it can have, limited or not: each counts what it uses
        # (`meshctl top`) and holds every process of it.
        for controller in sorted(self.enforceable | self.accounting):
            dirs[controller] = os.path.join(self.base(self.hierarchy.dir_of(controller)), alloc_id)
        try:
            for directory in set(dirs.values()):
                os.makedirs(directory, exist_ok=True)
            present = frozenset(name for d in set(dirs.values()) for name in os.listdir(d))
            for controller, name, value in limit_files(self.hierarchy.version, limits, present):
                Path(dirs[controller], name).write_text(value)
        except OSError as e:
            group = Group(self.hierarchy.version, tuple(sorted(set(dirs.values()))), None)
            group.remove()
            raise CgroupError(f"cannot limit the workload's cgroup: {e.strerror or e}") from None
        one = sorted(set(dirs.values()))
        cpu_dir = (one[0] if one else None) if self.hierarchy.version == 2 else dirs.get(CPU_ACCOUNTING)
        return Group(self.hierarchy.version, tuple(one), dirs.get("memory"), cpu_dir)

    def close(self) -> None:
        """Remove this node's subtree where it is empty (the daemon stops; its next start
        makes it again)."""
        for _, directory in self.hierarchy.dirs:
            try:
                os.rmdir(self.base(directory))
            except OSError:
                pass

    def sweep(self) -> int:
        """Empty and remove the groups an earlier run of this node left; how many."""
        swept: set[str] = set()
        for _, directory in self.hierarchy.dirs:
            base = Path(self.base(directory))
            if not base.is_dir():
                continue
            for child in base.iterdir():
                if child.is_dir():
                    group = Group(self.hierarchy.version, (str(child),), None)
                    group.kill_all()
                    swept.add(child.name)
                    group.remove()  # removed now, or when the kill landed (on its next use)
        return len(swept)


def _v2_offered(mount: str, own: str) -> str:
    """The controllers a child of the daemon's own v2 group may get: those the group's
    `cgroup.controllers` lists (the root's, when the daemon runs in the root group)."""
    path = next((line.split(":", 2)[2] for line in own.splitlines() if line.startswith("0::")), "/")
    try:
        return Path(_join(mount, path), "cgroup.controllers").read_text()
    except OSError:
        return ""


# On v2 a group that holds processes cannot hand controllers to its children: a daemon in a
# delegated group (systemd's Delegate=) moves itself into this leaf of it first, as systemd
# documents for delegated services.
DAEMON_LEAF = "meshd-daemon"


def _enable_v2(own_dir: str, base: str, controller: str) -> None:
    """Hand `controller` down from the daemon's group to this node's subtree (v2 needs each
    level's cgroup.subtree_control to list it)."""
    level = own_dir
    for part in os.path.relpath(base, own_dir).split(os.sep):
        try:
            Path(level, "cgroup.subtree_control").write_text(f"+{controller}")
        except OSError as e:
            if e.errno != errno.EBUSY or level != own_dir:
                raise
            leaf = os.path.join(own_dir, DAEMON_LEAF)
            os.makedirs(leaf, exist_ok=True)
            for pid in Path(own_dir, PROCS_FILE).read_text().split():  # the daemon, and its threads' group
                Path(leaf, PROCS_FILE).write_text(pid)
            Path(level, "cgroup.subtree_control").write_text(f"+{controller}")
        level = os.path.join(level, part)
    Path(base, "cgroup.subtree_control").write_text(f"+{controller}")


def join(paths: tuple[str, ...]) -> None:
    """In the workload's child process, before exec: move itself into its group."""
    for path in paths:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
