"""`meshctl`: the operator's command line, a client of the local daemon's admin socket.

Invariants:
- Each invocation sends exactly one admin request (`cmd`, `args`) and renders its answer.
  Local problems (an unreadable spec file, bad options) are reported before the daemon is
  contacted.
- With `--json`, stdout carries one JSON document (the final result) and nothing else;
  `--follow` streams are the exception by nature: one JSON document per line.
- Errors are one line `error: <reason>` on stderr with exit status 1; usage errors exit 2
  (argparse); Ctrl-C exits 130 without a traceback.
- Progress (`deploy --wait`) goes to stderr, never stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import stat
import sys
import time
import tomllib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from meshd.cli import render
from meshd.io.adminclient import AdminError, AdminUnavailable, admin_call_sync

DEFAULT_SOCKET = "/var/lib/meshd/admin.sock"
SOCKET_ENV = "MESHD_SOCKET"

# A one-shot request the daemon has not answered in this time will not be answered: say so
# rather than hang. Streams (--follow, --wait without --timeout) have no client deadline.
ONE_SHOT_TIMEOUT_S = 60.0
# With `deploy --wait --timeout S` the daemon reports the timeout itself; the client waits
# this much longer so that report, not a bare client timeout, is what the operator sees.
WAIT_GRACE_S = 10.0

# `top --watch` refreshes this often: the CPU figures are measured between two readings,
# which the node takes no closer than meshd.usage.MIN_INTERVAL.
WATCH_PERIOD = 2.0
CLEAR_SCREEN = "\x1b[H\x1b[2J"  # cursor home, clear: a refreshed table in place
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as for `meshctl logs ... | head`


class CliError(Exception):
    """A problem found before or after talking to the daemon; shown as `error: ...`."""


@dataclass
class Request:
    cmd: str
    args: dict
    timeout: float | None = ONE_SHOT_TIMEOUT_S
    follow: bool = False
    fds: tuple[int, ...] = ()  # files passed with it (`artifact push`, `deploy` of a spec with files)


@dataclass
class Output:
    """Where results go; stdout/stderr are looked up at call time so callers may swap them."""

    json_mode: bool
    progress_line: str | None = None
    progress_on_tty: bool = False

    @property
    def out(self):
        return sys.stdout

    @property
    def err(self):
        return sys.stderr

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def json_line(self, value: Any) -> None:
        self.write(json.dumps(value, separators=(",", ":")) + "\n")

    def document(self, value: Any) -> None:
        self.write(json.dumps(value, indent=2) + "\n")

    def progress(self, line: str) -> None:
        """Show a progress line on stderr: rewritten in place on a TTY, one per change else."""
        if line == self.progress_line:
            return
        self.progress_line = line
        err = self.err
        on_tty = _isatty(err)
        if self.json_mode and not on_tty:
            return  # scripts read stderr for the one error line; keep it clean
        if on_tty:
            err.write("\r" + line + "\x1b[K")
            self.progress_on_tty = True
        else:
            err.write(line + "\n")
        err.flush()

    def end_progress(self) -> None:
        if self.progress_on_tty:
            self.err.write("\n")
            self.err.flush()
            self.progress_on_tty = False


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# --- argument parsing ----------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


# The daemon's bound on --tail (meshd.io.logview.MAX_TAIL_LINES: not imported, to keep the
# CLI's start-up light); checked here too so the mistake is a usage error at once.
MAX_TAIL_LINES = 1_000_000


def _tail_lines(text: str) -> int:
    value = _non_negative_int(text)
    if value > MAX_TAIL_LINES:
        raise argparse.ArgumentTypeError(f"at most {MAX_TAIL_LINES} lines, got {value}")
    return value


def _since(text: str) -> float:
    """A time: seconds since the epoch, or ISO 8601 (without an offset: local time)."""
    try:
        value = float(text)
    except ValueError:
        import datetime
        try:
            value = datetime.datetime.fromisoformat(text).timestamp()
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected seconds since the epoch or an ISO 8601 time, "
                                             f"got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a time after 1970, got {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshctl",
        description="Operate a meshd mesh through the local daemon's admin socket.",
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help=f"admin socket (default: ${SOCKET_ENV}, then {DEFAULT_SOCKET})",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the result as one JSON document"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, build: Callable, show: Callable, parent=commands):
        sub = parent.add_parser(name, help=help_text, description=help_text)
        # Operators type --json anywhere; a separate dest keeps argparse from resetting
        # the global flag when the subcommand's default is applied.
        sub.add_argument("--json", dest="json_after", action="store_true", help=argparse.SUPPRESS)
        sub.set_defaults(build=build, show=show)
        return sub

    command("status", "this node: role, leader, term, quorum", _build_status, _show_status)

    sub = command("nodes", "members known to this node", _build_nodes, _show_nodes)
    sub.add_argument("--site", metavar="S", help="only members of site S")

    command("sites", "every site known through cross-site sync", _build_sites, _show_sites)
    sub = command("document", "this node's replica of the mesh document: size, records, sync sessions",
                  _build_document, _generic_show)
    sub.add_argument("--since", metavar="HEX", help="also give the size of the delta a replica at this state "
                     "vector (hex, as this command prints it) would need")
    sub.add_argument("--brief", action="store_true", help="only the state vector and the sessions (no size or "
                     "record counts, which cost the daemon a pass over the whole document)")
    sub.add_argument("--compact", action="store_true", help="compact the replica now (history, and records older "
                     "than --document-retention, dropped) into a new epoch, which every replica takes on")

    command("metrics", "this daemon's Prometheus exposition, as text (what --metrics serves over HTTP)",
            _build_metrics, _show_metrics)

    token = commands.add_parser("token", help="join tokens", description="join tokens")
    token_commands = token.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    sub = command(
        "create", "create a single-use join token", _build_token_create, _show_object,
        parent=token_commands,
    )
    sub.add_argument("--site", metavar="S", help="site the token admits to (default: this one)")
    sub.add_argument("--new-site", action="store_true",
                     help="the site does not exist yet: the token's holder founds it in this mesh")
    sub.add_argument("--ttl", metavar="SECONDS", type=_positive_int, help="lifetime in seconds")
    sub = command("ls", "join tokens that may still be used (--all: used, expired and revoked ones too)",
                  _build_token_ls, _show_tokens, parent=token_commands)
    sub.add_argument("--all", action="store_true", help="also used, expired and revoked tokens")
    sub = command("revoke", "withdraw a join token before it is used", _build_token_revoke, _show_object,
                  parent=token_commands)
    sub.add_argument("token", metavar="ID", help="the token id (as `token ls` shows it, or a unique prefix), "
                     "or the whole token")

    policy = commands.add_parser("policy", help="attestation reference values",
                                 description="attestation reference values: which meshd software may join")
    policy_commands = policy.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    command("show", "the policy in force, and this node's own measurement", _build_policy_show, _generic_show,
            parent=policy_commands)
    sub = command("allow", "allow a meshd version and package digest (before upgrading nodes to it)",
                  _build_policy_allow, _show_object, parent=policy_commands)
    sub.add_argument("--version", metavar="V", help="meshd version (default: this node's)")
    sub.add_argument("--digest", metavar="SHA256", help="package digest, as `policy show` prints it on a node "
                     "running that version (default: this node's)")
    sub = command("release-key", "trust an offline release key's artifact manifests (--remove to stop)",
                  _build_policy_release_key, _show_object, parent=policy_commands)
    sub.add_argument("key", metavar="PUBLIC_KEY", help="64 hex digits, as `meshctl artifact keygen` prints them")
    sub.add_argument("--remove", action="store_true", help="stop trusting it")
    sub = command("require-tpm", "require TPM-backed evidence from every member of a site (--off to stop)",
                  _build_policy_require_tpm, _show_object, parent=policy_commands)
    sub.add_argument("--site", metavar="S", help="the site (default: this node's)")
    sub.add_argument("--off", action="store_true", help="accept software-only evidence again")
    sub.add_argument("--force", action="store_true",
                     help="even when it will expel every voter or every member of the site (they have no TPM)")

    artifact = commands.add_parser("artifact", help="files workloads need: signed, content-addressed",
                                   description="files workloads need: signed, content-addressed, shared inside a site")
    artifact_commands = artifact.add_subparsers(dest="artifact_command", metavar="ACTION", required=True)
    sub = command("push", "store a file in the mesh, signed (its digest names it)", _build_artifact_push,
                  _show_object, parent=artifact_commands)
    sub.add_argument("file", metavar="FILE", help="the file")
    sub.add_argument("--name", metavar="N", help="its name (default: the file's name)")
    sub.add_argument("--manifest", metavar="JSON", help="a manifest signed offline with a release key "
                     "(`meshctl artifact sign`), instead of one signed by a voter")
    command("ls", "artifacts known to this site, who holds them, what pins them", _build_artifact_ls,
            _show_artifacts, parent=artifact_commands)
    sub = command("keygen", "make an offline release key (no daemon needed): prints its public key",
                  _build_artifact_keygen, _show_object, parent=artifact_commands)
    sub.add_argument("key_file", metavar="KEY_FILE", help="where the private key goes (0600; never overwritten)")
    sub = command("sign", "sign a file's manifest with a release key, offline (no daemon needed)",
                  _build_artifact_sign, _show_object, parent=artifact_commands)
    sub.add_argument("file", metavar="FILE", help="the file")
    sub.add_argument("--key", metavar="KEY_FILE", required=True, help="the release key (`artifact keygen`)")
    sub.add_argument("--mesh", metavar="MESH_ID", required=True, help="the mesh it is for (`policy show`)")
    sub.add_argument("--name", metavar="N", help="its name (default: the file's name)")
    sub.add_argument("--out", metavar="JSON", help="where the manifest goes (default: FILE.manifest.json)")
    sub = command("rm", "forget an artifact no app version pins", _build_artifact_rm, _show_object,
                  parent=artifact_commands)
    sub.add_argument("digest", metavar="DIGEST", help="sha256:<hex> (or a unique prefix of its hex)")

    sub = command("deploy", "submit or update an app (TOML)", _build_deploy, _show_deploy)
    sub.add_argument("file", metavar="FILE", help="app spec; - reads stdin")
    sub.add_argument("--wait", action="store_true", help="show the deployment's progress until every replica "
                     "of the new version is healthy; exit non-zero when it fails or is reverted")
    sub.add_argument(
        "--timeout", metavar="S", type=_positive_seconds, help="give up waiting after S seconds"
    )

    sub = command("plan", "dry run: where deploy would place an app", _build_plan, _show_plan)
    sub.add_argument("file", metavar="FILE", help="app spec; - reads stdin")
    sub.add_argument("--what-if", metavar="CHANGE", action="append", default=[],
                     help="answer as if this had happened: down:NODE, drain:NODE or cut:SITE (repeatable); "
                          "shows what would move where")

    sub = command("apps", "every app, desired vs running", _build_apps, _show_apps)
    sub.add_argument("--all", action="store_true", help="stopped apps too")

    sub = command("allocs", "workload instances", _build_allocs, _show_allocs)
    sub.add_argument("--app", metavar="A", help="only allocations of app A")
    sub.add_argument("--node", metavar="N", help="only allocations on node N")

    sub = command("top", "what this site's workloads use now: CPU, memory against their limits, restarts",
                  _build_top, _show_top)
    sub.add_argument("--watch", "-w", action="store_true",
                     help=f"refresh every {WATCH_PERIOD:g} s until Ctrl-C (with --json: one document a line)")

    sub = command("stop", "remove an app", _build_stop, _show_object)
    sub.add_argument("app", metavar="APP")

    sub = command("deployments", "current and recent deployments, per site", _build_deployments,
                  _show_deployments)
    sub.add_argument("app", metavar="APP", nargs="?", help="only this app's")
    sub = command("history", "every kept version of an app", _build_history, _show_history)
    sub.add_argument("app", metavar="APP")
    sub = command("rollback", "deploy an earlier version's spec again", _build_rollback, _show_object)
    sub.add_argument("app", metavar="APP")
    sub.add_argument("--to", metavar="V", type=_positive_int,
                     help="the version (default: the newest stable one before the current)")
    for name, help_text in (
        ("promote", "let the canaries' version replace the rest"),
        ("pause", "hold a deployment: no new replica starts"),
        ("resume", "go on with a paused deployment"),
        ("cancel", "abandon a deployment and return to the last stable version"),
    ):
        sub = command(name, help_text, _build_app_move(name), _show_object)
        sub.add_argument("app", metavar="APP")
        sub.add_argument("--reason", metavar="TEXT", default="", help="why (kept in events and audit)")
    for name, help_text in (
        ("pin", "keep a version in the history whatever keep_versions says"),
        ("unpin", "let a pinned version be forgotten again"),
    ):
        sub = command(name, help_text, _build_pin(name), _show_object)
        sub.add_argument("app", metavar="APP")
        sub.add_argument("version", metavar="V", type=_positive_int)
    for name, help_text in (
        ("drain", "move work off a node"),
        ("undrain", "allow work back onto a node"),
    ):
        sub = command(name, help_text, _build_node_action(name), _show_object)
        sub.add_argument("node", metavar="NODE")
    node = commands.add_parser("node", help="members of the site", description="members of the site")
    node_commands = node.add_subparsers(dest="node_command", metavar="ACTION", required=True)
    sub = command("remove", "forget a member gone for good (down or left), without revoking it",
                  _build_node_remove, _show_object, parent=node_commands)
    sub.add_argument("node", metavar="NODE")
    sub = command("revoke", "expel a member everywhere, for good", _build_revoke, _show_object)
    sub.add_argument("node", metavar="NODE")
    sub.add_argument("--reason", metavar="TEXT", default="", help="why (kept in the revocation list and audit)")
    sub.add_argument("--force", action="store_true",
                     help="revoke even the last voter or the last member of its site")

    command("revocations", "nodes revoked anywhere in the mesh", _build_revocations, _show_revocations)

    sub = command("logs", "workload output", _build_logs, _show_logs)
    sub.add_argument("alloc", metavar="ALLOC")
    sub.add_argument("--follow", "-f", action="store_true", help="keep printing new output")
    sub.add_argument("--tail", metavar="N", type=_tail_lines, help="last N lines only")

    sub = command("events", "placement, membership, attestation, sync events",
                  _build_events, _show_events)
    sub.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    sub.add_argument("--since", metavar="TS", type=_since,
                     help="only events after TS (seconds since the epoch, as --json prints `ts`, or an "
                          "ISO 8601 time): resumes a stream where it was left")
    sub.add_argument("--after-seq", metavar="SEQ", type=_non_negative_int,
                     help="only the site's events numbered after SEQ (the `seq` --json prints), with a "
                          "`skipped` line for any no longer kept: resumes a stream exactly")
    sub.add_argument("--kind", action="append", metavar="KIND", dest="kinds",
                     help="only events of this kind (repeatable): alloc, app, placement, node, membership, "
                          "attestation, deployment, sync, token, ...")
    sub.add_argument("--app", metavar="APP", help="only events about app APP")
    sub.add_argument("--node", metavar="NODE", help="only events about node NODE, or written by it")

    command("audit", "who did what, where, when", _build_audit, _show_audit)
    return parser


# --- requests ----------------------------------------------------------------------


def _build_status(opts: argparse.Namespace) -> Request:
    return Request("status", {})


def _build_nodes(opts: argparse.Namespace) -> Request:
    return Request("nodes", {"site": opts.site})


def _build_sites(opts: argparse.Namespace) -> Request:
    return Request("sites", {})


def _build_document(opts: argparse.Namespace) -> Request:
    return Request("document", {"since": opts.since, "brief": opts.brief, "compact": opts.compact})


def _build_top(opts: argparse.Namespace) -> Request:
    return Request("top", {})


def _show_top(result: Any, opts: argparse.Namespace) -> str:
    if isinstance(result, list):
        return render.table(result, render.TOP_COLUMNS)
    return _generic(result)


def _build_metrics(opts: argparse.Namespace) -> Request:
    return Request("metrics", {})


def _show_metrics(result: Any, opts: argparse.Namespace) -> str:
    return result if isinstance(result, str) else _generic(result)


def _build_token_create(opts: argparse.Namespace) -> Request:
    return Request("token_create", {"site": opts.site, "ttl": opts.ttl,
                                    **({"new_site": True} if opts.new_site else {})})


def _build_revoke(opts: argparse.Namespace) -> Request:
    return Request("revoke", {"node": opts.node, "reason": opts.reason, **({"force": True} if opts.force else {})})


def _build_node_remove(opts: argparse.Namespace) -> Request:
    return Request("node_remove", {"node": opts.node})


def _build_token_ls(opts: argparse.Namespace) -> Request:
    return Request("token_ls", {"all": opts.all})


def _build_token_revoke(opts: argparse.Namespace) -> Request:
    return Request("token_revoke", {"token": opts.token})


def _build_policy_show(opts: argparse.Namespace) -> Request:
    return Request("policy", {})


def _build_policy_require_tpm(opts: argparse.Namespace) -> Request:
    return Request("policy_require_tpm", {"site": opts.site, "required": not opts.off,
                                          **({"force": True} if opts.force else {})})


def _build_policy_allow(opts: argparse.Namespace) -> Request:
    return Request("policy_allow", {"version": opts.version, "digest": opts.digest})


def _generic_show(result: Any, opts: argparse.Namespace) -> str:
    return _generic(result)


def _read_text(path: str) -> str:
    try:
        if path == "-":
            return sys.stdin.read()
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise CliError(f"cannot read {path}: not UTF-8 text (byte {exc.start})") from None


def _open_file(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CliError(f"cannot push {path}: not a regular file")
    return fd


def _build_artifact_push(opts: argparse.Namespace) -> Request:
    args: dict = {"name": opts.name or os.path.basename(opts.file)}
    if opts.manifest:
        args["manifest"] = _read_json(opts.manifest)
    return Request("artifact_push", args, timeout=None, fds=(_open_file(opts.file),))


def _read_json(path: str) -> Any:
    try:
        return json.loads(_read_text(path))
    except ValueError as exc:
        raise CliError(f"cannot read {path}: not JSON ({exc})") from None


@dataclass
class Local:
    """A command answered here, without the daemon (offline signing)."""
    result: Any


def _build_artifact_keygen(opts: argparse.Namespace) -> Local:
    from meshd.io.offlinesign import keygen, OfflineError
    try:
        return Local(keygen(opts.key_file))
    except OfflineError as exc:
        raise CliError(str(exc)) from None


def _build_artifact_sign(opts: argparse.Namespace) -> Local:
    from meshd.io.offlinesign import sign_file, OfflineError
    try:
        return Local(sign_file(opts.file, opts.key, opts.mesh, opts.name, opts.out))
    except OfflineError as exc:
        raise CliError(str(exc)) from None


def _build_policy_release_key(opts: argparse.Namespace) -> Request:
    return Request("policy_release_key", {"key": opts.key, "remove": opts.remove})


def _build_artifact_ls(opts: argparse.Namespace) -> Request:
    return Request("artifact_ls", {})


def _build_artifact_rm(opts: argparse.Namespace) -> Request:
    return Request("artifact_rm", {"digest": opts.digest})


def _spec_files(text: str, spec_path: str) -> tuple[list[str], tuple[int, ...]]:
    """The `file = ...` of a spec's artifacts, opened (relative to the spec): the daemon
    pushes them and pins their digests. A spec that does not parse is the daemon's to refuse."""
    try:
        doc = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError, RecursionError):
        return [], ()
    items = doc.get("app", {}).get("artifact", []) if isinstance(doc.get("app"), dict) else []
    files = [item["file"] for item in items if isinstance(item, dict) and isinstance(item.get("file"), str)]
    if files and spec_path == "-":
        raise CliError("a spec with artifact files must be read from a file (they are relative to it), not stdin")
    base = os.path.dirname(os.path.abspath(spec_path)) if spec_path != "-" else ""
    fds = []
    try:
        for name in files:
            fds.append(_open_file(os.path.join(base, name)))
    except CliError:
        for fd in fds:
            os.close(fd)
        raise
    return files, tuple(fds)


