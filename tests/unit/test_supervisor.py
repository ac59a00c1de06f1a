"""Supervisor tests with real processes under trio.

Every test polls the reports until the state it waits for shows up (bounded by
`fail_after`), so none depends on how fast this machine is.
"""

import dataclasses
import datetime
import json
import os
import signal
import sys
import time

import psutil
import pytest
import trio

from meshd.io.logfiles import read_tail, rotated_files
from meshd.io.ports import free_port
from meshd.io.supervisor import (
    MAX_FINISHED_REPORTS,
    REASON_NOT_STARTED,
    REASON_REMOVED,
    REASON_SHUTDOWN,
    WORKLOAD_PATH,
    DesiredAlloc,
    Supervisor,
    output_stamped,
    workload_env,
)

# Generous: only reached when something is broken.
TEST_TIMEOUT = 20


def alloc(alloc_id, script=None, *, command=None, policy="never", env=None, app="web"):
    command = command if command is not None else ("sh", "-c", script)
    return DesiredAlloc(
        alloc_id=alloc_id, app=app, command=tuple(command), env=env or {}, restart_policy=policy
    )


def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def group_members(pgid):
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


def lifecycle(log_text):
    return [json.loads(line) for line in log_text.splitlines() if line.startswith("{")]


def output(log_text) -> str:
    """The workload's own output in a log: each of its lines without the time meshd put first
    (which must be an ISO 8601 time; only the first line of a rotated log's tail may lack it,
    cut where the oldest file kept begins)."""
    lines = []
    for n, line in enumerate(log_text.splitlines(keepends=True)):
        if line.startswith("{"):
            continue
        stamp, _, rest = line.partition(" ")
        try:
            datetime.datetime.fromisoformat(stamp)
        except ValueError:
            if n == 0:
                continue
            raise
        lines.append(rest)
    return "".join(lines)


def run_supervisor(tmp_path, scenario, **options):
    """Run `scenario(sup, changes)` against a running Supervisor, then stop everything."""
    options = {"stop_timeout": 2.0, "backoff_base": 0.01, "backoff_cap": 0.04} | options
    changes = []

    async def main():
        sup = Supervisor(tmp_path, on_change=lambda: changes.append(sup.reports()), **options)
        with trio.fail_after(TEST_TIMEOUT):
            async with trio.open_nursery() as nursery:
                await nursery.start(sup.run)
                try:
                    await scenario(sup, changes)
                finally:
                    with trio.CancelScope(shield=True):
                        await sup.stop_all()
                    nursery.cancel_scope.cancel()

    trio.run(main)


async def wait_for(sup, alloc_id, predicate=lambda r: True):
    while True:
        for report in sup.reports():
            if report.alloc_id == alloc_id and predicate(report):
                return report
        await trio.sleep(0.01)


async def wait_until(condition):
    while not condition():
        await trio.sleep(0.01)


def running(report):
    return report.state == "running"


def test_runs_with_its_env_and_captures_stdout_and_stderr(tmp_path, monkeypatch):
    monkeypatch.setenv("MESHD_SECRET", "daemon-only")
    script = (
        'echo "id=$MESHD_ALLOC_ID app=$MESHD_APP secret=${MESHD_SECRET-unset} mode=$MODE"; '
        "echo oops >&2; pwd; exec sleep 1000"
    )

    async def scenario(sup, changes):
        sup.set_desired([alloc("a1", script, env={"MODE": "edge"})])
        report = await wait_for(sup, "a1", running)
        assert report.pid is not None and report.restarts == 0 and report.exit_code is None
        assert os.getpgid(report.pid) == os.getsid(report.pid) == report.pid  # own session and group
        path = sup.log_path("a1")
        assert path == tmp_path / "allocs" / "a1" / "output.log"
        await wait_until(lambda: b"oops" in path.read_bytes() and alive(report.pid))
        text = path.read_text()
        assert "id=a1 app=web secret=unset mode=edge\noops\n" in output(text)
        assert f"{path.parent}\n" in output(text)  # runs in its allocation directory
        assert lifecycle(text)[0]["message"] == f"meshd: started pid {report.pid}"
        assert [r.state for r in changes[0]] == ["pending"]

    run_supervisor(tmp_path, scenario)


