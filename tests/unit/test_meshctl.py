"""Tests of meshctl (meshd.cli.meshctl, meshd.cli.render) against a real admin socket.

The daemon side is a scripted handler served by meshd.io.admin.serve_admin in a background
thread's trio loop; meshctl's main() runs in the test's thread, exactly as the command would.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import threading
from typing import Any

import pytest
import trio

from meshd.cli import meshctl, render
from meshd.io.admin import AdminError, AdminRequest, serve_admin

# Guards against a hang; never reached when the code works.
DEADLOCK_GUARD_S = 20

NODE_ID = "3f9a0c1e5b7d2a4c6e8f0a1b2c3d4e5f"
SPEC_TOML = '[app]\nname = "vibration-monitor"\nreplicas = 6\ncommand = ["sleep", "60"]\n'


class ScriptedDaemon:
    """Records every admin request; answers from a script: cmd -> (stream items, outcome)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.requests: list[tuple[str, dict]] = []
        self.script: dict[str, tuple[list[Any], Any]] = {}
        self.cancelled: list[str] = []
        self.handler_done = threading.Event()

    async def handler(self, request: AdminRequest, stream: Any) -> Any:
        self.requests.append((request.cmd, request.args))
        items, outcome = self.script.get(request.cmd, ([], None))
        try:
            for item in items:
                await stream.send(item)
            if outcome == "forever":
                await trio.sleep_forever()
        except trio.Cancelled:
            self.cancelled.append(request.cmd)
            raise
        finally:
            self.handler_done.set()
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


@pytest.fixture
def daemon(tmp_path):
    daemon = ScriptedDaemon(str(tmp_path / "admin.sock"))
    ready = threading.Event()
    loop: dict[str, Any] = {}

    async def serve() -> None:
        with trio.CancelScope() as scope:
            loop["scope"] = scope
            loop["token"] = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_admin, daemon.path, daemon.handler)
                ready.set()

    thread = threading.Thread(target=trio.run, args=(serve,), daemon=True)
    thread.start()
    assert ready.wait(DEADLOCK_GUARD_S), "admin server did not start"
    try:
        yield daemon
    finally:
        trio.from_thread.run_sync(loop["scope"].cancel, trio_token=loop["token"])
        thread.join(DEADLOCK_GUARD_S)


@pytest.fixture
def spec_file(tmp_path) -> str:
    path = tmp_path / "app.toml"
    path.write_text(SPEC_TOML)
    return str(path)


def run(daemon: ScriptedDaemon, *argv: str) -> int:
    return meshctl.main(["--socket", daemon.path, *argv])


# --- every command sends the right request ---------------------------------------

NODES = [
    {
        "node_id": NODE_ID,
        "name": "edge-1",
        "site": "factory-a",
        "state": "ready",
        "role": "leader",
        "address": "198.18.0.2:7700",
        "arch": "x86_64",
        "cpu_free": 1.5,
        "mem_free_mb": 512,
        "allocs": 2,
        "labels": {"line": "1"},
    }
]
APPS = [{"app": "vibration-monitor", "version": 2, "replicas": 6, "running": 4, "sites": ["a"]}]
ALLOCS = [
    {
        "alloc_id": "vibration-monitor-0-ab12",
        "app": "vibration-monitor",
        "version": 2,
        "node": "edge-1",
        "site": "factory-a",
        "state": "running",
        "pid": 4242,
        "restarts": 1,
    }
]
SITES = [{"site": "factory-a", "nodes": 3, "ready": 3, "last_sync_s": 2.4, "reachable": True}]
EVENTS = [{"ts": 1_700_000_000.0, "kind": "placement", "message": "placed replica 0 on edge-1"}]
AUDIT = [
    {"ts": 1_700_000_000.0, "actor": "uid:0@edge-1", "action": "deploy",
     "target": "vibration-monitor", "site": "factory-a"}
]
REVOCATIONS = [
    {"node_id": "ab" * 16, "name": "edge-2", "site": "factory-a", "by": "uid:0@edge-1", "at": 1_700_000_000.0,
     "reason": "stolen", "pending": False},
    {"node_id": "cd" * 16, "name": None, "site": "factory-b", "by": "uid:0@b-1", "at": 1_700_000_100.0,
     "reason": "lost in transit", "pending": True},
]
STATUS = {
    "node_id": NODE_ID, "name": "edge-1", "site": "factory-a", "role": "leader",
    "leader": "edge-1", "term": 3, "members": 3, "partitioned": False,
}
PLAN = {
    "app": "vibration-monitor",
    "placements": [{"node": "edge-1", "replica": 0}],
    "filtered": [{"node": "edge-2", "reason": "arch aarch64 not in [x86_64]"}],
}