def _build_deploy(opts: argparse.Namespace) -> Request:
    text = _read_text(opts.file)
    files, fds = _spec_files(text, opts.file)
    args = {"spec_toml": text, "wait": opts.wait, "timeout": opts.timeout}
    if files:
        args["files"] = files  # the i-th passed file is the i-th of these
    if not opts.wait:
        timeout: float | None = ONE_SHOT_TIMEOUT_S
    elif opts.timeout is not None:
        timeout = opts.timeout + WAIT_GRACE_S
    else:
        timeout = None
    return Request("deploy", args, timeout=None if fds else timeout, follow=opts.wait, fds=fds)


def _build_plan(opts: argparse.Namespace) -> Request:
    return Request("plan", {"spec_toml": _read_text(opts.file), "what_if": opts.what_if})


def _build_apps(opts: argparse.Namespace) -> Request:
    return Request("apps", {"all": True} if opts.all else {})


def _build_allocs(opts: argparse.Namespace) -> Request:
    return Request("allocs", {"app": opts.app, "node": opts.node})


def _build_stop(opts: argparse.Namespace) -> Request:
    return Request("stop", {"app": opts.app})


def _build_deployments(opts: argparse.Namespace) -> Request:
    return Request("deployments", {"app": opts.app})


def _build_history(opts: argparse.Namespace) -> Request:
    return Request("history", {"app": opts.app})


