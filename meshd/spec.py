"""Parsing and validation of an app spec (the TOML an operator deploys) into `AppSpec`.

Invariants:
- Pure: no I/O, no clock. Input is TOML text or the document tomllib made of it.
- Every key is checked. Unknown keys, at any depth, are refused and named, so a typo
  (`replica = 3`) never silently falls back to a default.
- Every refusal is one `SpecError` whose `key` is the dotted path of the offending key
  (`app.resources.cpu`, `app.command[2]`, `app.env.MODE`) and whose `reason` says what is
  wrong in one line a CLI can print as is.
- Nothing but `SpecError` escapes `parse_app_toml` / `parse_app_dict`, whatever the input.
- Every accepted number is bounded well below 2**63: specs are written into the Raft log and
  into the cross-site CRDT document, and pycrdt panics on ints >= 2**63.
- `parse_app_dict(spec_to_dict(s)) == s` for every valid spec `s`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from typing import Any, Mapping

from meshd.state import (HEALTH_KINDS, MAX_SOAK_S, MAX_WAVES, RESTART_POLICIES, AppSpec, ArtifactRef, Constraints, HealthCheck,
                         ResourceRequest, RolloutPlan, UpdatePolicy, Wave)

# --- name rules ----------------------------------------------------------------------
# App and site names: a DNS label (RFC 1123), so they fit in hostnames, mDNS records,
# file names and log paths without escaping.
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
NAME_RULE = "lowercase letters, digits and '-', 1 to 63 characters, not starting or ending with '-'"

# Label keys (app constraints and node labels): letters, digits, '.', '_', '-', '/', at most
# 63 characters, starting and ending with a letter or digit; '/' allows prefixes such as
# "example.com/zone". The same rule on both sides, so every constraint can be satisfied.
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$")
LABEL_KEY_RULE = (
    "letters, digits, '.', '_', '-' and '/', 1 to 63 characters, "
    "starting and ending with a letter or digit"
)
MAX_LABEL_VALUE_CHARS = 253  # room for a DNS name as a value; labels are shown in tables
MAX_LABELS = 64  # labels travel in every node record; keep them few

# Environment variable names as POSIX shells accept them.
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ENV_KEY_RULE = "letters, digits and '_', not starting with a digit"

# --- limits --------------------------------------------------------------------------
MAX_SPEC_TEXT_CHARS = 256 * 1024  # every version of a spec is kept in the Raft log of each member
MAX_REPLICAS = 1000  # one site is a LAN of edge devices; more is a typo, not a plan
MAX_COMMAND_ARGS = 256  # a workload command line, not a script
MAX_COMMAND_ARG_CHARS = 4096  # one argument; longer belongs in a file shipped with the app
MAX_COMMAND_TOTAL_CHARS = 64 * 1024  # the whole argv, well inside Linux's ARG_MAX
MAX_SITES = 256  # sites one app runs in: a chain's stores in one rollout; the mesh document's list limit (crdt.schema.MAX_LIST)
MAX_ENV_VARS = 128  # environment entries; configuration beyond that belongs in a file
MAX_ENV_KEY_CHARS = 256  # one variable name
MAX_ENV_VALUE_CHARS = 32 * 1024  # one value
MAX_ENV_TOTAL_CHARS = 64 * 1024  # names plus values, well inside Linux's ARG_MAX
MAX_CPU = 1024.0  # cores; above any single edge device, so larger requests are mistakes
MAX_MEMORY_MB = 2**40  # 1 EiB in MiB: exact in a float (pycrdt returns ints as floats), < 2**63
# Limits are enforced (meshd.io.cgroups), so a request no process can start within is refused:
MIN_CPU = 0.01  # cores: the kernel's smallest CPU quota, 1 ms of each 100 ms period
MIN_MEMORY_MB = 4  # MiB: below this not even a shell gets to exec
MAX_PIDS = 4_194_304  # the kernel's largest pid_max (2**22): any count above is no limit
# Devices: a kind is a short name (gpu, render, coral, ...); no edge box has more of one kind.
DEVICE_KIND_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
MAX_DEVICES = 64

# Architectures as `uname -m` reports them on the devices meshd targets.
KNOWN_ARCHES = ("x86_64", "aarch64", "armv7l", "armv6l", "riscv64", "i686", "ppc64le", "s390x")

_TOP_KEYS = ("app",)
_APP_KEYS = ("name", "replicas", "command", "sites", "env", "constraints", "resources", "restart", "health", "update",
             "rollout", "user", "artifact")
_CONSTRAINT_KEYS = ("arch", "labels")
_RESOURCE_KEYS = ("cpu", "memory_mb", "pids", "devices")
_RESTART_KEYS = ("policy",)
_HEALTH_KEYS = ("kind", "port", "path", "command", "interval_s", "timeout_s", "failures", "grace_s")
# What each kind of check needs (and may have) beside the timing keys.
_HEALTH_NEEDS = {"process": (), "tcp": ("port",), "http": ("port",), "exec": ("command",)}
_HEALTH_MAY = {"process": (), "tcp": ("port",), "http": ("port", "path"), "exec": ("command",)}
MAX_HEALTH_INTERVAL_S = 3600.0  # an hour between checks: beyond that it checks nothing useful
MIN_HEALTH_INTERVAL_S = 0.1  # a check is a connection or a process: ten a second at most
MAX_HEALTH_FAILURES = 100  # consecutive failures: beyond that, a longer interval says it better
MAX_HEALTH_GRACE_S = 86400.0  # a day of start-up is a typo, not a workload
MAX_HEALTH_PATH_CHARS = 1024  # an HTTP request line, not a document
_UPDATE_KEYS = ("max_parallel", "canary", "min_healthy_s", "healthy_deadline_s", "progress_deadline_s", "auto_revert",
                "auto_promote", "keep_versions")
MAX_UPDATE_WAIT_S = 7 * 86400.0  # a week: a deadline or soak beyond that is a typo, not a plan
MAX_KEEP_VERSIONS = 100  # every kept version's spec is in each member's state
_ARTIFACT_KEYS = ("name", "file", "digest", "unpack")
# What a workload calls an artifact: it becomes MESHD_ARTIFACT_<NAME> (upper case, - as _).
ARTIFACT_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9_-]{0,30}[a-z0-9])?")
ARTIFACT_NAME_RULE = "lowercase letters, digits, '_' and '-', 1 to 32 characters, not starting or ending with '_' or '-'"
MAX_ARTIFACTS = 16  # files one app needs; a program tree or model bundle is one archive, not many files
MAX_ARTIFACT_FILE_CHARS = 1024  # a path beside the spec
_ROLLOUT_KEYS = ("waves", "abort_failed_percent")
_WAVE_KEYS = ("sites", "percent", "soak_s")

DEFAULT_REPLICAS = 1  # an app without `replicas` runs once, like a single service


class SpecError(ValueError):
    """A refused spec: `key` is the dotted path of what is wrong, `reason` says why."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(_one_line(f"{key}: {reason}"))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.key, self.reason))