# argv ("{spec}" is replaced by a spec file), expected cmd, expected args, scripted result,
# text the human rendering must contain.
COMMANDS = [
    (["status"], "status", {}, STATUS, ["role:", "leader", "partitioned:", "no"]),
    (["nodes"], "nodes", {"site": None}, NODES,
     ["NAME", "ID", "SITE", "STATE", "ROLE", "ADDRESS", "ARCH", "CPU FREE", "MEM FREE",
      "ALLOCS", "LABELS", NODE_ID[:12], "512 MiB", "line=1"]),
    (["nodes", "--site", "factory-a"], "nodes", {"site": "factory-a"}, NODES, ["edge-1"]),
    (["sites"], "sites", {}, SITES, ["SITE", "NODES", "READY", "LAST SYNC", "REACHABLE"]),
    (["token", "create"], "token_create", {"site": None, "ttl": None},
     {"token": "tok-123", "site": "factory-a", "expires_at": 1_700_000_600.0},
     ["token:", "tok-123", "expires_at:"]),
    (["token", "create", "--site", "factory-b", "--ttl", "600"], "token_create",
     {"site": "factory-b", "ttl": 600}, {"token": "tok-9", "site": "factory-b"}, ["tok-9"]),
    (["token", "create", "--site", "factory-c", "--new-site"], "token_create",
     {"site": "factory-c", "ttl": None, "new_site": True}, {"token": "tok-c", "site": "factory-c"}, ["tok-c"]),
    (["token", "ls"], "token_ls", {"all": False},
     [{"token_id": "0123456789abcdef", "site": "factory-a", "state": "active", "founds_site": False,
       "created_by": "op", "created_at": 1_700_000_000.0, "expires_at": 1_700_003_600.0, "used_by": None,
       "revoked_by": None}], ["ID", "STATE", "EXPIRES", "0123456789abcdef", "active"]),
    (["node", "remove", "edge-3"], "node_remove", {"node": "edge-3"},
     {"node": "edge-3", "node_id": "ab" * 16, "removed": True, "promoted": "edge-6"}, ["removed:", "promoted:", "edge-6"]),
    (["token", "revoke", "0123"], "token_revoke", {"token": "0123"},
     {"token_id": "0123456789abcdef", "revoked": True}, ["revoked:", "yes"]),
    (["deploy", "{spec}"], "deploy", {"spec_toml": SPEC_TOML, "wait": False, "timeout": None},
     {"app": "vibration-monitor", "version": 2, "accepted": True},
     ["app:", "vibration-monitor", "accepted:", "yes"]),
    (["deploy", "{spec}", "--wait", "--timeout", "30"], "deploy",
     {"spec_toml": SPEC_TOML, "wait": True, "timeout": 30.0},
     {"app": "vibration-monitor", "version": 2, "accepted": True, "running": 6, "replicas": 6},
     ["running:", "replicas:"]),
    (["plan", "{spec}"], "plan", {"spec_toml": SPEC_TOML, "what_if": []}, PLAN,
     ["NODE", "REPLICA", "REASON", "arch aarch64 not in [x86_64]"]),
    (["apps"], "apps", {}, APPS, ["APP", "VERSION", "STATUS", "RUNNING/REPLICAS", "SITES", "4/6"]),
    (["apps", "--all"], "apps", {"all": True}, APPS, ["APP"]),
    (["allocs"], "allocs", {"app": None, "node": None}, ALLOCS,
     ["ALLOC", "APP", "VERSION", "NODE", "STATE", "PID", "RESTARTS", "REASON", "4242"]),
    (["allocs", "--app", "vibration-monitor", "--node", "edge-1"], "allocs",
     {"app": "vibration-monitor", "node": "edge-1"}, ALLOCS, ["running"]),
    (["stop", "vibration-monitor"], "stop", {"app": "vibration-monitor"},
     {"app": "vibration-monitor", "stopped": True}, ["stopped:", "yes"]),
    (["drain", "edge-1"], "drain", {"node": "edge-1"}, {"node": "edge-1", "state": "draining"},
     ["state:", "draining"]),
    (["undrain", "edge-1"], "undrain", {"node": "edge-1"}, {"node": "edge-1", "state": "ready"},
     ["ready"]),
    (["revoke", "edge-2", "--reason", "stolen"], "revoke", {"node": "edge-2", "reason": "stolen"}, {"node": "edge-2", "revoked": True},
     ["revoked:"]),
    (["logs", "vibration-monitor-0-ab12"], "logs",
     {"alloc": "vibration-monitor-0-ab12", "follow": False, "lines": None},
     {"data": "hello\n"}, ["hello"]),
    (["logs", "a1", "--follow", "--tail", "100"], "logs",
     {"alloc": "a1", "follow": True, "lines": 100}, {"data": ""}, []),
    (["events"], "events", {"follow": False, "since": None}, EVENTS,
     ["TIME", "KIND", "MESSAGE", "placement", "placed replica 0 on edge-1"]),
    (["events", "--follow"], "events", {"follow": True, "since": None}, EVENTS, ["placed replica 0"]),
    (["audit"], "audit", {}, AUDIT, ["TIME", "ACTOR", "ACTION", "TARGET", "SITE", "uid:0@edge-1"]),
    (["revocations"], "revocations", {}, REVOCATIONS,
     ["NODE", "ISSUED IN", "BY", "LIST", "REASON", "edge-2", "listed", "cdcdcdcdcdcd", "taking in", "lost in transit"]),
]