def test_every_output_line_carries_its_time_and_meshds_own_lines_stay_apart(tmp_path):
    # the workload prints something that looks like a lifecycle line, and a line in two writes
    script = """printf '{"ts": 1, "meshd": "started", "message": "meshd: forged"}\\n'; printf 'half'; sleep 0.2; \
printf ' whole\\n'"""

    async def scenario(sup, changes):
        sup.set_desired([alloc("a1", script)])
        await wait_for(sup, "a1", lambda r: r.state == "stopped")

    before = time.time()
    run_supervisor(tmp_path, scenario)
    text = (tmp_path / "allocs" / "a1" / "output.log").read_text()
    assert output(text) == '{"ts": 1, "meshd": "started", "message": "meshd: forged"}\nhalf whole\n'
    assert all(not e["message"].endswith("forged") for e in lifecycle(text))
    stamps = [datetime.datetime.fromisoformat(line.partition(" ")[0]).timestamp()
              for line in text.splitlines() if not line.startswith("{")]
    assert len(stamps) == 2 and all(before - 1 <= s <= time.time() for s in stamps)
    assert output_stamped(b"a\nb", mid_line=True, now=0.0).startswith(b"a\n")  # mid-line: no stamp first


def test_a_workload_gets_a_clean_environment_not_the_daemons(monkeypatch):
    monkeypatch.setenv("MESHD_SOCKET", "/s")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/n")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "daemon-only")
    env = workload_env(alloc("a1", "true", env={"MODE": "x", "MESHD_APP": "spoof", "LANG": "de_DE.UTF-8"}, app="web"),
                       "/var/lib/meshd/allocs/a1")
    assert env == {"PATH": WORKLOAD_PATH, "LANG": "de_DE.UTF-8", "HOME": "/var/lib/meshd/allocs/a1", "MODE": "x",
                   "MESHD_ALLOC_ID": "a1", "MESHD_APP": "web"}


def test_output_is_captured_in_order_and_rotated(tmp_path):
    program = (
        "import sys\n"
        "for i in range(200):\n"
        "    out = sys.stdout if i % 2 else sys.stderr\n"
        "    out.write(f'{i:04d}' + 'x' * 45 + '\\n'); out.flush()\n"
    )

    async def scenario(sup, changes):
        sup.set_desired([alloc("a1", command=("python3", "-c", program))])
        report = await wait_for(sup, "a1", lambda r: r.state == "stopped")
        assert (report.exit_code, report.reason) == (0, "exited 0")

    run_supervisor(tmp_path, scenario, log_max_bytes=2000, log_keep=2)
    path = tmp_path / "allocs" / "a1" / "output.log"
    assert [i for i, _ in rotated_files(path)] == [1, 2]
    assert all(p.stat().st_size <= 2000 for p in path.parent.iterdir())
    numbers = [int(line[:4]) for line in output(read_tail(path, 10**6).decode()).splitlines() if line[:4].isdigit()]
    assert numbers == list(range(numbers[0], 200))  # stdout and stderr interleaved in order
    assert numbers[0] > 0  # the oldest output was rotated away


@pytest.mark.parametrize(
    "policy, script, state, exit_code, reason",
    [
        ("never", "exit 3", "failed", 3, "exited 3"),
        ("never", "kill -SEGV $$", "failed", -signal.SIGSEGV, "killed by SIGSEGV"),
        ("never", "exit 0", "stopped", 0, "exited 0"),
        ("on-failure", "exit 0", "stopped", 0, "exited 0"),
    ],
)
def test_final_states(tmp_path, policy, script, state, exit_code, reason):
    async def scenario(sup, changes):
        sup.set_desired([alloc("a1", script, policy=policy)])
        report = await wait_for(sup, "a1", lambda r: r.state in ("failed", "stopped"))
        assert (report.state, report.exit_code, report.reason, report.pid) == (state, exit_code, reason, None)
        seen = [reports[0].state for reports in changes]
        assert seen == ["pending", "running", state]  # on_change after every change

    run_supervisor(tmp_path, scenario)
    last = lifecycle((tmp_path / "allocs" / "a1" / "output.log").read_text())[-1]
    assert last["message"] == f"meshd: {state}: {reason}"