# --- public API ----------------------------------------------------------------------
def parse_app_toml(text: str | bytes) -> AppSpec:
    """Parse and validate the TOML text of an app spec."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SpecError("toml", f"not UTF-8 text (byte {exc.start})") from None
    if not isinstance(text, str):
        raise SpecError("toml", f"must be TOML text, got {show_value(text)}")
    if len(text) > MAX_SPEC_TEXT_CHARS:
        raise SpecError("toml", f"spec is {len(text)} characters, at most {MAX_SPEC_TEXT_CHARS} allowed")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError("toml", str(exc)) from None
    except RecursionError:
        raise SpecError("toml", "nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal beyond Python's digit limit
        raise SpecError("toml", f"invalid value: {exc}") from None
    return parse_app_dict(doc)


def parse_app_dict(doc: Mapping[str, Any]) -> AppSpec:
    """Validate a whole spec document (as tomllib returns it) that holds an `[app]` table."""
    if not isinstance(doc, Mapping):
        raise SpecError("document", f"must be a table with an [app] table, got {show_value(doc)}")
    _refuse_unknown_keys(doc, "", _TOP_KEYS)
    if "app" not in doc:
        raise SpecError("app", "is required: the spec must have an [app] table")
    app = _table(doc["app"], "app")
    _refuse_unknown_keys(app, "app", _APP_KEYS)

    if "name" not in app:
        raise SpecError("app.name", "is required")
    name = _name(app["name"], "app.name")
    replicas = _replicas(app["replicas"]) if "replicas" in app else DEFAULT_REPLICAS
    if "command" not in app:
        raise SpecError("app.command", "is required: a list of strings, program first")
    command = _command(app["command"])
    sites = _sites(app["sites"]) if "sites" in app else ()
    env = _env(app["env"]) if "env" in app else {}
    constraints = _constraints(app["constraints"]) if "constraints" in app else Constraints()
    resources = _resources(app["resources"]) if "resources" in app else ResourceRequest()
    restart_policy = _restart(app["restart"]) if "restart" in app else "always"
    health = _health(app["health"]) if "health" in app else HealthCheck()
    update = _update(app["update"], replicas) if "update" in app else UpdatePolicy()
    rollout = _rollout(app["rollout"], sites) if "rollout" in app else None
    user = _user(app["user"]) if "user" in app else ""
    artifacts = _artifacts(app["artifact"]) if "artifact" in app else ()
    _check_artifact_uses(command, env, artifacts)
    return AppSpec(
        name=name,
        replicas=replicas,
        command=command,
        sites=sites,
        env=env,
        constraints=constraints,
        resources=resources,
        restart_policy=restart_policy,
        health=health,
        update=update,
        rollout=rollout,
        user=user,
        artifacts=artifacts,
    )


def spec_to_dict(spec: AppSpec) -> dict[str, Any]:
    """The spec as a TOML/JSON-ready document; optional keys left at their default are omitted."""
    app: dict[str, Any] = {
        "name": spec.name,
        "replicas": spec.replicas,
        "command": list(spec.command),
    }
    if spec.sites:
        app["sites"] = list(spec.sites)
    if spec.env:
        app["env"] = dict(spec.env)
    constraints: dict[str, Any] = {}
    if spec.constraints.arch:
        constraints["arch"] = list(spec.constraints.arch)
    if spec.constraints.labels:
        constraints["labels"] = dict(spec.constraints.labels)
    if constraints:
        app["constraints"] = constraints
    resources: dict[str, Any] = {}
    if spec.resources.cpu:
        resources["cpu"] = float(spec.resources.cpu)
    if spec.resources.memory_mb:
        resources["memory_mb"] = spec.resources.memory_mb
    if spec.resources.pids:
        resources["pids"] = spec.resources.pids
    if spec.resources.devices:
        resources["devices"] = dict(spec.resources.devices)
    if resources:
        app["resources"] = resources
    app["restart"] = {"policy": spec.restart_policy}
    if spec.health != HealthCheck():
        default, check = HealthCheck(), spec.health
        health: dict[str, Any] = {"kind": check.kind}
        for key in _HEALTH_MAY[check.kind]:
            health[key] = list(check.command) if key == "command" else getattr(check, key)
        for key in ("interval_s", "timeout_s", "failures", "grace_s"):
            if getattr(check, key) != getattr(default, key):
                health[key] = getattr(check, key)
        app["health"] = health
    if spec.update != UpdatePolicy():
        def implied(key: str) -> object:  # what the parser takes when the key is left out
            if key == "progress_deadline_s":
                return max(UpdatePolicy().progress_deadline_s, spec.update.healthy_deadline_s)
            return getattr(UpdatePolicy(), key)
        app["update"] = {key: getattr(spec.update, key) for key in _UPDATE_KEYS
                         if getattr(spec.update, key) != implied(key)}
    if spec.user:
        app["user"] = spec.user
    if spec.artifacts:
        app["artifact"] = [{"name": a.name, **({"digest": a.digest} if a.digest else {}),
                            **({"file": a.file} if a.file else {}), "unpack": a.unpack} for a in spec.artifacts]
    if spec.rollout is not None:
        waves = []
        for wave in spec.rollout.waves:
            item: dict[str, Any] = {"sites": list(wave.sites)} if wave.sites else {"percent": wave.percent}
            if wave.soak_s:
                item["soak_s"] = wave.soak_s
            waves.append(item)
        app["rollout"] = {"waves": waves, "abort_failed_percent": spec.rollout.abort_failed_percent}
    return {"app": app}


def spec_to_toml(spec: AppSpec) -> str:
    """The spec as TOML that `parse_app_toml` reads back to an equal spec (a rollback deploys
    an earlier version's spec again, as a new edit of the mesh document)."""
    app = spec_to_dict(spec)["app"]
    lines = ["[app]"]
    tables = []
    for key, value in app.items():
        if isinstance(value, dict) and key != "env":
            tables.append((key, value))
        elif key != "artifact":
            lines.append(f"{key} = {_toml_value(value)}")
    for key, table in tables:
        lines.append(f"\n[app.{key}]")
        lines.extend(f"{name} = {_toml_value(value)}" for name, value in table.items())
    for item in app.get("artifact", []):
        lines.append("\n[[app.artifact]]")
        lines.extend(f"{name} = {_toml_value(value)}" for name, value in item.items())
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a TOML basic string, but for DEL, which TOML wants escaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007F")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def spec_digest(spec: AppSpec) -> str:
    """sha256 of the spec's canonical JSON: two specs have the same digest when they are equal."""
    text = json.dumps(spec.to_plain(), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


# --- rules shared with node configuration -------------------------------------------
def name_problem(value: object) -> str | None:
    """Why `value` is not a valid app or site name, or None if it is."""
    if not isinstance(value, str):
        return f"must be a string, got {show_value(value)}"
    if not NAME_RE.match(value):
        return f"must be {NAME_RULE}, got {show_value(value)}"
    return None


def label_key_problem(value: object) -> str | None:
    """Why `value` is not a valid label key, or None if it is."""
    if not isinstance(value, str):
        return f"label key must be a string, got {show_value(value)}"
    if not LABEL_KEY_RE.match(value):
        return f"label key must be {LABEL_KEY_RULE}, got {show_value(value)}"
    return None


def label_value_problem(value: object) -> str | None:
    """Why `value` is not a valid label value, or None if it is (it may be empty)."""
    if not isinstance(value, str):
        return f"must be a string, got {show_value(value)}"
    if len(value) > MAX_LABEL_VALUE_CHARS:
        return f"must be at most {MAX_LABEL_VALUE_CHARS} characters, got {len(value)}"
    if _has_control(value):
        return f"must not contain control characters, got {show_value(value)}"
    return None


# --- field checks --------------------------------------------------------------------
def _name(value: object, key: str) -> str:
    problem = name_problem(value)
    if problem:
        raise SpecError(key, problem)
    assert isinstance(value, str)
    return value


def _replicas(value: object) -> int:
    if not _is_int(value) or not 1 <= value <= MAX_REPLICAS:  # type: ignore[operator]
        raise SpecError("app.replicas", f"must be an integer from 1 to {MAX_REPLICAS}, got {show_value(value)}")
    return int(value)  # type: ignore[arg-type]


def _command(value: object) -> tuple[str, ...]:
    return _command_at(value, "app.command")


def _command_at(value: object, where: str) -> tuple[str, ...]:
    items = _list(value, where, "strings, program first")
    if not items:
        raise SpecError(where, "must not be empty: give at least the program to run")
    if len(items) > MAX_COMMAND_ARGS:
        raise SpecError(where, f"must have at most {MAX_COMMAND_ARGS} items, got {len(items)}")
    total = 0
    for index, arg in enumerate(items):
        key = f"{where}[{index}]"
        if not isinstance(arg, str):
            raise SpecError(key, f"must be a string, got {show_value(arg)}")
        if not arg:
            raise SpecError(key, "must not be empty")
        if "\0" in arg:
            raise SpecError(key, "must not contain a NUL character (it cannot be passed to a program)")
        if len(arg) > MAX_COMMAND_ARG_CHARS:
            raise SpecError(key, f"must be at most {MAX_COMMAND_ARG_CHARS} characters, got {len(arg)}")
        total += len(arg)
    if total > MAX_COMMAND_TOTAL_CHARS:
        raise SpecError(where, f"is {total} characters in all, at most {MAX_COMMAND_TOTAL_CHARS} allowed")
    return tuple(items)


def _sites(value: object) -> tuple[str, ...]:
    items = _list(value, "app.sites", "site names")
    if not items:
        raise SpecError("app.sites", "must name at least one site (leave it out to run in the deploying site)")
    if len(items) > MAX_SITES:
        raise SpecError("app.sites", f"must have at most {MAX_SITES} items, got {len(items)}")
    seen: set[str] = set()
    for index, site in enumerate(items):
        key = f"app.sites[{index}]"
        _name(site, key)
        if site in seen:
            raise SpecError(key, f"site {site!r} is listed twice")
        seen.add(site)
    return tuple(items)


def _env(value: object) -> dict[str, str]:
    table = _table(value, "app.env")
    if len(table) > MAX_ENV_VARS:
        raise SpecError("app.env", f"must have at most {MAX_ENV_VARS} variables, got {len(table)}")
    env: dict[str, str] = {}
    total = 0
    for name, val in table.items():
        key = _join("app.env", name)
        if not isinstance(name, str) or not ENV_KEY_RE.match(name):
            raise SpecError(key, f"variable name must be {ENV_KEY_RULE}")
        if len(name) > MAX_ENV_KEY_CHARS:
            raise SpecError(key, f"variable name must be at most {MAX_ENV_KEY_CHARS} characters, got {len(name)}")
        if not isinstance(val, str):
            raise SpecError(key, f"must be a string, got {show_value(val)}")
        if "\0" in val:
            raise SpecError(key, "must not contain a NUL character (it cannot be passed to a program)")
        if len(val) > MAX_ENV_VALUE_CHARS:
            raise SpecError(key, f"must be at most {MAX_ENV_VALUE_CHARS} characters, got {len(val)}")
        total += len(name) + len(val)
        env[name] = val
    if total > MAX_ENV_TOTAL_CHARS:
        raise SpecError("app.env", f"is {total} characters in all, at most {MAX_ENV_TOTAL_CHARS} allowed")
    return env


def _constraints(value: object) -> Constraints:
    table = _table(value, "app.constraints")
    _refuse_unknown_keys(table, "app.constraints", _CONSTRAINT_KEYS)
    arch: tuple[str, ...] = ()
    if "arch" in table:
        items = _list(table["arch"], "app.constraints.arch", "architectures")
        if not items:
            raise SpecError("app.constraints.arch", "must list at least one architecture (leave it out for any)")
        seen: set[str] = set()
        for index, item in enumerate(items):
            key = f"app.constraints.arch[{index}]"
            if not isinstance(item, str) or item not in KNOWN_ARCHES:
                raise SpecError(key, f"must be one of {', '.join(KNOWN_ARCHES)}, got {show_value(item)}")
            if item in seen:
                raise SpecError(key, f"architecture {item!r} is listed twice")
            seen.add(item)
        arch = tuple(items)
    labels: dict[str, str] = {}
    if "labels" in table:
        labels = _labels(table["labels"], "app.constraints.labels")
    return Constraints(arch=arch, labels=labels)


def _labels(value: object, key: str) -> dict[str, str]:
    table = _table(value, key)
    if len(table) > MAX_LABELS:
        raise SpecError(key, f"must have at most {MAX_LABELS} labels, got {len(table)}")
    labels: dict[str, str] = {}
    for label, val in table.items():
        label_key = _join(key, label)
        problem = label_key_problem(label)
        if problem:
            raise SpecError(label_key, problem)
        problem = label_value_problem(val)
        if problem:
            raise SpecError(label_key, problem)
        labels[label] = val
    return labels


# A POSIX user name as Debian's adduser takes it: the node must have it (meshd.io.supervisor).
USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


def _user(value: object) -> str:
    if not isinstance(value, str) or not USER_RE.fullmatch(value):
        raise SpecError("app.user", f"must be a user name (1-32 of a-z 0-9 _ -, not starting with a digit or -), "
                                    f"got {show_value(value)}")
    return value


ARTIFACT_REF_RE = re.compile(r"\$\{artifact:([^}]*)\}")


def artifact_env_name(name: str) -> str:
    """The environment variable that gives a workload the path of its artifact `name`."""
    return "MESHD_ARTIFACT_" + name.upper().replace("-", "_")


def _artifacts(value: object) -> tuple[ArtifactRef, ...]:
    items = _list(value, "app.artifact", "tables ([[app.artifact]])")
    if len(items) > MAX_ARTIFACTS:
        raise SpecError("app.artifact", f"{len(items)} artifacts, at most {MAX_ARTIFACTS} allowed")
    refs: list[ArtifactRef] = []
    for i, item in enumerate(items):
        where = f"app.artifact[{i}]"
        table = _table(item, where)
        _refuse_unknown_keys(table, where, _ARTIFACT_KEYS)
        name = table.get("name")
        if not isinstance(name, str) or not ARTIFACT_NAME_RE.fullmatch(name):
            raise SpecError(f"{where}.name", f"must be {ARTIFACT_NAME_RULE}, got {show_value(name)}")
        if any(artifact_env_name(r.name) == artifact_env_name(name) for r in refs):
            raise SpecError(f"{where}.name", f"{name!r} is the name of another artifact of this app")
        if ("file" in table) == ("digest" in table):
            raise SpecError(where, "needs exactly one of file (a path beside the spec, pushed by meshctl deploy) "
                                   "and digest (an artifact already pushed)")
        digest = file = ""
        if "digest" in table:
            digest = table["digest"]
            if not isinstance(digest, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
                raise SpecError(f"{where}.digest", f"must be sha256:<64 lowercase hex digits>, got {show_value(digest)}")
        else:
            file = table["file"]
            if not isinstance(file, str) or not file or len(file) > MAX_ARTIFACT_FILE_CHARS or "\0" in file:
                raise SpecError(f"{where}.file", f"must be a path beside the spec, got {show_value(file)}")
        unpack = table.get("unpack", False)
        if not isinstance(unpack, bool):
            raise SpecError(f"{where}.unpack", f"must be true or false, got {show_value(unpack)}")
        refs.append(ArtifactRef(name=name, digest=digest, unpack=unpack, file=file))
    return tuple(refs)


def _check_artifact_uses(command: tuple[str, ...], env: Mapping[str, str], artifacts: tuple[ArtifactRef, ...]) -> None:
    """Every ${artifact:NAME} in the command and env names an artifact of the app."""
    names = {a.name for a in artifacts}
    places = [(f"app.command[{i}]", arg) for i, arg in enumerate(command)]
    places += [(f"app.env.{_segment(key)}", value) for key, value in env.items()]
    for where, text in places:
        for used in ARTIFACT_REF_RE.findall(text):
            if used not in names:
                known = ", ".join(sorted(names)) or "none"
                raise SpecError(where, f"${{artifact:{used[:40]}}} names no artifact of this app (its artifacts: {known})")


def _resources(value: object) -> ResourceRequest:
    table = _table(value, "app.resources")
    _refuse_unknown_keys(table, "app.resources", _RESOURCE_KEYS)
    cpu = 0.0
    if "cpu" in table:
        raw = table["cpu"]
        if not _is_number(raw) or not MIN_CPU <= raw <= MAX_CPU:  # type: ignore[operator]
            raise SpecError(
                "app.resources.cpu",
                f"must be a number of cores from {MIN_CPU:g} (the smallest CPU quota) to {MAX_CPU:g}, "
                f"got {show_value(raw)}",
            )
        cpu = float(raw)  # type: ignore[arg-type]
    memory_mb = 0
    if "memory_mb" in table:
        raw = table["memory_mb"]
        if not _is_int(raw) or not MIN_MEMORY_MB <= raw <= MAX_MEMORY_MB:  # type: ignore[operator]
            raise SpecError(
                "app.resources.memory_mb",
                f"must be an integer number of MiB from {MIN_MEMORY_MB} (what a process needs to start) "
                f"to {MAX_MEMORY_MB}, got {show_value(raw)}",
            )
        memory_mb = int(raw)  # type: ignore[arg-type]
    pids = 0
    if "pids" in table:
        raw = table["pids"]
        if not _is_int(raw) or not 1 <= raw <= MAX_PIDS:  # type: ignore[operator]
            raise SpecError(
                "app.resources.pids",
                f"must be an integer number of processes from 1 (the workload itself) to {MAX_PIDS}, "
                f"got {show_value(raw)}",
            )
        pids = int(raw)  # type: ignore[arg-type]
    devices: list[tuple[str, int]] = []
    if "devices" in table:
        wanted = _table(table["devices"], "app.resources.devices")
        for kind in sorted(wanted):
            key = f"app.resources.devices.{kind}"
            if not isinstance(kind, str) or not DEVICE_KIND_RE.fullmatch(kind):
                raise SpecError(key, "a device kind is 1-32 of a-z 0-9 _ - starting with a letter (gpu, coral, ...)")
            count = wanted[kind]
            if not _is_int(count) or not 1 <= count <= MAX_DEVICES:  # type: ignore[operator]
                raise SpecError(key, f"must be a number of devices from 1 to {MAX_DEVICES}, got {show_value(count)}")
            devices.append((kind, int(count)))  # type: ignore[arg-type]
    return ResourceRequest(cpu=cpu, memory_mb=memory_mb, pids=pids, devices=tuple(devices))


def _restart(value: object) -> str:
    table = _table(value, "app.restart")
    _refuse_unknown_keys(table, "app.restart", _RESTART_KEYS)
    if "policy" not in table:
        return "always"
    policy = table["policy"]
    if not isinstance(policy, str) or policy not in RESTART_POLICIES:
        raise SpecError("app.restart.policy", f"must be one of {', '.join(RESTART_POLICIES)}, got {show_value(policy)}")
    return policy


def _health(value: object) -> HealthCheck:
    table = _table(value, "app.health")
    _refuse_unknown_keys(table, "app.health", _HEALTH_KEYS)
    kind = table.get("kind", "process")
    if not isinstance(kind, str) or kind not in HEALTH_KINDS:
        raise SpecError("app.health.kind", f"must be one of {', '.join(HEALTH_KINDS)}, got {show_value(kind)}")
    for key in ("port", "path", "command"):
        if key in table and key not in _HEALTH_MAY[kind]:
            raise SpecError(f"app.health.{key}", f"is not used by {_a(kind)} check")
    for key in _HEALTH_NEEDS[kind]:
        if key not in table:
            raise SpecError(f"app.health.{key}", f"is required for {_a(kind)} check")
    default = HealthCheck()
    port = default.port
    if "port" in table:
        port = table["port"]
        if not _is_int(port) or not 1 <= port <= 65535:  # type: ignore[operator]
            raise SpecError("app.health.port", f"must be a port from 1 to 65535, got {show_value(port)}")
    path = default.path
    if "path" in table:
        path = table["path"]
        if (not isinstance(path, str) or not path.startswith("/") or len(path) > MAX_HEALTH_PATH_CHARS
                or _has_control(path) or " " in path):
            raise SpecError("app.health.path", f"must be a URL path starting with '/', without spaces, at most "
                                               f"{MAX_HEALTH_PATH_CHARS} characters, got {show_value(path)}")
    command = _command_at(table["command"], "app.health.command") if "command" in table else ()
    interval = _seconds(table, "interval_s", default.interval_s, MIN_HEALTH_INTERVAL_S, MAX_HEALTH_INTERVAL_S)
    timeout = _seconds(table, "timeout_s", min(default.timeout_s, interval), MIN_HEALTH_INTERVAL_S / 10, interval)
    grace = _seconds(table, "grace_s", default.grace_s, 0.0, MAX_HEALTH_GRACE_S)
    failures = default.failures
    if "failures" in table:
        failures = table["failures"]
        if not _is_int(failures) or not 1 <= failures <= MAX_HEALTH_FAILURES:  # type: ignore[operator]
            raise SpecError("app.health.failures", f"must be a whole number from 1 to {MAX_HEALTH_FAILURES}, "
                                                   f"got {show_value(failures)}")
    return HealthCheck(kind=kind, port=int(port), path=path, command=command, interval_s=interval, timeout_s=timeout,
                       failures=int(failures), grace_s=grace)


def _update(value: object, replicas: int) -> UpdatePolicy:
    table = _table(value, "app.update")
    _refuse_unknown_keys(table, "app.update", _UPDATE_KEYS)
    default = UpdatePolicy()
    max_parallel = _whole(table, "app.update.max_parallel", default.max_parallel, 1, MAX_REPLICAS)
    canary = _whole(table, "app.update.canary", default.canary, 0, MAX_REPLICAS)
    if canary > replicas:
        raise SpecError("app.update.canary", f"must be at most app.replicas ({replicas}), got {canary}")
    keep = _whole(table, "app.update.keep_versions", default.keep_versions, 1, MAX_KEEP_VERSIONS)
    min_healthy = _seconds(table, "min_healthy_s", default.min_healthy_s, 0.0, MAX_UPDATE_WAIT_S, "app.update")
    healthy_deadline = _seconds(table, "healthy_deadline_s", default.healthy_deadline_s, 0.1, MAX_UPDATE_WAIT_S,
                                "app.update")
    progress_deadline = _seconds(table, "progress_deadline_s", max(default.progress_deadline_s, healthy_deadline),
                                 0.1, MAX_UPDATE_WAIT_S, "app.update")
    if progress_deadline < min_healthy:
        raise SpecError("app.update.progress_deadline_s", f"must be at least app.update.min_healthy_s "
                                                          f"({min_healthy:g}): no replica could ever count in time")
    flags = {}
    for key in ("auto_revert", "auto_promote"):
        flags[key] = table.get(key, getattr(default, key))
        if not isinstance(flags[key], bool):
            raise SpecError(f"app.update.{key}", f"must be true or false, got {show_value(flags[key])}")
    return UpdatePolicy(max_parallel=max_parallel, canary=canary, min_healthy_s=min_healthy,
                        healthy_deadline_s=healthy_deadline, progress_deadline_s=progress_deadline,
                        auto_revert=flags["auto_revert"], auto_promote=flags["auto_promote"], keep_versions=keep)


def _rollout(value: object, sites: tuple[str, ...]) -> RolloutPlan:
    table = _table(value, "app.rollout")
    _refuse_unknown_keys(table, "app.rollout", _ROLLOUT_KEYS)
    if not sites:
        raise SpecError("app.rollout", "needs app.sites: waves go across the sites the app names")
    if "waves" not in table:
        raise SpecError("app.rollout.waves", "is required: a list of waves, each with sites or percent")
    items = _list(table["waves"], "app.rollout.waves", "waves, each with sites or percent")
    if not 1 <= len(items) <= MAX_WAVES:
        raise SpecError("app.rollout.waves", f"must have from 1 to {MAX_WAVES} waves, got {len(items)}")
    waves = []
    placed: dict[str, int] = {}
    last_percent = 0
    for index, raw in enumerate(items):
        where = f"app.rollout.waves[{index}]"
        wave = _table(raw, where)
        _refuse_unknown_keys(wave, where, _WAVE_KEYS)
        if ("sites" in wave) == ("percent" in wave):
            raise SpecError(where, "must have exactly one of sites (names) or percent (a share of app.sites)")
        soak = _seconds(wave, "soak_s", 0.0, 0.0, MAX_SOAK_S, where)
        if "percent" in wave:
            percent = _whole(wave, f"{where}.percent", 0, 1, 100)
            if percent < last_percent:
                raise SpecError(f"{where}.percent", f"must not be below an earlier wave's ({last_percent}): "
                                                    "percents count the app's sites from the first wave on")
            last_percent = percent
            waves.append(Wave(percent=percent, soak_s=soak))
            continue
        names = _list(wave["sites"], f"{where}.sites", "site names")
        if not names:
            raise SpecError(f"{where}.sites", "must name at least one site")
        for position, site in enumerate(names):
            key = f"{where}.sites[{position}]"
            _name(site, key)
            if site not in sites:
                raise SpecError(key, f"names site {site!r}, which app.sites does not")
            if site in placed:
                raise SpecError(key, f"site {site!r} is already in app.rollout.waves[{placed[site]}]")
            placed[site] = index
        waves.append(Wave(sites=tuple(names), soak_s=soak))
    abort = _whole(table, "app.rollout.abort_failed_percent", 0, 0, 100)
    return RolloutPlan(waves=tuple(waves), abort_failed_percent=abort)


def _whole(table: Mapping[Any, Any], key: str, default: int, low: int, high: int) -> int:
    name = key.rpartition(".")[2]
    if name not in table:
        return default
    raw = table[name]
    if not _is_int(raw) or not low <= raw <= high:  # type: ignore[operator]
        raise SpecError(key, f"must be a whole number from {low} to {high}, got {show_value(raw)}")
    return int(raw)  # type: ignore[arg-type]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _seconds(table: Mapping[Any, Any], key: str, default: float, low: float, high: float,
             where: str = "app.health") -> float:
    """A duration in seconds from `table[key]`, from `low` to `high`."""
    if key not in table:
        return default
    raw = table[key]
    if not _is_number(raw) or not low <= raw <= high:  # type: ignore[operator]
        raise SpecError(f"{where}.{key}", f"must be a number of seconds from {low:g} to {high:g}, "
                                             f"got {show_value(raw)}")
    return float(raw)  # type: ignore[arg-type]


# --- helpers -------------------------------------------------------------------------
def _table(value: object, key: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise SpecError(key, f"must be a table, got {show_value(value)}")
    return value


def _list(value: object, key: str, of_what: str) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise SpecError(key, f"must be a list of {of_what}, got {show_value(value)}")
    return list(value)


def _refuse_unknown_keys(table: Mapping[Any, Any], path: str, allowed: tuple[str, ...]) -> None:
    unknown = [k for k in table if k not in allowed]
    if not unknown:
        return
    ordered = sorted(unknown, key=lambda k: _segment(k))
    reason = "unknown key" if len(ordered) == 1 else "unknown keys " + ", ".join(_segment(k) for k in ordered[:8])
    if len(ordered) > 8:
        reason += f" and {len(ordered) - 8} more"
    raise SpecError(_join(path, ordered[0]), f"{reason} (allowed here: {', '.join(allowed)})")


_PLAIN_SEGMENT = re.compile(r"^[A-Za-z0-9_./-]{1,64}$")


def _segment(name: object) -> str:
    """A key as it can be shown in a one-line dotted path: odd keys are JSON-quoted."""
    if isinstance(name, str):
        if _PLAIN_SEGMENT.match(name):
            return name
        shown = name if len(name) <= 64 else name[:64] + "..."
        return json.dumps(shown)
    return show_value(name)


def _join(path: str, name: object) -> str:
    return f"{path}.{_segment(name)}" if path else _segment(name)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, float) and math.isfinite(value)


def _has_control(text: str) -> bool:
    return any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text)


def show_value(value: object) -> str:
    """A short one-line rendering of a value for an error message, in TOML terms."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if abs(value) >= 10**30:  # also avoids Python's limit on int-to-text conversion
            return "a huge integer"
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:60] + "..."
        return json.dumps(shown)
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''}"
    if isinstance(value, Mapping):
        return "a table"
    return f"a value of type {type(value).__name__}"


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")