def expand(argv: list[str], spec: str) -> list[str]:
    return [spec if a == "{spec}" else a for a in argv]


@pytest.mark.parametrize("argv, cmd, args, result, shown", COMMANDS)
def test_command_sends_request_and_renders(daemon, spec_file, capsys, argv, cmd, args, result, shown):
    daemon.script[cmd] = ([], result)
    assert run(daemon, *expand(argv, spec_file)) == 0
    assert daemon.requests == [(cmd, args)]
    out, err = capsys.readouterr()
    assert err == ""
    for text in shown:
        assert text in out


@pytest.mark.parametrize("argv, cmd, args, result, shown", COMMANDS)
@pytest.mark.parametrize("where", ["before", "after"])
def test_json_prints_exactly_the_result(daemon, spec_file, capsys, argv, cmd, args, result, shown,
                                        where):
    daemon.script[cmd] = ([], result)
    argv = expand(argv, spec_file)
    full = ["--json", *argv] if where == "before" else [*argv, "--json"]
    assert run(daemon, *full) == 0
    assert daemon.requests == [(cmd, args)]
    out, err = capsys.readouterr()
    assert err == ""
    if "--follow" in argv and cmd == "events":  # a follow stream: one document per line
        assert [json.loads(line) for line in out.splitlines()] == result
    elif "--follow" in argv:
        assert [json.loads(line) for line in out.splitlines()] == [result]
    else:
        assert json.loads(out) == result


def test_human_tables_are_aligned(daemon, capsys):
    daemon.script["nodes"] = ([], NODES + [{**NODES[0], "name": "a-much-longer-name",
                                            "node_id": "ff" * 16, "labels": {}}])
    assert run(daemon, "nodes") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    starts = [line.index(NODE_ID[:12]) if NODE_ID[:12] in line else line.index("ID")
              for line in lines[:2]]
    assert starts[0] == starts[1] == lines[2].index("ffffffffffff")
    assert NODE_ID not in "\n".join(lines)  # ids are shortened


# --- streams -----------------------------------------------------------------------

