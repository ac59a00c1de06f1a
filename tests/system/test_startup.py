"""`meshd run` refusing to start: each start-up failure an operator can cause is one `error:`
line and its own exit status (meshd.exitcodes), never a traceback. Real daemon processes;
permissions are taken away with setpriv (root without capabilities, as a hardened service
unit runs it)."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from meshd import exitcodes, tokens
from meshd.io.identity import write_revoked_marker

pytestmark = pytest.mark.system

START_TIMEOUT = 60  # a refusal comes within a second or two; a founding daemon is ready in a few


def meshd_run(data_dir, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "meshd.cli.meshd_main", "run", "--data-dir", str(data_dir),
                           "--name", "n", "--no-mdns", *args], capture_output=True, text=True, timeout=START_TIMEOUT)


def refused(done: subprocess.CompletedProcess, status: int, message: str) -> None:
    assert done.returncode == status, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture
def founded(tmp_path):
    """A data dir that holds the membership of site `s` (its founder ran, then stopped)."""
    data = tmp_path / "n"
    daemon = subprocess.Popen([sys.executable, "-m", "meshd.cli.meshd_main", "run", "--data-dir", str(data),
                               "--site", "s", "--name", "n", "--no-mdns", "--listen", "127.0.0.1:0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not (data / "membership.json").exists() or not (data / "admin.sock").exists():
            assert daemon.poll() is None and time.monotonic() < deadline, "the founder did not start"
            time.sleep(0.1)
        yield data, daemon
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)


def test_a_second_daemon_on_a_data_dir_in_use_is_refused_and_a_stopped_ones_dir_is_free(founded):
    data, daemon = founded
    refused(meshd_run(data, "--listen", "127.0.0.1:0"), exitcodes.EXIT_LOCKED,
            f"data dir {data} is in use by another meshd (pid {daemon.pid})")
    assert daemon.poll() is None  # and the first one runs on
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0
    # what the data dir holds now contradicts these: each refused, and nothing changed
    before = sorted(p.name for p in data.iterdir())
    refused(meshd_run(data, "--site", "shop", "--listen", "127.0.0.1:0"), exitcodes.EXIT_CONFIG,
            "the data dir belongs to site s, but the config says site shop")
    token = tokens.format_token("shop", "t1", b"\x01" * tokens.TOKEN_SECRET_BYTES)
    refused(meshd_run(data, "--join", token, "--listen", "127.0.0.1:0"), exitcodes.EXIT_CONFIG,
            "the data dir belongs to site s, but the join token is for site shop")
    assert sorted(p.name for p in data.iterdir()) == before


def test_a_revoked_node_is_refused_with_its_own_status(tmp_path):
    data = tmp_path / "n"
    data.mkdir()
    write_revoked_marker(data, "this node was revoked from site s: stolen")
    refused(meshd_run(data, "--listen", "127.0.0.1:0"), exitcodes.EXIT_REVOKED,
            "this node was revoked from site s: stolen; wipe the data dir")


@pytest.mark.parametrize("case", ["bad option", "unreadable config", "config not toml", "token for another site",
                                  "malformed token", "data dir is a file"])
def test_a_bad_option_or_config_is_refused_before_anything_is_written(tmp_path, case):
    data, extra, status = tmp_path / "n", [], exitcodes.EXIT_CONFIG
    message = {"bad option": "lease", "unreadable config": "cannot read config",
               "config not toml": "not valid TOML", "token for another site":
               "the join token is for site shop, but the config says site s",
               "malformed token": "--join:", "data dir is a file": f"cannot use data dir {data}"}[case]
    if case == "bad option":
        extra = ["--lease", "-1"]
    elif case == "unreadable config":
        extra = ["--config", str(tmp_path / "missing.toml")]
    elif case == "config not toml":
        (tmp_path / "bad.toml").write_text("site = = 'x'\n")
        extra = ["--config", str(tmp_path / "bad.toml")]
    elif case == "token for another site":
        extra = ["--site", "s", "--join", tokens.format_token("shop", "t1", b"\x01" * tokens.TOKEN_SECRET_BYTES)]
    elif case == "malformed token":
        extra = ["--join", "mtk1_not-a-token"]
    else:
        data.write_text("not a directory")
        status = exitcodes.EXIT_ERROR
    refused(meshd_run(data, "--listen", "127.0.0.1:0", *extra), status, message)
    if case != "data dir is a file":
        assert not (data / "membership.json").exists()


@pytest.mark.parametrize("taken", ["peer", "raft"])
def test_a_port_already_in_use_is_a_clear_error_at_start(tmp_path, taken):
    """`--listen IP:PORT` takes PORT and PORT+1 (Raft); either taken: the reason and its own
    status, not a traceback, and no Raft retrying its bind forever."""
    while True:  # a held port whose neighbour below is free (for "raft", the peer port)
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        held = holder.getsockname()[1]
        if taken == "peer" or _free(held - 1):
            break
        holder.close()
    with holder:
        holder.listen()
        port = held if taken == "peer" else held - 1
        done = meshd_run(tmp_path / "n", "--site", "s", "--listen", f"127.0.0.1:{port}")
    what = "peer" if taken == "peer" else "Raft"
    refused(done, exitcodes.EXIT_PORT_IN_USE, f"cannot listen on 127.0.0.1:{held} for {what} traffic")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as meshd's own check binds
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


NO_CAPABILITIES = ("setpriv", "--bounding-set=-all", "--inh-caps=-all")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_what_the_process_is_not_permitted_to_do_is_refused_with_the_permission_status(tmp_path):
    # a port below 1024 without CAP_NET_BIND_SERVICE
    refused(meshd_run(tmp_path / "n", "--listen", "127.0.0.1:80", prefix=NO_CAPABILITIES), exitcodes.EXIT_NOPERM,
            "cannot listen on 127.0.0.1:80 for peer traffic: Permission denied (ports below 1024 need root")
    # a data dir owned by somebody else, without CAP_DAC_OVERRIDE / CAP_FOWNER
    other = Path(tempfile.mkdtemp(dir=tmp_path))
    os.chown(other, 65534, 65534)
    refused(meshd_run(other, "--listen", "127.0.0.1:0", prefix=NO_CAPABILITIES), exitcodes.EXIT_NOPERM,
            f"cannot use data dir {other}")


PACKAGED_CONFIG = Path(__file__).resolve().parents[2] / "packaging" / "meshd.toml"


def test_the_packaged_config_founds_no_mesh_on_a_fresh_install(tmp_path):
    """bootstrap = "join" and no token: one line naming the keys to set in the file, the config
    status (the unit does not restart on it), and no membership."""
    data = tmp_path / "n"
    done = meshd_run(data, "--config", str(PACKAGED_CONFIG), "--listen", "127.0.0.1:0")
    refused(done, exitcodes.EXIT_CONFIG,
            f"bootstrap is join, but no join token is given and the data dir {data} holds no membership: "
            f'set join = "TOKEN" (from `meshctl token create` on a member) in {PACKAGED_CONFIG} to join a mesh, '
            f'or bootstrap = "found" there on the first device of a new mesh')
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (data / "membership.json").exists()


def test_bootstrap_join_on_the_command_line_names_the_options(tmp_path):
    refused(meshd_run(tmp_path / "n", "--bootstrap", "join", "--listen", "127.0.0.1:0"), exitcodes.EXIT_CONFIG,
            "holds no membership: give --join TOKEN (from `meshctl token create` on a member) to join a mesh, "
            "or --bootstrap found on the first device of a new mesh")


def test_bootstrap_found_with_a_join_token_is_a_contradiction(tmp_path):
    token = tokens.format_token("s", "t1", b"\x01" * tokens.TOKEN_SECRET_BYTES)
    refused(meshd_run(tmp_path / "n", "--bootstrap", "found", "--join", token, "--listen", "127.0.0.1:0"),
            exitcodes.EXIT_CONFIG, 'bootstrap: is "found" (found a new mesh), but a join token is given (join): '
                                   'drop join, or set bootstrap to "join" (from the command line)')
    assert not (tmp_path / "n").exists()


def test_a_member_resumes_under_the_packaged_config(founded):
    """bootstrap = "join" does not stop a node that already is a member: it resumes."""
    data, daemon = founded
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0
    (data / "admin.sock").unlink(missing_ok=True)
    resumed = subprocess.Popen([sys.executable, "-m", "meshd.cli.meshd_main", "run", "--config", str(PACKAGED_CONFIG),
                                "--data-dir", str(data), "--name", "n", "--no-mdns", "--listen", "127.0.0.1:0"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, lines = time.monotonic() + START_TIMEOUT, []
        while not any('"msg": "ready"' in line for line in lines):  # its JSON log line once a member
            assert time.monotonic() < deadline, f"the member did not resume: {lines}"
            if select.select([resumed.stderr], [], [], 0.5)[0]:
                line = resumed.stderr.readline()
                assert line, f"the member exited: {lines}"
                lines.append(line)
        assert any("resumed membership of site s" in line for line in lines), lines
    finally:
        resumed.send_signal(signal.SIGTERM)
        assert resumed.wait(timeout=30) == 0


def test_the_daemon_raises_its_own_descriptor_limit(tmp_path):
    """Started under the distribution's usual soft limit (1024), it runs with WANTED (or the
    hard limit, when lower) and says so in its log."""
    import resource

    from meshd.io.fdlimit import WANTED
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    expected = WANTED if hard == resource.RLIM_INFINITY else min(WANTED, hard)
    data = tmp_path / "n"
    daemon = subprocess.Popen([sys.executable, "-m", "meshd.cli.meshd_main", "run", "--data-dir", str(data),
                               "--site", "s", "--name", "n", "--no-mdns", "--listen", "127.0.0.1:0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard)))
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not (data / "admin.sock").exists():
            assert daemon.poll() is None and time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.1)
        limits = Path(f"/proc/{daemon.pid}/limits").read_text()
        soft = next(line.split()[3] for line in limits.splitlines() if line.startswith("Max open files"))
        assert int(soft) == expected
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=30)
    raised = [json.loads(line) for line in err.splitlines() if "file-descriptor limit" in line]
    assert raised and raised[0]["from"] == 1024 and raised[0]["to"] == expected