def _build_rollback(opts: argparse.Namespace) -> Request:
    return Request("rollback", {"app": opts.app, "to": opts.to})


def _build_app_move(cmd: str) -> Callable[[argparse.Namespace], Request]:
    def build(opts: argparse.Namespace) -> Request:
        return Request(cmd, {"app": opts.app, "reason": opts.reason})

    return build


def _build_pin(cmd: str) -> Callable[[argparse.Namespace], Request]:
    def build(opts: argparse.Namespace) -> Request:
        return Request(cmd, {"app": opts.app, "version": opts.version})

    return build


def _build_node_action(cmd: str) -> Callable[[argparse.Namespace], Request]:
    def build(opts: argparse.Namespace) -> Request:
        return Request(cmd, {"node": opts.node})

    return build


def _build_logs(opts: argparse.Namespace) -> Request:
    args = {"alloc": opts.alloc, "follow": opts.follow, "lines": opts.tail}
    return Request("logs", args, timeout=None if opts.follow else ONE_SHOT_TIMEOUT_S,
                   follow=opts.follow)


def _build_events(opts: argparse.Namespace) -> Request:
    args = {"follow": opts.follow, "since": opts.since}
    if opts.after_seq is not None:
        args["after_seq"] = opts.after_seq
    for key, value in (("kinds", opts.kinds), ("app", opts.app), ("node", opts.node)):
        if value is not None:
            args[key] = value
    return Request("events", args,
                   timeout=None if opts.follow else ONE_SHOT_TIMEOUT_S, follow=opts.follow)