PROGRESS = [
    {"app": "vibration-monitor", "version": 2, "replicas": 6, "running": 2, "allocs": []},
    {"app": "vibration-monitor", "version": 2, "replicas": 6, "running": 2, "allocs": []},
    {"app": "vibration-monitor", "version": 2, "replicas": 6, "running": 4, "allocs": []},
    {"app": "vibration-monitor", "version": 2, "replicas": 6, "running": 6, "allocs": []},
]
DEPLOYED = {"app": "vibration-monitor", "version": 2, "accepted": True, "running": 6,
            "replicas": 6}


def test_deploy_wait_shows_one_progress_line_per_change(daemon, spec_file, capsys):
    daemon.script["deploy"] = (PROGRESS, DEPLOYED)
    assert run(daemon, "deploy", spec_file, "--wait") == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        "vibration-monitor v2: 2/6 running",
        "vibration-monitor v2: 4/6 running",
        "vibration-monitor v2: 6/6 running",
    ]
    assert "accepted: yes" in out
    assert daemon.requests[0][1]["wait"] is True


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_deploy_wait_rewrites_progress_in_place_on_a_tty(daemon, spec_file, capsys, monkeypatch):
    tty = FakeTTY()
    monkeypatch.setattr("sys.stderr", tty)
    daemon.script["deploy"] = (PROGRESS, DEPLOYED)
    assert run(daemon, "deploy", spec_file, "--wait") == 0
    shown = tty.getvalue()
    assert shown.count("\r") == 3
    assert "\rvibration-monitor v2: 2/6 running\x1b[K\rvibration-monitor v2: 4/6" in shown
    assert shown.endswith("6/6 running\x1b[K\n")
    assert "\n" not in shown[:-1]


def test_deploy_wait_json_keeps_stdout_one_document(daemon, spec_file, capsys):
    daemon.script["deploy"] = (PROGRESS, DEPLOYED)
    assert run(daemon, "--json", "deploy", spec_file, "--wait") == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == DEPLOYED
    assert err == ""


def test_logs_follow_writes_stream_raw(daemon, capsys):
    daemon.script["logs"] = ([{"data": "line 1\n"}, {"data": "line 2\npart"}], {"data": "ial\n"})
    assert run(daemon, "logs", "a1", "--follow") == 0
    assert capsys.readouterr().out == "line 1\nline 2\npartial\n"


def test_logs_are_printed_raw(daemon, capsys):
    daemon.script["logs"] = ([], {"data": "no newline at end"})
    assert run(daemon, "logs", "a1") == 0
    assert capsys.readouterr().out == "no newline at end"


def test_an_unchanged_deploy_says_so(daemon, spec_file, capsys):
    daemon.script["deploy"] = ([], {"app": "web", "version": 3, "accepted": True, "changed": False, "sites": ["s"]})
    assert run(daemon, "deploy", spec_file) == 0
    assert capsys.readouterr().out.startswith("web v3 unchanged: this spec already runs there; nothing was written")


def test_a_long_log_in_pieces_prints_as_one_text_and_one_json_document(daemon, capsys):
    daemon.script["logs"] = ([{"data": "piece 1\n"}, {"data": "piece 2\n"}], {"data": "last\n"})
    assert run(daemon, "logs", "a1") == 0
    assert capsys.readouterr().out == "piece 1\npiece 2\nlast\n"
    assert run(daemon, "logs", "a1", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"data": "piece 1\npiece 2\nlast\n"}


@pytest.mark.parametrize("tail", ["1000001", "-1", "ten"])
def test_a_tail_out_of_range_is_a_usage_error_before_the_daemon_is_asked(daemon, capsys, tail):
    assert run(daemon, "logs", "a1", "--tail", tail) == 2
    assert "--tail" in capsys.readouterr().err and daemon.requests == []


def test_events_since_takes_epoch_seconds_or_an_iso_time(daemon, capsys):
    daemon.script["events"] = ([], [])
    assert run(daemon, "events", "--since", "1700000000.5") == 0
    assert run(daemon, "events", "--since", "2023-11-14T22:13:20+00:00", "--follow") == 0
    assert daemon.requests == [("events", {"follow": False, "since": 1700000000.5}),
                               ("events", {"follow": True, "since": 1700000000.0})]
    assert run(daemon, "events", "--since", "yesterday") == 2
    assert "--since" in capsys.readouterr().err and len(daemon.requests) == 2


