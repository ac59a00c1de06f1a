"""A real `meshd run` as meshd.service runs it: under the notify protocol (Type=notify,
WatchdogSec=), an AF_UNIX datagram socket as $NOTIFY_SOCKET receiving what systemd would; and
within the unit's capability bounding set on a read-only root file system."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from meshd.io.adminclient import admin_call_sync

from tests.unit.test_packaging import UNIT, unit_sections

pytestmark = pytest.mark.system

START_TIMEOUT = 60  # a founding daemon is ready in a few seconds; a loaded machine takes longer
WATCHDOG_USEC = 400_000  # pings every 0.2 s: several within a short test


def run_notified(tmp_path, env: dict[str, str]):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    daemon = subprocess.Popen([sys.executable, "-m", "meshd.cli.meshd_main", "run", "--data-dir",
                               str(tmp_path / "n"), "--site", "s", "--name", "n", "--no-mdns",
                               "--listen", "127.0.0.1:0"],
                              env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), **env},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return notify, daemon


def receive_until(notify: socket.socket, wanted: bytes, timeout: float) -> list[bytes]:
    """Every message up to and including the first `wanted` (AssertionError if it never comes)."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while not got or got[-1] != wanted:
        left = deadline - time.monotonic()
        assert left > 0, f"no {wanted!r} within {timeout} s; got {got}"
        notify.settimeout(left)
        got.append(notify.recv(4096))
    return got


@pytest.fixture
def stop_daemons():
    daemons: list[subprocess.Popen] = []
    yield daemons.append
    for daemon in daemons:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(timeout=30)


def test_ready_status_watchdog_pings_and_stopping_reach_the_notify_socket(tmp_path, stop_daemons):
    notify, daemon = run_notified(tmp_path, {"WATCHDOG_USEC": str(WATCHDOG_USEC)})
    stop_daemons(daemon)
    with notify:
        before_ready = receive_until(notify, b"READY=1", START_TIMEOUT)
        assert b"WATCHDOG=1" in before_ready  # pinged while it founded, not only once ready
        assert b"STATUS=founding site s of a new mesh" in before_ready
        after_ready, started = [], time.monotonic()
        while time.monotonic() - started < 1.5:
            after_ready.append(notify.recv(4096))
        assert after_ready[0] == b"STATUS=member of site s (voter)"
        assert set(after_ready[1:]) == {b"WATCHDOG=1"} and 5 <= len(after_ready[1:]) <= 9  # every 0.2 s
        daemon.send_signal(signal.SIGTERM)
        receive_until(notify, b"STOPPING=1", 30)
        assert daemon.wait(timeout=30) == 0, daemon.stderr.read()


def test_no_pings_for_a_watchdog_that_expects_another_process(tmp_path, stop_daemons):
    notify, daemon = run_notified(tmp_path, {"WATCHDOG_USEC": str(WATCHDOG_USEC), "WATCHDOG_PID": "1"})
    stop_daemons(daemon)
    with notify:
        before_ready = receive_until(notify, b"READY=1", START_TIMEOUT)
        notify.settimeout(1.0)  # five intervals
        after: list[bytes] = []
        try:
            while True:
                after.append(notify.recv(4096))
        except TimeoutError:
            pass
        assert b"WATCHDOG=1" not in before_ready + after
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0, daemon.stderr.read()


# The file system as ProtectSystem=strict and PrivateTmp= leave it to the unit: read-only but
# /tmp and /var/tmp (where this test's data dir lives, as /var/lib/meshd is the unit's) and the
# API file systems; in a mount namespace of its own, so nothing changes outside the test.
READ_ONLY_ROOT = ('mount --bind /tmp /tmp && mount --bind /var/tmp /var/tmp && mount -o remount,bind,ro / '
                  '&& exec "$@"')


@pytest.mark.skipif(os.geteuid() != 0 or not (shutil.which("setpriv") and shutil.which("unshare")),
                    reason="needs root, setpriv and unshare")
def test_the_daemon_founds_and_stops_within_the_units_sandbox(tmp_path, stop_daemons):
    """meshd.service's CapabilityBoundingSet= and NoNewPrivileges= (applied by setpriv) on a
    read-only root file system (ProtectSystem=strict): what the daemon needs to found a mesh,
    run a workload and stop is inside them."""
    service = unit_sections(UNIT.read_text())["Service"]
    caps = [cap.removeprefix("CAP_").lower() for line in service["CapabilityBoundingSet"] for cap in line.split()]
    assert service["NoNewPrivileges"] == ["yes"] and service["ProtectSystem"] == ["strict"] and caps
    sandbox = ("unshare", "--mount", "--propagation", "private", "sh", "-c", READ_ONLY_ROOT, "sh",
               "setpriv", "--bounding-set=-all," + ",".join("+" + cap for cap in caps), "--inh-caps=-all",
               "--no-new-privs")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    daemon = subprocess.Popen([*sandbox, sys.executable, "-m", "meshd.cli.meshd_main", "run", "--data-dir",
                               str(tmp_path / "n"), "--site", "s", "--name", "n", "--no-mdns",
                               "--listen", "127.0.0.1:0", "--workload-user", "nobody"],  # the package's user's stand-in
                              env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stop_daemons(daemon)
    with notify:
        receive_until(notify, b"READY=1", START_TIMEOUT)
        with open(f"/proc/{daemon.pid}/status") as status:
            bounding = next(int(line.split()[1], 16) for line in status if line.startswith("CapBnd:"))
        assert bin(bounding).count("1") == len(caps)  # the test ran it bounded, as the unit would
        with open(f"/proc/{daemon.pid}/mountinfo") as mounts:
            root = next(line.split() for line in mounts if line.split()[4] == "/")
        assert "ro" in root[5].split(",")  # ... and on a read-only root
        # a workload runs there too: it writes its own directory's file and its log
        app = ('[app]\nname = "w"\nreplicas = 1\n'
               'command = ["sh", "-c", "echo up; echo x > state; exec sleep 600"]\n')
        admin = str(tmp_path / "n" / "admin.sock")
        admin_call_sync(admin, "deploy", {"spec_toml": app, "wait": True, "timeout": 30}, timeout=40)
        (alloc,) = admin_call_sync(admin, "allocs", {"app": "w"}, timeout=10)
        assert alloc["state"] == "running" and alloc["restarts"] == 0, alloc
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0, daemon.stderr.read()
    assert [p.read_text() for p in (tmp_path / "n").rglob("state")] == ["x\n"]


def test_a_frozen_daemon_stops_pinging_and_pings_again_once_thawed(tmp_path, stop_daemons):
    """SIGSTOP: no ping while frozen, which systemd's watchdog acts on (the loop watchdog
    leaves a frozen process alone on purpose); after SIGCONT the same daemon pings again."""
    notify, daemon = run_notified(tmp_path, {"WATCHDOG_USEC": str(WATCHDOG_USEC)})
    stop_daemons(daemon)
    with notify:
        receive_until(notify, b"READY=1", START_TIMEOUT)
        daemon.send_signal(signal.SIGSTOP)
        time.sleep(0.3)  # a ping already on its way may still arrive
        notify.setblocking(False)
        while True:
            try:
                notify.recv(4096)
            except BlockingIOError:
                break
        notify.settimeout(1.5)  # seven intervals
        with pytest.raises(TimeoutError):
            notify.recv(4096)
        daemon.send_signal(signal.SIGCONT)
        assert receive_until(notify, b"WATCHDOG=1", 5)[-1] == b"WATCHDOG=1"
        assert daemon.poll() is None
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0, daemon.stderr.read()