def _build_revocations(opts: argparse.Namespace) -> Request:
    return Request("revocations", {})


def _build_audit(opts: argparse.Namespace) -> Request:
    return Request("audit", {})


# --- stream items --------------------------------------------------------------------


def _stream_handler(command: str, out: Output, follow: bool = False,
                    collected: list[str] | None = None) -> Callable[[Any], None]:
    if command in ("deploy", "artifact_push"):

        def on_item(item: Any) -> None:
            if isinstance(item, Mapping) and "pushing" in item:
                out.progress(render.push_progress(item))
            elif isinstance(item, Mapping):
                out.progress(render.deploy_progress(item))

    elif command == "logs":

        def on_item(item: Any) -> None:
            if out.json_mode and not follow and collected is not None:
                # A long log arrives in pieces; --json without --follow still prints one document.
                if isinstance(item, Mapping) and isinstance(item.get("data"), str):
                    collected.append(item["data"])
            elif out.json_mode:
                out.json_line(item)
            elif isinstance(item, Mapping) and isinstance(item.get("data"), str):
                out.write(item["data"])

    elif command == "events":

        def on_item(item: Any) -> None:
            if out.json_mode:
                out.json_line(item)
            elif isinstance(item, Mapping):
                out.write(render.event_line(item) + "\n")

    else:

        def on_item(item: Any) -> None:
            return None  # this command streams nothing the operator needs

    return on_item