@pytest.mark.parametrize(
    "policy, script", [("always", "exit 0"), ("always", "exit 1"), ("on-failure", "exit 2")]
)
def test_restarts_with_backoff_and_counts_them(tmp_path, policy, script):
    async def scenario(sup, changes):
        sup.set_desired([alloc("a1", script, policy=policy)])
        await wait_for(sup, "a1", lambda r: r.restarts >= 4)
        pending = [r for reports in changes for r in reports
                   if r.state == "pending" and r.exit_code is not None]
        assert pending and pending[0].reason.startswith(f"exited {pending[0].exit_code}; restarting in")
        sup.set_desired([])
        report = await wait_for(sup, "a1", lambda r: r.state == "stopped")
        assert report.reason.startswith(REASON_REMOVED)

    run_supervisor(tmp_path, scenario)
    events = lifecycle((tmp_path / "allocs" / "a1" / "output.log").read_text())
    delays = [e["delay"] for e in events if e["meshd"] == "restarting"]
    assert delays[:4] == [0.01, 0.02, 0.04, 0.04]  # doubling from the base, capped
    assert [e["restarts"] for e in events if e["meshd"] == "started"][:5] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "script, stop_timeout, killed",
    [
        ("sleep 1000 & sleep 1000 & wait", 2.0, False),
        ('trap "" TERM; sleep 1000 & sleep 1000 & wait', 0.3, True),  # ignores SIGTERM
        ("setsid sleep 1000 & sleep 1000 & wait", 2.0, False),  # one child left the group
    ],
)
def test_removing_an_alloc_stops_every_process_of_it(tmp_path, script, stop_timeout, killed):
    async def scenario(sup, changes):
        sup.set_desired([alloc("a1", script, policy="always")])
        report = await wait_for(sup, "a1", running)
        shell = psutil.Process(report.pid)
        await wait_until(lambda: len(shell.children()) == 2)
        children = [child.pid for child in shell.children()]
        sup.set_desired([])
        stopped = await wait_for(sup, "a1", lambda r: r.state == "stopped")
        assert stopped.reason.startswith(REASON_REMOVED)
        assert stopped.restarts == 0
        assert not [pid for pid in [report.pid, *children] if alive(pid)]
        assert group_members(report.pid) == []

    run_supervisor(tmp_path, scenario, stop_timeout=stop_timeout)
    text = (tmp_path / "allocs" / "a1" / "output.log").read_text()
    assert ("SIGKILL" in text) is killed


def test_processes_left_behind_by_an_exiting_workload_are_stopped(tmp_path):
    async def scenario(sup, changes):
        sup.set_desired([alloc("a1", "sleep 1000 & echo $! > bg.pid; echo last words; exit 3")])
        report = await wait_for(sup, "a1", lambda r: r.state == "failed")
        assert report.reason == "exited 3"
        background = int((tmp_path / "allocs" / "a1" / "bg.pid").read_text())
        assert not alive(background)

    run_supervisor(tmp_path, scenario)
    text = (tmp_path / "allocs" / "a1" / "output.log").read_text()
    assert text.index("last words\n") < text.index("process(es) it left behind: SIGTERM")


def test_stop_all_leaves_no_processes(tmp_path):
    pids = []

    async def scenario(sup, changes):
        sup.set_desired([alloc("a1", command=("sleep", "1000")), alloc("a2", "sleep 1000 & wait")])
        for alloc_id in ("a1", "a2"):
            pids.append((await wait_for(sup, alloc_id, running)).pid)
        await sup.stop_all()
        final = {(r.state, r.reason) for r in sup.reports()}
        assert final == {("stopped", f"{REASON_SHUTDOWN}; killed by SIGTERM")}
        sup.set_desired([alloc("a3", command=("sleep", "1000"))])
        assert [r.reason for r in sup.reports() if r.alloc_id == "a3"] == [REASON_NOT_STARTED]

    run_supervisor(tmp_path, scenario)
    assert [pid for pgid in pids for pid in group_members(pgid)] == []