def test_events_after_seq_takes_an_event_number(daemon, capsys):
    daemon.script["events"] = ([], [])
    assert run(daemon, "events", "--after-seq", "-3") == 2
    assert "--after-seq" in capsys.readouterr().err and daemon.requests == []
    assert run(daemon, "events", "--after-seq", "41", "--follow") == 0
    assert daemon.requests == [("events", {"follow": True, "since": None, "after_seq": 41})]


def test_events_follow_prints_one_line_per_event(daemon, capsys):
    streamed = [
        {"ts": 1_700_000_001.0, "kind": "node", "message": "edge-2 is down"},
        {"ts": 1_700_000_002.0, "kind": "alloc", "message": "replaced replica 3"},
    ]
    daemon.script["events"] = (streamed, [])
    assert run(daemon, "events", "--follow") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert "node" in lines[0] and "edge-2 is down" in lines[0]
    assert lines[0].startswith(render.local_time(1_700_000_001.0))

    assert run(daemon, "events", "--follow", "--json") == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == streamed


# --- errors ------------------------------------------------------------------------


def test_a_plan_that_cannot_place_a_replica_shows_why_and_exits_1(daemon, spec_file, capsys):
    unplaceable = {**PLAN, "unplaced": [{"replica": 1, "reason": "no node has 2.0 cpu free"},
                                        {"replica": 2, "reason": "no node has 2.0 cpu free"}]}
    daemon.script["plan"] = ([], unplaceable)
    assert run(daemon, "plan", spec_file) == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[lines.index("Cannot place:") + 1].split() == ["REPLICA", "REASON"]
    assert lines[-1].split(None, 1) == ["2", "no node has 2.0 cpu free"]
    assert err == "error: 2 of 3 replicas cannot be placed: no node has 2.0 cpu free\n"
    assert run(daemon, "--json", "plan", spec_file) == 1  # scripts see the plan, and the status
    assert json.loads(capsys.readouterr().out) == unplaceable


def test_error_frame_exits_1_with_one_line(daemon, capsys):
    daemon.script["stop"] = ([], AdminError("no such app 'web'"))
    assert run(daemon, "stop", "web") == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "error: no such app 'web'\n"


def test_error_frame_with_json_still_one_line_on_stderr(daemon, capsys):
    daemon.script["drain"] = ([], AdminError("unknown node 'x'\nsecond line"))
    assert run(daemon, "--json", "drain", "x") == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "error: unknown node 'x' second line\n"


def test_missing_socket_is_a_clear_error(tmp_path, capsys):
    path = str(tmp_path / "absent.sock")
    assert meshctl.main(["--socket", path, "status"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"error: cannot reach meshd at {path}: No such file or directory; "
        "is the daemon running?\n"
    )


@pytest.mark.parametrize("make", ["missing", "directory", "not-utf8"])
def test_unreadable_spec_fails_without_contacting_daemon(daemon, tmp_path, capsys, make):
    path = tmp_path / "spec.toml"
    if make == "directory":
        path.mkdir()
    elif make == "not-utf8":
        path.write_bytes(b"\xff\xfe[app]")
    for command in ("deploy", "plan"):
        assert run(daemon, command, str(path)) == 1
        out, err = capsys.readouterr()
        assert out == ""
        assert err.startswith(f"error: cannot read {path}: ")
        assert err.count("\n") == 1
    assert daemon.requests == []


def test_deploy_reads_stdin_for_dash(daemon, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(SPEC_TOML))
    daemon.script["deploy"] = ([], DEPLOYED)
    assert run(daemon, "deploy", "-") == 0
    assert daemon.requests[0][1]["spec_toml"] == SPEC_TOML


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["deploy"],
        ["token"],
        ["stop"],
        ["token", "create", "--ttl", "0"],
        ["token", "create", "--ttl", "soon"],
        ["deploy", "x.toml", "--timeout", "-1"],
        ["logs", "a1", "--tail", "-5"],
    ],
)
def test_usage_errors_exit_2_without_contacting_daemon(daemon, capsys, argv):
    assert run(daemon, *argv) == 2
    assert "usage:" in capsys.readouterr().err
    assert daemon.requests == []