# --- final results -------------------------------------------------------------------


def _generic(result: Any) -> str:
    if result is None:
        return ""
    if isinstance(result, Mapping):
        return render.key_values(result)
    if isinstance(result, str):
        return result
    return json.dumps(result, indent=2)


def _rows(result: Any) -> list[Mapping[str, Any]] | None:
    if isinstance(result, list) and all(isinstance(r, Mapping) for r in result):
        return result
    return None


def _listing(columns: list) -> Callable[[Any, argparse.Namespace], str]:
    def show(result: Any, opts: argparse.Namespace) -> str:
        rows = _rows(result)
        return _generic(result) if rows is None else render.table(rows, columns)

    return show


_show_nodes = _listing(render.NODE_COLUMNS)
_show_sites = _listing(render.SITE_COLUMNS)
_show_apps = _listing(render.APP_COLUMNS)
_show_allocs = _listing(render.ALLOC_COLUMNS)
_show_deployments = _listing(render.DEPLOYMENT_COLUMNS)
_show_history = _listing(render.HISTORY_COLUMNS)
_show_audit = _listing(render.AUDIT_COLUMNS)
_show_revocations = _listing(render.REVOCATION_COLUMNS)
_show_tokens = _listing(render.TOKEN_COLUMNS)
_show_artifacts = _listing(render.ARTIFACT_COLUMNS)
_show_event_table = _listing(render.EVENT_COLUMNS)