def test_a_workload_outlives_the_worker_threads_of_the_daemon(tmp_path, monkeypatch):
    """PDEATHSIG is sent when the thread that forked exits: a workload forked on one of trio's
    worker threads was SIGKILLed once that thread idled out (10 s; here made 0.05 s)."""
    import trio._core._thread_cache as thread_cache

    monkeypatch.setattr(thread_cache, "IDLE_TIMEOUT", 0.05)

    async def scenario(sup, changes):
        sup.set_desired([alloc("a1", command=("sleep", "1000"))])
        first = await wait_for(sup, "a1", running)
        await trio.to_thread.run_sync(lambda: None)  # a worker thread that then idles out
        await trio.sleep(1.0)
        now = await wait_for(sup, "a1")
        assert (now.state, now.pid, now.restarts) == ("running", first.pid, 0)
        assert alive(first.pid)

    run_supervisor(tmp_path, scenario)


def test_cancelling_run_stops_workloads_gracefully(tmp_path):
    async def main():
        sup = Supervisor(tmp_path, on_change=lambda: None, stop_timeout=2.0)
        with trio.fail_after(TEST_TIMEOUT):
            async with trio.open_nursery() as nursery:
                await nursery.start(sup.run)
                sup.set_desired([alloc("a1", 'trap "echo got TERM; exit 0" TERM; sleep 1000 & wait')])
                report = await wait_for(sup, "a1", running)
                await wait_until(lambda: len(psutil.Process(report.pid).children()) == 1)
                nursery.cancel_scope.cancel()
        return report.pid, sup.reports()

    pid, reports = trio.run(main)
    assert [(r.state, r.reason) for r in reports] == [("stopped", REASON_SHUTDOWN)]
    assert group_members(pid) == []
    assert "got TERM\n" in (tmp_path / "allocs" / "a1" / "output.log").read_text()


@pytest.mark.parametrize(
    "policy, command, reason",
    [
        ("never", ("/nonexistent/prog",), "cannot execute '/nonexistent/prog': No such file or directory"),
        ("always", ("/nonexistent/prog",), "cannot execute '/nonexistent/prog': No such file or directory"),
        ("never", ("/",), "cannot execute '/': Permission denied"),
        ("never", ("echo", "a\0b"), "cannot execute 'echo': embedded null byte"),
    ],
)
def test_a_command_that_cannot_run_is_a_failure_naming_the_error(tmp_path, policy, command, reason):
    async def scenario(sup, changes):
        sup.set_desired([alloc("a1", command=command, policy=policy)])
        if policy == "never":
            report = await wait_for(sup, "a1", lambda r: r.state == "failed")
            assert (report.reason, report.exit_code) == (reason, None)
        else:
            await wait_for(sup, "a1", lambda r: r.restarts >= 2)
            restarting = reason + "; restarting in"
            assert [r for reports in changes for r in reports if r.reason.startswith(restarting)]

    run_supervisor(tmp_path, scenario)


@pytest.mark.parametrize(
    "spec, reason",
    [
        (alloc("../escape", "true"), "invalid allocation id '../escape'"),
        (alloc("a1", "true", policy="sometimes"), "unknown restart policy 'sometimes'"),
        (alloc("a1", command=()), "empty command"),
    ],
)
def test_bad_specs_fail_with_a_reason(tmp_path, spec, reason):
    async def scenario(sup, changes):
        sup.set_desired([spec])
        [report] = sup.reports()
        assert report.state == "failed" and report.reason.startswith(reason)

    run_supervisor(tmp_path, scenario)
    assert not (tmp_path / "escape").exists()


def test_log_path_refuses_ids_that_are_not_one_directory(tmp_path):
    sup = Supervisor(tmp_path, on_change=lambda: None)
    for bad in ("..", "a/b", "", ".hidden"):
        with pytest.raises(ValueError, match="invalid allocation id"):
            sup.log_path(bad)


