"""meshd.io.cgroups: which hierarchy is used, from the files a device really has (v1, v2,
hybrid, none); the limit files written for each version; and, on this machine's real cgroups
(root; this machine has v1 controllers only, v2 mounted empty), a memory hog killed and
counted, a fork bomb held, a CPU hog held near its quota, leftovers swept."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from meshd.io import cgroups
from meshd.state import ResourceRequest

V1_MOUNTS = """\
sysfs /sys sysfs rw,nosuid 0 0
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,relatime,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""
V1_OWN = "4:memory:/system.slice/meshd.service\n3:pids:/system.slice/meshd.service\n2:cpu,cpuacct:/\n0::/x\n"
V2_MOUNTS = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime 0 0\n"
V2_OWN = "0::/system.slice/meshd.service\n"


def test_v1_controllers_are_used_each_in_the_daemons_own_group():
    found = cgroups.detect(V1_MOUNTS, V1_OWN, {"/sys/fs/cgroup/unified": "hugetlb\n"})
    assert found.version == 1 and found.controllers == {"cpu", "memory", "pids"}
    assert dict(found.dirs) == {"cpu": "/sys/fs/cgroup/cpu,cpuacct", "cpuacct": "/sys/fs/cgroup/cpu,cpuacct",
                                "memory": "/sys/fs/cgroup/memory/system.slice/meshd.service",
                                "pids": "/sys/fs/cgroup/pids/system.slice/meshd.service"}


def test_v2_is_used_where_its_controllers_are_offered():
    found = cgroups.detect(V2_MOUNTS, V2_OWN, {"/sys/fs/cgroup": "cpuset cpu io memory hugetlb pids rdma misc\n"})
    assert found.version == 2 and found.controllers == {"cpu", "memory", "pids"}
    assert {d for _, d in found.dirs} == {"/sys/fs/cgroup/system.slice/meshd.service"}


def test_v2_offering_some_controllers_gives_only_those():
    found = cgroups.detect(V2_MOUNTS, V2_OWN, {"/sys/fs/cgroup": "memory pids\n"})
    assert found.version == 2 and found.controllers == {"memory", "pids"}


def test_v2_mounted_empty_beside_v1_controllers_is_v1_as_on_this_ci_machine():
    found = cgroups.detect(V1_MOUNTS, V1_OWN, {"/sys/fs/cgroup/unified": ""})
    assert found.version == 1


def test_no_controllers_is_no_cgroups():
    assert cgroups.detect("proc /proc proc rw 0 0\n", "0::/\n", {}) == cgroups.NO_CGROUPS
    assert cgroups.detect(V2_MOUNTS, V2_OWN, {"/sys/fs/cgroup": ""}) == cgroups.NO_CGROUPS


def test_limit_files_for_each_version():
    limits = ResourceRequest(cpu=0.5, memory_mb=64, pids=20)
    assert cgroups.limit_files(2, limits, frozenset({"memory.swap.max"})) == [
        ("cpu", "cpu.max", "50000 100000"), ("memory", "memory.max", str(64 << 20)),
        ("memory", "memory.swap.max", "0"), ("pids", "pids.max", "20")]
    assert cgroups.limit_files(1, limits, frozenset({"memory.memsw.limit_in_bytes"})) == [
        ("cpu", "cpu.cfs_period_us", "100000"), ("cpu", "cpu.cfs_quota_us", "50000"),
        ("memory", "memory.limit_in_bytes", str(64 << 20)), ("memory", "memory.memsw.limit_in_bytes", str(64 << 20)),
        ("pids", "pids.max", "20")]
    assert cgroups.limit_files(1, ResourceRequest(cpu=0.001)) == [
        ("cpu", "cpu.cfs_period_us", "100000"), ("cpu", "cpu.cfs_quota_us", "1000")]  # the kernel's least
    assert cgroups.limit_files(2, ResourceRequest()) == []


def test_oom_kill_counters_of_both_versions():
    assert cgroups.oom_kills(2, "low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\noom_group_kill 0\n") == 2
    assert cgroups.oom_kills(1, "oom_kill_disable 0\nunder_oom 0\noom_kill 5\n") == 5
    assert cgroups.oom_kills(1, "oom_kill_disable 0\nunder_oom 0\n") == 0  # an old kernel: not counted