def _show_object(result: Any, opts: argparse.Namespace) -> str:
    if isinstance(result, Mapping) and "expires_at" in result:
        result = {**result, "expires_at": render.local_time(result["expires_at"])}
    return _generic(result)


def _show_status(result: Any, opts: argparse.Namespace) -> str:
    if isinstance(result, Mapping):
        return render.key_values(result, order=render.STATUS_ORDER)
    return _generic(result)


def _show_deploy(result: Any, opts: argparse.Namespace) -> str:
    if isinstance(result, Mapping):
        text = render.key_values(result, order=render.DEPLOY_ORDER)
        if result.get("changed") is False:
            text = (f"{result.get('app')} v{result.get('version')} unchanged: this spec already runs there; "
                    f"nothing was written or restarted\n") + text
        return text
    return _generic(result)


def _show_plan(result: Any, opts: argparse.Namespace) -> str:
    if isinstance(result, Mapping):
        return render.plan(result)
    return _generic(result)


def _show_logs(result: Any, opts: argparse.Namespace) -> str:
    """Workload output exactly as the daemon sent it (the caller adds no newline)."""
    data = result.get("data") if isinstance(result, Mapping) else result
    return data if isinstance(data, str) else ""


def _show_events(result: Any, opts: argparse.Namespace) -> str:
    if opts.follow and _rows(result) is not None:
        return "\n".join(render.event_line(event) for event in result)
    return _show_event_table(result, opts)