def test_unchanged_allocs_keep_running_and_a_changed_spec_restarts_it(tmp_path):
    async def scenario(sup, changes):
        first = alloc("a1", command=("sleep", "1000"), policy="always")
        sup.set_desired([first])
        before = await wait_for(sup, "a1", running)
        sup.set_desired([first, alloc("a2", command=("sleep", "1000"))])
        await wait_for(sup, "a2", running)
        assert (await wait_for(sup, "a1")).pid == before.pid
        sup.set_desired([alloc("a1", command=("sleep", "999"), policy="always")])
        after = await wait_for(sup, "a1", lambda r: running(r) and r.pid != before.pid)
        assert after.restarts == 0
        assert not alive(before.pid)
        assert psutil.Process(after.pid).cmdline() == ["sleep", "999"]
        assert (await wait_for(sup, "a2", lambda r: r.state == "stopped")).reason.startswith(REASON_REMOVED)

    run_supervisor(tmp_path, scenario)


def test_a_final_alloc_listed_again_is_not_restarted(tmp_path):
    async def scenario(sup, changes):
        spec = alloc("a1", "exit 3")
        sup.set_desired([spec])
        await wait_for(sup, "a1", lambda r: r.state == "failed")
        sup.set_desired([spec])
        await trio.sleep(0.05)
        assert [r.state for r in sup.reports()] == ["failed"]

    run_supervisor(tmp_path, scenario)


def test_only_the_latest_final_reports_are_kept(tmp_path):
    async def scenario(sup, changes):
        # refused specs end at once, without a process: a cheap way to finish many
        batch = [alloc(f"x{i}", "true", policy="bad") for i in range(MAX_FINISHED_REPORTS + 5)]
        sup.set_desired(batch)
        assert len(sup.reports()) == MAX_FINISHED_REPORTS + 5  # still desired: kept
        sup.set_desired([])
        ids = [r.alloc_id for r in sup.reports()]
        assert ids == [f"x{i}" for i in range(5, MAX_FINISHED_REPORTS + 5)]

    run_supervisor(tmp_path, scenario)


def test_a_stop_by_meshd_is_reported_as_such_and_a_workloads_own_exit_is_not(tmp_path):
    """The site replaces a replica its node's meshd stopped while the site still wanted it;
    a workload that ended by itself has run its course (its restart policy decided)."""
    async def scenario(sup, changes):
        sup.set_desired([alloc("kept", "exec sleep 1000"), alloc("done", "exit 0")])
        await wait_for(sup, "kept", running)
        ended = await wait_for(sup, "done", lambda r: r.state == "stopped")
        assert not ended.stopped_by_meshd
        sup.set_desired([])
        stopped = await wait_for(sup, "kept", lambda r: r.state == "stopped")
        assert stopped.stopped_by_meshd and REASON_REMOVED in stopped.reason

    run_supervisor(tmp_path, scenario)


def test_forgotten_allocations_lose_their_directories_but_a_running_one_keeps_its_own(tmp_path):
    from meshd.io.supervisor import remove_dirs

    async def scenario(sup, changes):
        sup.set_desired([alloc("runs", "exec sleep 1000"), alloc("ended", "exit 0")])
        await wait_for(sup, "runs", running)
        await wait_for(sup, "ended", lambda r: r.state == "stopped")
        sup.set_desired([alloc("runs", "exec sleep 1000")])
        (tmp_path / "allocs" / "leftover").mkdir(parents=True)
        assert {"runs", "ended", "leftover"} <= sup.allocation_dirs()
        dirs = sup.forget(["runs", "ended", "leftover", "../escape"])
        remove_dirs(dirs)
        assert sorted(p.name for p in dirs) == ["ended", "leftover"]
        assert sup.allocation_dirs() == {"runs"} and [r.alloc_id for r in sup.reports()] == ["runs"]

    run_supervisor(tmp_path, scenario)


def test_stopping_many_workloads_at_once_scans_the_process_table_a_few_times(tmp_path, monkeypatch):
    """A mass stop (shutdown) shares its scans of /proc: each stopping workload scanning on its
    own made shutdown quadratic in the workloads a device runs."""
    from meshd.io import supervisor as supervisor_module
    scans = []
    real = supervisor_module._live_processes
    monkeypatch.setattr(supervisor_module, "_live_processes", lambda: scans.append(1) or real())
    count = 60
    pids = []

    async def scenario(sup, changes):
        sup.set_desired([alloc(f"a{i}", "exec sleep 1000") for i in range(count)])
        await wait_until(lambda: sum(running(r) for r in sup.reports()) == count)
        pids.extend(r.pid for r in sup.reports())
        scans.clear()
        with trio.fail_after(10):
            await sup.stop_all()

    run_supervisor(tmp_path, scenario)
    assert not [pid for pid in pids if alive(pid)]
    assert len(scans) <= 10  # one per poll period while they stop, not one per workload and poll