# --- this machine's real cgroups ------------------------------------------------------------

def run_in(group, *command, **kwargs):
    return subprocess.Popen(list(command), preexec_fn=lambda: cgroups.join(group.join_paths), **kwargs)


def test_a_memory_hog_is_killed_and_counted(real_cgroups):
    group = real_cgroups.make("hog", ResourceRequest(memory_mb=32))
    proc = run_in(group, sys.executable, "-c", "x = bytearray(256 * 1024 * 1024); print('survived')",
                  stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -9 and b"survived" not in out
    assert group.oom_kills() == 1
    assert group.remove()


def test_a_fork_bomb_is_held_by_its_process_limit(real_cgroups):
    group = real_cgroups.make("bomb", ResourceRequest(pids=16))
    proc = run_in(group, "sh", "-c", "for i in $(seq 200); do sleep 30 & done; wait", stderr=subprocess.PIPE)
    time.sleep(1.0)
    assert len(group.pids()) <= 16
    assert group.kill_all() > 0
    _, err = proc.communicate(timeout=30)
    assert b"fork" in err.lower()
    time.sleep(0.2)
    assert group.remove()


def test_a_cpu_hog_is_held_near_its_quota(real_cgroups):
    group = real_cgroups.make("spin", ResourceRequest(cpu=0.2))
    proc = run_in(group, sys.executable, "-c", "import time\nend = time.time() + 4\nwhile time.time() < end: pass")
    watched = psutil.Process(proc.pid)
    time.sleep(0.5)
    before = sum(watched.cpu_times()[:2])
    time.sleep(2.0)
    used = (sum(watched.cpu_times()[:2]) - before) / 2.0
    proc.wait(10)
    assert 0.1 <= used <= 0.3, used  # 20 % of a core, within what a busy machine's sampling gives
    assert group.remove()


def test_nothing_it_forks_is_outside_its_group_and_leftovers_are_swept(real_cgroups):
    group = real_cgroups.make("escape", ResourceRequest(pids=50))
    # a double fork into a new session: out of the process group, not out of the cgroup
    proc = run_in(group, "sh", "-c", "setsid sh -c 'sleep 60' & sleep 60")
    time.sleep(0.5)
    inside = group.pids()
    assert len(inside) >= 3 and proc.pid in inside
    assert real_cgroups.sweep() == 1  # what an earlier run left: killed and removed
    proc.wait(10)
    time.sleep(0.2)
    assert not group.pids()
    real_cgroups.sweep()
    assert not any(os.path.isdir(d) for d in group.dirs)


def test_limits_a_node_cannot_enforce_refuse_to_make_a_group(real_cgroups):
    partial = cgroups.Cgroups(real_cgroups.hierarchy, real_cgroups.node_key)
    partial.enforceable = frozenset({"cpu"})
    with pytest.raises(cgroups.CgroupError, match="cannot enforce memory"):
        partial.make("x", ResourceRequest(cpu=0.5, memory_mb=64))


def test_what_a_group_used_is_read_from_its_own_counters(real_cgroups):
    group = real_cgroups.make("used", ResourceRequest())  # no limits: counted all the same
    proc = run_in(group, sys.executable, "-c",
                  "import time\nx = bytearray(40 * 1024 * 1024)\nend = time.time() + 0.6\nwhile time.time() < end: pass\n"
                  "time.sleep(5)")
    time.sleep(1.0)
    assert group.memory_bytes() >= 40 * 1024 * 1024
    assert group.cpu_usec() >= 400_000  # most of the 0.6 s it spun
    proc.kill()
    proc.wait()
    time.sleep(0.2)
    assert group.remove()


def test_v2_cpu_time_comes_from_cpu_stat():
    assert cgroups.cpu_stat_usec("usage_usec 123456\nuser_usec 100000\nsystem_usec 23456\n") == 123456
    assert cgroups.cpu_stat_usec("nr_periods 0\n") is None