def _failure(request: Request, result: Any) -> str | None:
    """Why a command that answered must still exit non-zero (its answer is shown first)."""
    if request.cmd == "plan" and isinstance(result, Mapping) and result.get("unplaced"):
        unplaced = result["unplaced"]
        wanted = len(unplaced) + len(result.get("placements") or [])
        return f"{len(unplaced)} of {wanted} replicas cannot be placed: {unplaced[0].get('reason')}"
    return None


def _emit_result(opts: argparse.Namespace, request: Request, result: Any, out: Output,
                 collected: list[str] | None = None) -> None:
    if collected and isinstance(result, Mapping) and isinstance(result.get("data"), str):
        result = {**result, "data": "".join(collected) + result["data"]}
    if out.json_mode:
        if request.follow and request.cmd == "events" and isinstance(result, list):
            for event in result:  # a follow stream stays one document per line
                out.json_line(event)
        elif request.follow and request.cmd == "logs":
            out.json_line(result)
        else:
            out.document(result)
        return
    text = opts.show(result, opts)
    if request.cmd == "logs":
        out.write(text)
    elif text:
        out.write(text + "\n")


# --- entry point ---------------------------------------------------------------------


def _error(message: str) -> int:
    one_line = " ".join(str(message).split("\n"))
    sys.stderr.write(f"error: {one_line}\n")
    sys.stderr.flush()
    return EXIT_ERROR


def socket_path(opts: argparse.Namespace) -> str:
    return opts.socket or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        opts = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    out = Output(json_mode=opts.json or opts.json_after)
    try:
        request: Request = opts.build(opts)
        if isinstance(request, Local):
            if out.json_mode:
                out.document(request.result)
            else:
                out.write(opts.show(request.result, opts) + "\n")
            return 0
        watching = bool(getattr(opts, "watch", False))
        while True:
            collected: list[str] = []
            result = admin_call_sync(
                socket_path(opts),
                request.cmd,
                request.args,
                on_stream=_stream_handler(request.cmd, out, request.follow, collected),
                timeout=request.timeout,
                fds=request.fds,
            )
            out.end_progress()
            if watching and out.json_mode:
                out.json_line(result)
            else:
                if watching and sys.stdout.isatty():
                    out.write(CLEAR_SCREEN)
                _emit_result(opts, request, result, out, collected)
            failure = _failure(request, result)
            if failure is not None:
                return _error(failure)
            if not watching:
                break
            time.sleep(WATCH_PERIOD)
    except (AdminError, AdminUnavailable) as exc:
        out.end_progress()
        return _error(exc.message)
    except CliError as exc:
        return _error(str(exc))
    except KeyboardInterrupt:
        out.end_progress()
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    return EXIT_OK


def _silence_stdout() -> None:
    """After the reader of stdout left, keep Python's exit-time flush from complaining."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