# --- health checks: a real HTTP server as the workload --------------------------------------

def http_workload(alloc_id, port, path, policy, failures=2):
    from meshd.state import HealthCheck
    import sys
    return DesiredAlloc(alloc_id=alloc_id, app="web", restart_policy=policy, env={},
                        command=(sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"),
                        health=HealthCheck(kind="http", port=port, path=path, interval_s=0.2, timeout_s=0.5,
                                           failures=failures, grace_s=0.0))


def test_a_replica_that_answers_its_check_is_reported_healthy(tmp_path):
    port = free_port()

    async def scenario(sup, changes):
        sup.set_desired([http_workload("h1", port, "/", "always")])
        report = await wait_for(sup, "h1", lambda r: r.state == "running")
        assert report.health == "checking"  # no verdict before the first check answers
        healthy = await wait_for(sup, "h1", lambda r: r.health == "healthy")
        assert healthy.restarts == 0 and healthy.pid == report.pid

    run_supervisor(tmp_path, scenario)


def test_a_replica_failing_its_check_is_restarted_by_its_policy_with_the_reason(tmp_path):
    port = free_port()

    async def scenario(sup, changes):
        sup.set_desired([http_workload("h1", port, "/missing", "always")])
        first = await wait_for(sup, "h1", lambda r: r.state == "running")
        again = await wait_for(sup, "h1", lambda r: r.restarts >= 1 and r.state == "running")
        assert again.pid != first.pid
        reasons = [r.reason for batch in changes for r in batch if r.alloc_id == "h1" and r.reason]
        assert any(reason.startswith("unhealthy: 2 consecutive http checks failed, the last: http /missing: "
                                     "status 404") for reason in reasons), reasons
        text = sup.log_path("h1").read_text()
        assert any(e["meshd"] == "health" and e["health"] == "unhealthy" for e in lifecycle(text))

    run_supervisor(tmp_path, scenario, backoff_base=0.05, backoff_cap=0.1)


def test_under_policy_never_an_unhealthy_replica_fails_for_good(tmp_path):
    port = free_port()

    async def scenario(sup, changes):
        sup.set_desired([http_workload("h1", port, "/missing", "never", failures=1)])
        report = await wait_for(sup, "h1", lambda r: r.state == "failed")
        assert report.reason.startswith("unhealthy: 1 consecutive http checks failed") and report.health == "none"
        assert report.restarts == 0

    run_supervisor(tmp_path, scenario)


# --- limits (meshd.io.cgroups, on this machine's real cgroups) -------------------------------

def limited(alloc_id, script, policy="never", **limits):
    from meshd.state import ResourceRequest
    return dataclasses.replace(alloc(alloc_id, script, policy=policy), limits=ResourceRequest(**limits))


def test_a_memory_kill_is_reported_as_oom_killed_and_restarted_as_such(tmp_path, real_cgroups):
    hog = f"exec {sys.executable} -c 'x = bytearray(256 * 1024 * 1024)'"

    async def scenario(sup, changes):
        sup.set_desired([limited("a1", hog, policy="on-failure", memory_mb=32)])
        restarting = await wait_for(sup, "a1", lambda r: r.restarts >= 1)
        assert restarting.reason.startswith("oom-killed (memory limit 32 MiB)") or restarting.state == "running"
        assert any(r[0].reason.startswith("oom-killed (memory limit 32 MiB); restarting in") for r in changes)
        assert sup.counts["oom_kills"] >= 1
        sup.set_desired([limited("a2", hog, policy="never", memory_mb=32)])
        final = await wait_for(sup, "a2", lambda r: r.state == "failed")
        assert (final.exit_code, final.reason) == (-signal.SIGKILL, "oom-killed (memory limit 32 MiB)")

    run_supervisor(tmp_path, scenario, limits=real_cgroups)
    events = [e["meshd"] for e in lifecycle((tmp_path / "allocs" / "a2" / "output.log").read_text())]
    assert "oom-killed" in events


def test_what_escaped_its_session_is_stopped_with_it_and_its_group_removed(tmp_path, real_cgroups):
    async def scenario(sup, changes):
        sup.set_desired([limited("a1", "setsid sh -c 'sleep 60' & exec sleep 60", pids=20)])
        await wait_for(sup, "a1", running)
        await trio.sleep(0.3)
        group_dir = real_cgroups.hierarchy.dir_of("pids")
        pids = [int(p) for p in open(os.path.join(real_cgroups.base(group_dir), "a1", "cgroup.procs")).read().split()]
        assert len(pids) >= 2  # the workload and what left its session
        sup.set_desired([])
        await wait_for(sup, "a1", lambda r: r.state == "stopped")
        await wait_until(lambda: not any(alive(p) for p in pids))
        assert not os.path.exists(os.path.join(real_cgroups.base(group_dir), "a1"))

    run_supervisor(tmp_path, scenario, limits=real_cgroups)


def test_limits_without_cgroups_fail_the_start_and_never_run_unconfined(tmp_path):
    async def scenario(sup, changes):
        sup.set_desired([limited("a1", "touch ran", memory_mb=64)])
        final = await wait_for(sup, "a1", lambda r: r.state == "failed")
        assert "cannot confine it" in final.reason and "no cgroups" in final.reason

    run_supervisor(tmp_path, scenario)
    assert not (tmp_path / "allocs" / "a1" / "ran").exists()


# --- who a workload runs as -------------------------------------------------------------------

def as_user(alloc_id, script, user="", **options):
    return dataclasses.replace(alloc(alloc_id, script, **options), user=user)


@pytest.fixture
def root_only():
    if os.geteuid() != 0:
        pytest.skip("running workloads as another user needs root")


def test_a_workload_runs_as_the_workload_user_in_a_directory_of_its_own(tmp_path, root_only):
    import pwd
    nobody = pwd.getpwnam("nobody")

    async def scenario(sup, changes):
        sup.set_desired([as_user("a1", "id -u > me; id -g >> me; exec sleep 60"),
                         as_user("a2", "id -u > me; exec sleep 60", user="root")])
        await wait_for(sup, "a1", running)
        await wait_for(sup, "a2", running)
        await wait_until(lambda: (tmp_path / "allocs" / "a1" / "me").exists()
                         and (tmp_path / "allocs" / "a2" / "me").exists())
        await trio.sleep(0.1)

    run_supervisor(tmp_path, scenario, workload_user="nobody")
    assert (tmp_path / "allocs" / "a1" / "me").read_text().split() == [str(nobody.pw_uid), str(nobody.pw_gid)]
    assert (tmp_path / "allocs" / "a1").stat().st_uid == nobody.pw_uid  # it may write where it runs
    assert (tmp_path / "allocs" / "a2" / "me").read_text().split() == ["0"]  # root only when the spec says so


def test_a_user_the_node_does_not_have_fails_the_start_with_the_reason(tmp_path, root_only):
    async def scenario(sup, changes):
        sup.set_desired([as_user("a1", "touch ran", user="no-such-user-here")])
        final = await wait_for(sup, "a1", lambda r: r.state == "failed")
        assert "user no-such-user-here does not exist on this node" in final.reason

    run_supervisor(tmp_path, scenario, workload_user="nobody")
    assert not (tmp_path / "allocs" / "a1" / "ran").exists()


def test_an_exec_health_check_runs_as_the_workload_does(tmp_path, root_only):
    from meshd.state import HealthCheck
    import pwd
    check = HealthCheck(kind="exec", command=("sh", "-c", f'test "$(id -u)" = {pwd.getpwnam("nobody").pw_uid}'),
                        interval_s=0.1, timeout_s=2.0, failures=1)

    async def scenario(sup, changes):
        sup.set_desired([dataclasses.replace(as_user("a1", "exec sleep 60"), health=check)])
        await wait_for(sup, "a1", lambda r: r.health == "healthy")

    run_supervisor(tmp_path, scenario, workload_user="nobody")