def test_help_exits_0(capsys):
    assert meshctl.main(["--help"]) == 0
    assert "deploy" in capsys.readouterr().out


def test_socket_from_environment_then_default(daemon, monkeypatch, capsys):
    monkeypatch.setenv("MESHD_SOCKET", daemon.path)
    daemon.script["status"] = ([], STATUS)
    assert meshctl.main(["status"]) == 0
    assert daemon.requests == [("status", {})]

    monkeypatch.delenv("MESHD_SOCKET")
    opts = meshctl.build_parser().parse_args(["status"])
    assert meshctl.socket_path(opts) == "/var/lib/meshd/admin.sock"
    opts = meshctl.build_parser().parse_args(["--socket", "/run/x.sock", "status"])
    assert meshctl.socket_path(opts) == "/run/x.sock"


class InterruptingStdout(io.StringIO):
    """Stands for a terminal where the operator presses Ctrl-C while output arrives."""

    def __init__(self, exc: type[BaseException]) -> None:
        super().__init__()
        self.exc = exc

    def write(self, text: str) -> int:
        raise self.exc()


@pytest.mark.parametrize(
    "exc, code", [(KeyboardInterrupt, 130), (BrokenPipeError, 141)]
)
def test_follow_interrupted_exits_quietly_and_daemon_cancels(daemon, capsys, monkeypatch, exc,
                                                             code):
    daemon.script["logs"] = ([{"data": "first\n"}], "forever")
    monkeypatch.setattr("sys.stdout", InterruptingStdout(exc))
    assert run(daemon, "logs", "a1", "--follow") == code
    assert capsys.readouterr().err == ""
    assert daemon.handler_done.wait(DEADLOCK_GUARD_S)
    assert daemon.cancelled == ["logs"]


# --- rendering ---------------------------------------------------------------------


def test_table_aligns_columns_and_marks_missing_values():
    text = render.table(
        [{"a": "x", "b": 1}, {"a": "longer", "b": None}],
        [("A", "a"), ("B", "b"), ("A+B", lambda r: f"{r['a']}{r['b']}")],
    )
    assert text.splitlines() == [
        "A       B  A+B",
        "x       1  x1",
        "longer  -  longerNone",
    ]


def test_table_of_nothing_is_its_header():
    assert render.table([], render.APP_COLUMNS) == "APP  VERSION  STATUS  RUNNING/REPLICAS  SITES  PER SITE  CONFLICTS"


@pytest.mark.parametrize(
    "value, shown",
    [
        (None, "-"),
        ("", "-"),
        (True, "yes"),
        (False, "no"),
        (1.5, "1.5"),
        (2.0, "2"),
        (0.125, "0.12"),
        (7, "7"),
        ({"line": "1", "zone": "b"}, "line=1,zone=b"),
        ({}, "-"),
        (["a", "b"], "a,b"),
        ([], "-"),
        ("evil\x1b[2Jname", "evil\\x1b[2Jname"),
        ("two\nlines", "two\\nlines"),
    ],
)
def test_cell(value, shown):
    assert render.cell(value) == shown


def test_key_values_puts_known_keys_first():
    text = render.key_values({"extra": 1, "role": "leader", "name": "edge-1"},
                             order=("name", "role"))
    assert text.splitlines() == ["name:  edge-1", "role:  leader", "extra: 1"]


def test_local_time_is_local_iso():
    ts = 1_700_000_000.5
    expected = dt.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")
    assert render.local_time(ts) == expected
    assert render.local_time(None) == "-"
    assert render.local_time("yesterday") == "yesterday"


def test_plan_rendering_has_both_tables():
    lines = render.plan(PLAN).splitlines()
    assert lines[0] == "app: vibration-monitor"
    assert "Placements:" in lines and "Filtered:" in lines
    assert lines[lines.index("Filtered:") + 1].split() == ["NODE", "REASON"]
    assert lines[-1].split(None, 1) == ["edge-2", "arch aarch64 not in [x86_64]"]


def test_deploy_progress_line():
    assert render.deploy_progress(PROGRESS[2]) == "vibration-monitor v2: 4/6 running"
