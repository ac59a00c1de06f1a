"""The options of `meshd run`, resolved from the command line, the config file and the env.

Invariants:
- Pure: the caller reads the config file, the environment and the hostname and passes them
  in; nothing here touches the file system, the network or a clock.
- Precedence, option by option: command line > config file > environment (only
  `$MESHD_DATA_DIR`, for data_dir) > built-in default. A repeatable option (labels, peers)
  given on the command line replaces the file's list as a whole.
- A `NodeConfig` is always valid: its constructor checks every field, so one built by hand
  (in tests) obeys the same rules as one resolved from user input.
- Every refusal is a `ConfigError` whose message starts with the option's name as the
  operator writes it (`listen: ...`, `raft-min-timeout: ...`) and says where the value came
  from when it came from the user.
- Every int is bounded well below 2**63 (values may end up in replicated state).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import posixpath
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Mapping

from meshd.spec import label_key_problem, label_value_problem, name_problem, show_value

# --- defaults ------------------------------------------------------------------------
DEFAULT_DATA_DIR = "/var/lib/meshd"  # systemd's StateDirectory=meshd
DATA_DIR_ENV = "MESHD_DATA_DIR"
DEFAULT_SITE = "default"
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LOG_LEVEL = "info"  # lifecycle, membership and placement decisions; debug adds every sync and beat
DEFAULT_PORT = 7700  # unassigned by IANA; one port for all peer traffic of a node
DEFAULT_LISTEN = f"0.0.0.0:{DEFAULT_PORT}"
ADMIN_SOCKET_NAME = "admin.sock"
# Prometheus exposition (meshd.io.metrics): on the loopback by default, so nothing about the
# device is offered to its LAN unless the operator says so; 9740 is unassigned by IANA.
DEFAULT_METRICS = "127.0.0.1:9740"
METRICS_OFF = "off"
# How a node that holds no membership yet becomes a member (meshd.node.joining.start_path):
# "found" a new mesh, "join" one with a token (refusing to start without one, so that no
# device founds a mesh by accident), or "auto": join with a token, else found.
BOOTSTRAP_MODES = ("auto", "found", "join")
DEFAULT_BOOTSTRAP = "auto"  # the command line's behaviour; the packaged config says "join"

# Liveness: the heartbeat is the Raft leader's round trip to every member (an append-entries
# message and its answer); entries themselves go out at once, not on this period. Five round
# trips per lease, so a lost packet or two on a busy LAN do not mark a node down, while a
# dead node is noticed within about a second. Each heartbeat costs every member CPU: at
# 0.2 s an idle daemon stays under 1 % of a core (tests/bench/one_site.py).
DEFAULT_HEARTBEAT_INTERVAL = 0.2  # seconds between the leader's heartbeats to each member
DEFAULT_LEASE = 1.0  # seconds without a heartbeat answer before a node is marked down
# Raft: elections start after 0.7-1.2 s of leader silence (more than 3 heartbeats, as
# pysyncobj requires); measured on loopback this gives a new leader 0.6-0.9 s after the old
# one dies.
DEFAULT_RAFT_MIN_TIMEOUT = 0.7  # seconds
DEFAULT_RAFT_MAX_TIMEOUT = 1.2  # seconds
# What a node keeps out of placement for meshd itself, so workloads cannot starve it: an idle
# daemon uses ~1 % of a core and ~65 MB resident (tests/bench/one_site.py), with bursts at
# joins, compactions and snapshot loads; a Raspberry Pi with 1 GB keeps 128 MiB of it.
# Who workloads run as when their spec names nobody: a dedicated unprivileged user (the meshd
# package creates it), never root unless a spec says so. A daemon that is not root runs them
# as itself.
DEFAULT_WORKLOAD_USER = "meshd-workload"
WORKLOAD_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
DEFAULT_RESERVE_CPU = 0.1  # cores
DEFAULT_RESERVE_MEMORY_MB = 128
MAX_RESERVE_CPU = 1024.0  # as a spec's cpu (meshd.spec.MAX_CPU)
MAX_RESERVE_MEMORY_MB = 2**40
# The artifact store's share of the data dir (meshd.io.artifactstore): a few models or program
# bundles on a device with a small card. Upload: a member serving pieces to the rest of its
# site keeps this much of its link for itself and its workloads (0: no limit).
DEFAULT_ARTIFACT_QUOTA_MB = 10 * 1024
MAX_ARTIFACT_QUOTA_MB = 2**30
DEFAULT_ARTIFACT_UPLOAD_MBPS = 0.0
MAX_ARTIFACT_UPLOAD_MBPS = 100_000.0
# Workload logs: rotated per allocation so a chatty workload cannot fill an edge device.
DEFAULT_LOG_MAX_BYTES = 1024 * 1024  # one log file before rotation
DEFAULT_LOG_KEEP = 3  # rotated files kept per allocation
# Attestation: every member shows fresh evidence this often (and at once after a reboot), so
# software changed on a running device is noticed within this time; each check costs the
# member a hash of its installed code (a few ms) and the leader one verification.
DEFAULT_REATTEST_INTERVAL = 600.0  # seconds
# Cross-site sync: each side re-sends its state vector this often (repairs lost pushes; a
# session silent for 2.5 intervals, and at least 10 s, is taken for dead and redialled). Small next to how long
# a site may be cut off, large next to a state vector's cost in bytes.
DEFAULT_SYNC_INTERVAL = 30.0
MIN_SYNC_INTERVAL = 0.5  # more often only spends bandwidth on state vectors
MAX_SYNC_INTERVAL = 3600.0  # an hour: a dead session must still be noticed the same day
# A stopped app stays in the site's state (`meshctl apps`, its finished allocations) this
# long after its stop, then is forgotten there: a site that deploys and stops all day keeps a
# state of what it runs, not of everything it ever ran. The mesh document keeps its edits.
DEFAULT_STOPPED_APP_RETENTION = 86_400.0  # a day: long enough to look at what just stopped
MAX_STOPPED_APP_RETENTION = 10 * 365 * 86_400.0  # the command's bound (meshd.commands.PurgeApps)
# The mesh document keeps audit records, and app edits that lost a conflict or were superseded,
# this long (crdt.compaction); older ones are dropped, with a per-site summary of the dropped
# audit. 30 days: a month of "who did what" on the device (longer belongs in a log collector),
# conflicts stay visible to operators for weeks, and a year of one change a minute stays a
# document of a few MB that opens in well under a second (tests/bench/doc_compaction.py).
# A site cut off for longer still converges on reconnect (a full state transfer), but what it
# wrote and others dropped meanwhile by age is gone.
DEFAULT_DOCUMENT_RETENTION = 30 * 86400.0  # seconds; `--document-retention 30d`
MIN_DOCUMENT_RETENTION = 300.0  # five minutes, for tests and benchmarks of steady state; real sites want days
MAX_DOCUMENT_RETENTION = 10 * 365 * 86400.0  # ten years: beyond, keeping everything is the same
DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

# --- limits --------------------------------------------------------------------------
NODE_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
NODE_NAME_RULE = (
    "lowercase letters, digits, '.', '_' and '-', 1 to 63 characters, "
    "starting and ending with a letter or digit"
)
MAX_PATH_BYTES = 4096  # Linux PATH_MAX
MAX_SOCKET_PATH_BYTES = 107  # sockaddr_un.sun_path is 108 bytes including the final NUL
MAX_JOIN_TOKEN_CHARS = 4096  # tokens are short printable strings; bound what we hold
MAX_NODE_LABELS = 64  # labels travel in every node record; same bound as app constraints
MAX_PEERS = 256  # static peers; sites beyond that should use a few gateways
MIN_HEARTBEAT_INTERVAL = 0.01  # below 10 ms the Raft thread spins on heartbeats alone
MAX_HEARTBEAT_INTERVAL = 10.0  # elections wait for 3 of these: slower detects a dead leader too late
MAX_LEASE = 3600.0  # an hour without news is a dead node, whatever the network
MIN_RAFT_TIMEOUT = 0.03  # must exceed 3 heartbeats; 3 x the shortest heartbeat interval
MAX_RAFT_TIMEOUT = 600.0  # ten minutes without a leader is an outage, not tuning
MIN_LOG_MAX_BYTES = 4096  # one page: smaller rotates on every line
MAX_LOG_MAX_BYTES = 2**40  # bounded like every int we keep
MAX_LOG_KEEP = 1000  # rotated files per allocation; more belongs in a log collector
MIN_REATTEST_INTERVAL = 1.0  # more often only burns CPU on hashing
MAX_REATTEST_INTERVAL = 86400.0  # a day: membership certificates are renewed well within it
# The TCTIs libtss2 ships that reach a TPM (device) or a simulator (swtpm, mssim), with their
# configuration string: paths, host=, port=. Nothing that could run a command (tcti-cmd).
TPM_TCTI = re.compile(r"^(device|swtpm|mssim)(:[A-Za-z0-9/._,=:-]{0,200})?$")


class ConfigError(ValueError):
    """A refused option: `option` is its name as written on the command line, without `--`."""

    def __init__(self, option: str, reason: str) -> None:
        self.option = option
        self.reason = reason
        super().__init__(f"{option}: {reason}".replace("\n", "\\n"))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.option, self.reason))


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    """Everything `meshd run` needs to start; validated on construction."""

    data_dir: str
    site: str = DEFAULT_SITE
    name: str
    listen: str = DEFAULT_LISTEN  # "ip:port" (IPv6 as "[ip]:port"); port 0 picks a free one
    advertise: str | None = None  # None: the daemon picks the first non-loopback address
    admin_socket: str | None = None  # None: <data_dir>/admin.sock (always a str once built)
    labels: Mapping[str, str] = field(default_factory=dict)
    # Devices beside those found at start (meshd.io.devices): kind -> their paths, e.g.
    # {"coral": ("/dev/apex_0",)}; `--device coral=/dev/apex_0` (repeatable) or a [devices] table.
    devices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    join: str | None = None  # join token; None: found a new mesh unless bootstrap says join (or resume)
    bootstrap: str = DEFAULT_BOOTSTRAP  # auto | found | join: what a node with no membership does
    peers: tuple[str, ...] = ()  # static peers "ip:port"
    mdns: bool = True
    metrics: str = DEFAULT_METRICS  # "ip:port" of the Prometheus exposition, or "off"
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    lease: float = DEFAULT_LEASE
    raft_min_timeout: float = DEFAULT_RAFT_MIN_TIMEOUT
    raft_max_timeout: float = DEFAULT_RAFT_MAX_TIMEOUT
    log_max_bytes: int = DEFAULT_LOG_MAX_BYTES
    log_keep: int = DEFAULT_LOG_KEEP
    workload_user: str = DEFAULT_WORKLOAD_USER  # who workloads run as when their spec names nobody
    reserve_cpu: float = DEFAULT_RESERVE_CPU  # cores kept out of placement for meshd itself
    reserve_memory_mb: int = DEFAULT_RESERVE_MEMORY_MB  # MiB kept out of placement for meshd itself
    artifact_quota_mb: int = DEFAULT_ARTIFACT_QUOTA_MB  # MiB the artifact store may take
    artifact_upload_mbps: float = DEFAULT_ARTIFACT_UPLOAD_MBPS  # Mbit/s of pieces served to peers (0: no limit)
    reattest_interval: float = DEFAULT_REATTEST_INTERVAL
    sync_interval: float = DEFAULT_SYNC_INTERVAL
    stopped_app_retention: float = DEFAULT_STOPPED_APP_RETENTION
    document_retention: float = DEFAULT_DOCUMENT_RETENTION  # seconds (given as 30d, 12h, 90m or seconds)
    tpm: str = ""  # TPM 2.0 to attest with, as a TCTI ("device:/dev/tpmrm0", "swtpm:port=2321"); "" = none
    log_level: str = DEFAULT_LOG_LEVEL  # debug | info | warning | error: what the daemon logs to stderr
    # The options set on the command line or in the config file, not by default (a data dir's
    # membership is checked against what the operator said: meshd.node.joining.start_conflict).
    given: frozenset[str] = frozenset()
    # The config file the options were read from (None: none), named in refusals that tell the
    # operator which key to set; like `given`, not an option.
    config_file: str | None = None

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def listen_ip(self) -> str:
        return split_endpoint(self.listen)[0]

    @property
    def listen_port(self) -> int:
        return split_endpoint(self.listen)[1]

    @property
    def metrics_endpoint(self) -> tuple[str, int] | None:
        """(ip, port) of the Prometheus exposition, None when it is off."""
        return None if self.metrics == METRICS_OFF else split_endpoint(self.metrics)

    @property
    def admin_socket_path(self) -> str:
        """The admin socket path (never None, unlike the type of `admin_socket` suggests)."""
        assert self.admin_socket is not None
        return self.admin_socket


NOT_OPTIONS = frozenset({"given", "config_file"})  # where the options came from, not options
_FIELDS = {f.name for f in dataclasses.fields(NodeConfig)} - NOT_OPTIONS
# Options as the user writes them (field name with '-' for '_'), in the order of the docs.
OPTION_NAMES: tuple[str, ...] = tuple(f.name.replace("_", "-") for f in dataclasses.fields(NodeConfig)
                                      if f.name in _FIELDS)
# Spellings other than the field name, mapped to (field, negated?).
_ALIASES: dict[str, tuple[str, bool]] = {
    "label": ("labels", False),
    "peer": ("peers", False),
    "no_mdns": ("mdns", True),
    "device": ("devices", False),
}
_CLI_IGNORED = frozenset({"config"})  # the caller reads the file and passes its text


def option_name(field_name: str) -> str:
    """The name of a field as the operator writes it: `data_dir` -> `data-dir`."""
    return field_name.replace("_", "-")


def split_endpoint(text: str) -> tuple[str, int]:
    """Split "ip:port" or "[ipv6]:port" into (ip, port); ValueError with a reason if malformed."""
    if not isinstance(text, str):
        raise ValueError(f"must be IP:PORT, got {show_value(text)}")
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"must be IP:PORT (IPv6 as [IP]:PORT), got {show_value(text)}")
        version = 6
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"must be IP:PORT, got {show_value(text)}")
        version = 4
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"must be IP:PORT with a numeric IP address, got {show_value(text)}") from None
    if address.version != version:
        raise ValueError(f"must be IP:PORT (IPv6 as [IP]:PORT), got {show_value(text)}")
    if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
        raise ValueError(f"port must be a number from 0 to 65535, got {show_value(text)}")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port must be a number from 0 to 65535, got {show_value(text)}")
    return host, port


def resolve_config(
    cli: Mapping[str, Any],
    toml_text: str | None,
    env: Mapping[str, str],
    hostname: str,
    config_file: str | None = None,
) -> NodeConfig:
    """Merge command line, config file text, environment and defaults into a `NodeConfig`.

    `cli` maps option names with underscores to values, None meaning "not given"; `label` /
    `peer` are lists of "k=v" / "ip:port" strings (as argparse `append` builds them) and
    `no_mdns` is a flag (False meaning "not given"). The field names `labels`, `peers`,
    `mdns` are accepted too. `toml_text` is the config file's content, or None without one;
    `config_file` its path, which refusals at start name.
    """
    from_cli = _normalize(cli, source="cli")
    from_file = _normalize(_parse_toml(toml_text), source="file") if toml_text is not None else {}

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in _FIELDS:
        if name in from_cli:
            values[name], sources[name] = from_cli[name], "the command line"
        elif name in from_file:
            values[name], sources[name] = from_file[name], "the config file"
    if "data_dir" not in values:
        from_env = env.get(DATA_DIR_ENV) if isinstance(env, Mapping) else None
        if from_env:  # an empty variable counts as unset, as shells usually mean it
            values["data_dir"], sources["data_dir"] = from_env, f"${DATA_DIR_ENV}"
        else:
            values["data_dir"] = DEFAULT_DATA_DIR
    if "name" not in values:
        values["name"], sources["name"] = _name_from_hostname(hostname), "the hostname"

    for name in ("labels", "peers", "devices"):
        if name in values:
            try:
                values[name] = _LIST_CONVERTERS[name](values[name])
            except ConfigError as exc:
                raise _with_source(exc, sources.get(_field_of(exc.option))) from None
    given = frozenset(name for name, source in sources.items() if source in ("the command line", "the config file"))
    try:
        return NodeConfig(**values, given=given, config_file=config_file)
    except ConfigError as exc:
        raise _with_source(exc, sources.get(_field_of(exc.option))) from None


# --- input normalization -------------------------------------------------------------
def _parse_toml(text: str) -> dict[str, Any]:
    if not isinstance(text, str):
        raise ConfigError("config", f"must be TOML text, got {show_value(text)}")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"not valid TOML: {exc}") from None
    except (RecursionError, ValueError) as exc:
        raise ConfigError("config", f"not valid TOML: {exc.__class__.__name__}") from None


def _normalize(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Map user spellings (dashes, aliases, `no-mdns`) onto field names, refusing unknown ones."""
    if not isinstance(raw, Mapping):
        raise ConfigError("config", f"options must be a mapping, got {show_value(raw)}")
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}  # field -> how the user spelled it, to report conflicts
    where = "on the command line" if source == "cli" else "in the config file"
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ConfigError(show_value(key), f"unknown option {where}")
        if source == "cli" and key in _CLI_IGNORED:
            continue
        if source == "file" and isinstance(value, Mapping) and key not in ("labels", "label"):
            raise ConfigError(option_name(key), f"unknown section [{key}] {where}: options are top-level keys")
        canonical = key.replace("-", "_")
        negated = False
        if canonical in _ALIASES:
            canonical, negated = _ALIASES[canonical]
        elif canonical not in _FIELDS:
            raise ConfigError(
                option_name(key), f"unknown option {where} (known: {', '.join(_all_spellings())})"
            )
        if source == "cli" and _cli_not_given(key, value):
            continue
        if canonical in spelled:
            raise ConfigError(
                option_name(canonical),
                f"given twice {where}, as {spelled[canonical]!r} and {key!r}: keep one",
            )
        spelled[canonical] = key
        if negated:
            if not isinstance(value, bool):
                raise ConfigError(option_name(key), f"must be true or false, got {show_value(value)}")
            value = not value
        out[canonical] = value
    return out


def _cli_not_given(key: str, value: Any) -> bool:
    if value is None:
        return True
    if key.replace("-", "_") == "no_mdns" and value is False:  # a store_true flag left off
        return True
    if key.replace("-", "_") in ("label", "labels", "peer", "peers", "device", "devices") \
            and isinstance(value, (list, tuple, dict)):
        return len(value) == 0  # argparse `append` with an empty default
    return False


def _field_of(option: str) -> str:
    canonical = option.replace("-", "_")
    return _ALIASES[canonical][0] if canonical in _ALIASES else canonical


def _all_spellings() -> list[str]:
    return sorted({option_name(f) for f in _FIELDS} | {option_name(a) for a in _ALIASES})


def _labels_from(value: Any) -> dict[str, str]:
    """Labels as a table {k = "v"} or a list of "k=v" strings."""
    if isinstance(value, Mapping):
        return dict(value)
    if not isinstance(value, (list, tuple)):
        raise ConfigError("label", f'must be a list of "key=value" strings or a table, got {show_value(value)}')
    if len(value) > MAX_NODE_LABELS:
        raise ConfigError("label", f"at most {MAX_NODE_LABELS} labels allowed, got {len(value)}")
    labels: dict[str, str] = {}
    for item in value:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError("label", f'must be "key=value", got {show_value(item)}')
        key, _, val = item.partition("=")
        if key in labels:
            raise ConfigError("label", f"key {key!r} given twice")
        labels[key] = val
    return labels


def _peers_from(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        raise ConfigError("peer", f'must be a list of "ip:port" strings, got {show_value(value)}')
    if not isinstance(value, (list, tuple)):
        raise ConfigError("peer", f'must be a list of "ip:port" strings, got {show_value(value)}')
    return tuple(value)


def _devices_from(value: Any) -> dict[str, tuple[str, ...]]:
    """Devices as a table {kind = ["/dev/x", ...]} or a list of "kind=path" strings."""
    if isinstance(value, Mapping):
        out: dict[str, tuple[str, ...]] = {}
        for kind, paths in value.items():
            if isinstance(paths, str):
                paths = [paths]
            if not (isinstance(paths, (list, tuple)) and all(isinstance(p, str) for p in paths)):
                raise ConfigError("device", f"{kind}: must be a list of device paths, got {show_value(paths)}")
            out[str(kind)] = tuple(paths)
        return out
    if not isinstance(value, (list, tuple)):
        raise ConfigError("device", f'must be a list of "kind=path" strings or a table, got {show_value(value)}')
    grouped: dict[str, list[str]] = {}
    for item in value:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError("device", f'must be "kind=path", got {show_value(item)}')
        kind, _, path = item.partition("=")
        grouped.setdefault(kind, []).append(path)
    return {kind: tuple(paths) for kind, paths in grouped.items()}


_LIST_CONVERTERS = {"labels": _labels_from, "peers": _peers_from, "devices": _devices_from}


def _name_from_hostname(hostname: str) -> str:
    """The default node name: the hostname, lowercased; its first label if it is too long."""
    if not isinstance(hostname, str) or not hostname:
        raise ConfigError("name", "the hostname is empty: give the node a name with --name")
    name = hostname.strip().lower()
    if not NODE_NAME_RE.match(name):
        first_label = name.split(".", 1)[0]
        if NODE_NAME_RE.match(first_label):
            return first_label
    return name


def _with_source(exc: ConfigError, source: str | None) -> ConfigError:
    if source is None:
        return exc
    return ConfigError(exc.option, f"{exc.reason} (from {source})")


# --- validation ----------------------------------------------------------------------
def _validate(cfg: NodeConfig) -> None:
    def set_field(name: str, value: Any) -> None:
        object.__setattr__(cfg, name, value)

    _check_path(cfg.data_dir, "data-dir", MAX_PATH_BYTES)
    if cfg.config_file is not None:
        _check_path(cfg.config_file, "config", MAX_PATH_BYTES)
    problem = name_problem(cfg.site)
    if problem:
        raise ConfigError("site", problem)
    if not isinstance(cfg.name, str) or not NODE_NAME_RE.match(cfg.name):
        raise ConfigError("name", f"must be {NODE_NAME_RULE}, got {show_value(cfg.name)}")
    try:
        split_endpoint(cfg.listen)
    except ValueError as exc:
        raise ConfigError("listen", str(exc)) from None
    if cfg.metrics != METRICS_OFF:
        try:
            split_endpoint(cfg.metrics)
        except ValueError as exc:
            raise ConfigError("metrics", f"{exc} (or {METRICS_OFF})") from None
    if cfg.advertise is not None:
        set_field("advertise", _check_advertise(cfg.advertise))
    if cfg.admin_socket is None:
        set_field("admin_socket", posixpath.join(cfg.data_dir, ADMIN_SOCKET_NAME))
        try:
            _check_path(cfg.admin_socket, "admin-socket", MAX_SOCKET_PATH_BYTES)
        except ConfigError as exc:
            raise ConfigError(
                exc.option,
                f"{exc.reason}; it defaults to <data-dir>/{ADMIN_SOCKET_NAME}: "
                "use a shorter data-dir or set admin-socket",
            ) from None
    _check_path(cfg.admin_socket, "admin-socket", MAX_SOCKET_PATH_BYTES)
    set_field("labels", _check_labels(cfg.labels))
    if cfg.join is not None:
        _check_join(cfg.join)
    if cfg.bootstrap not in BOOTSTRAP_MODES:
        raise ConfigError("bootstrap", f"must be one of {', '.join(BOOTSTRAP_MODES)}, got {show_value(cfg.bootstrap)}")
    if cfg.bootstrap == "found" and cfg.join is not None:
        raise ConfigError("bootstrap", 'is "found" (found a new mesh), but a join token is given (join): '
                                       'drop join, or set bootstrap to "join"')
    set_field("peers", _check_peers(cfg.peers))
    set_field("devices", _check_devices(cfg.devices))
    if not isinstance(cfg.mdns, bool):
        raise ConfigError("mdns", f"must be true or false, got {show_value(cfg.mdns)}")

    _check_seconds(cfg, "heartbeat_interval", MIN_HEARTBEAT_INTERVAL, MAX_HEARTBEAT_INTERVAL)
    _check_seconds(cfg, "lease", MIN_HEARTBEAT_INTERVAL, MAX_LEASE)
    _check_seconds(cfg, "raft_min_timeout", MIN_RAFT_TIMEOUT, MAX_RAFT_TIMEOUT)
    _check_seconds(cfg, "raft_max_timeout", MIN_RAFT_TIMEOUT, MAX_RAFT_TIMEOUT)
    _check_int(cfg, "log_max_bytes", MIN_LOG_MAX_BYTES, MAX_LOG_MAX_BYTES)
    _check_int(cfg, "log_keep", 0, MAX_LOG_KEEP)
    if not isinstance(cfg.workload_user, str) or not WORKLOAD_USER_RE.fullmatch(cfg.workload_user):
        raise ConfigError("workload-user", f"must be a user name, got {show_value(cfg.workload_user)}")
    _check_number(cfg, "reserve_cpu", 0.0, MAX_RESERVE_CPU, "cores")
    _check_int(cfg, "reserve_memory_mb", 0, MAX_RESERVE_MEMORY_MB)
    _check_int(cfg, "artifact_quota_mb", 1, MAX_ARTIFACT_QUOTA_MB)
    _check_number(cfg, "artifact_upload_mbps", 0.0, MAX_ARTIFACT_UPLOAD_MBPS, "Mbit/s")
    _check_seconds(cfg, "reattest_interval", MIN_REATTEST_INTERVAL, MAX_REATTEST_INTERVAL)
    _check_seconds(cfg, "sync_interval", MIN_SYNC_INTERVAL, MAX_SYNC_INTERVAL)
    _check_seconds(cfg, "stopped_app_retention", 0.0, MAX_STOPPED_APP_RETENTION)
    given = cfg.document_retention
    set_field("document_retention", _duration(given, "document-retention"))
    try:
        _check_seconds(cfg, "document_retention", MIN_DOCUMENT_RETENTION, MAX_DOCUMENT_RETENTION)
    except ConfigError:
        raise ConfigError("document-retention", f"must be from 5m to 3650d (or that many seconds), "
                                                f"got {show_value(given)}") from None
    if cfg.log_level not in LOG_LEVELS:
        raise ConfigError("log-level", f"must be one of {', '.join(LOG_LEVELS)}, got {show_value(cfg.log_level)}")
    if not isinstance(cfg.tpm, str) or (cfg.tpm and not TPM_TCTI.match(cfg.tpm)):
        raise ConfigError("tpm", f"must be a TCTI like device:/dev/tpmrm0 or swtpm:host=127.0.0.1,port=2321, "
                                 f"got {show_value(cfg.tpm)}")

    # A single lost heartbeat must not mark a node down.
    if not cfg.lease > 2 * cfg.heartbeat_interval:
        raise ConfigError(
            "lease",
            f"must be more than twice heartbeat-interval ({cfg.heartbeat_interval:g} s), got {cfg.lease:g} s",
        )
    # pysyncobj asserts raftMinTimeout > 3 * appendEntriesPeriod (our heartbeat interval).
    if not cfg.raft_min_timeout > 3 * cfg.heartbeat_interval:
        raise ConfigError(
            "raft-min-timeout",
            f"must be more than 3 times heartbeat-interval ({cfg.heartbeat_interval:g} s), "
            f"got {cfg.raft_min_timeout:g} s",
        )
    # Election timeouts are drawn from [min, max]: an empty range makes split votes repeat.
    if not cfg.raft_max_timeout > cfg.raft_min_timeout:
        raise ConfigError(
            "raft-max-timeout",
            f"must be more than raft-min-timeout ({cfg.raft_min_timeout:g} s), got {cfg.raft_max_timeout:g} s",
        )


def _check_path(value: Any, option: str, max_bytes: int) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(option, f"must be a non-empty path, got {show_value(value)}")
    if "\0" in value:
        raise ConfigError(option, "must not contain a NUL character")
    size = len(value.encode("utf-8", "surrogateescape"))
    if size > max_bytes:
        raise ConfigError(option, f"path is {size} bytes long, at most {max_bytes} allowed")


def _check_advertise(value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError("advertise", f"must be an IP address, got {show_value(value)}")
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError("advertise", f"must be an IP address (no port), got {show_value(value)}") from None
    if address.is_unspecified or address.is_multicast:
        raise ConfigError("advertise", f"must be an address peers can reach, got {show_value(value)}")
    return value


DEVICE_KIND_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")  # as a spec names it (meshd.spec)
MAX_DEVICE_KINDS = 32
MAX_DEVICES_OF_A_KIND = 64  # as many as a spec may ask for (meshd.spec.MAX_DEVICES)


def _check_devices(value: Any) -> dict[str, tuple[str, ...]]:
    if not isinstance(value, Mapping):
        raise ConfigError("device", f"must be a table of kind = [paths], got {show_value(value)}")
    if len(value) > MAX_DEVICE_KINDS:
        raise ConfigError("device", f"at most {MAX_DEVICE_KINDS} kinds, got {len(value)}")
    out: dict[str, tuple[str, ...]] = {}
    for kind, paths in value.items():
        if not isinstance(kind, str) or not DEVICE_KIND_RE.fullmatch(kind):
            raise ConfigError("device", f"a kind is 1-32 of a-z 0-9 _ - starting with a letter, got {show_value(kind)}")
        paths = tuple(paths) if isinstance(paths, (list, tuple)) else paths
        if not (isinstance(paths, tuple) and 0 < len(paths) <= MAX_DEVICES_OF_A_KIND
                and all(isinstance(p, str) and p.startswith("/dev/") and "\0" not in p and len(p) <= MAX_PATH_BYTES
                        for p in paths)):
            raise ConfigError("device", f"{kind}: must be 1 to {MAX_DEVICES_OF_A_KIND} paths under /dev/, "
                                        f"got {show_value(paths)}")
        if len(set(paths)) != len(paths):
            raise ConfigError("device", f"{kind}: a path is given twice")
        out[kind] = paths
    return out


def _check_labels(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ConfigError("label", f"must be a table of key = value, got {show_value(value)}")
    if len(value) > MAX_NODE_LABELS:
        raise ConfigError("label", f"at most {MAX_NODE_LABELS} labels allowed, got {len(value)}")
    for key, val in value.items():
        problem = label_key_problem(key)
        if problem:
            raise ConfigError("label", problem)
        problem = label_value_problem(val)
        if problem:
            raise ConfigError("label", f"value of {key!r} {problem}")
    return dict(value)


def _check_join(value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError("join", f"must be a token from `meshctl token create`, got {show_value(value)}")
    if len(value) > MAX_JOIN_TOKEN_CHARS:
        raise ConfigError("join", f"token is {len(value)} characters, at most {MAX_JOIN_TOKEN_CHARS} allowed")
    if not value.isascii() or not value.isprintable() or any(ch.isspace() for ch in value):
        raise ConfigError("join", "token must be printable ASCII without spaces (was it copied whole?)")


def _check_peers(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ConfigError("peer", f'must be a list of "ip:port" strings, got {show_value(value)}')
    if len(value) > MAX_PEERS:
        raise ConfigError("peer", f"at most {MAX_PEERS} peers allowed, got {len(value)}")
    seen: set[str] = set()
    for peer in value:
        try:
            ip, port = split_endpoint(peer)
        except ValueError as exc:
            raise ConfigError("peer", str(exc)) from None
        if port == 0:
            raise ConfigError("peer", f"port must be a number from 1 to 65535, got {show_value(peer)}")
        if ipaddress.ip_address(ip).is_unspecified:
            raise ConfigError("peer", f"must be an address that can be dialled, got {show_value(peer)}")
        if peer in seen:
            raise ConfigError("peer", f"{peer!r} is listed twice")
        seen.add(peer)
    return tuple(value)


def _duration(value: Any, option: str) -> Any:
    """A duration as text ("30d", "12h", "90m", "45s", "3600") into seconds; numbers pass."""
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    scale = DURATION_UNITS.get(text[-1:], None)
    number = text[:-1] if scale is not None else text
    try:
        seconds = float(number) * (scale or 1.0)
    except ValueError:
        raise ConfigError(option, f"must be a duration like 30d, 12h, 90m or a number of seconds, "
                                  f"got {show_value(value)}") from None
    return seconds


def _check_seconds(cfg: NodeConfig, name: str, low: float, high: float) -> None:
    value = getattr(cfg, name)
    is_number = isinstance(value, int) and not isinstance(value, bool)
    is_number = is_number or (isinstance(value, float) and math.isfinite(value))
    if not is_number or not low <= value <= high:
        raise ConfigError(
            option_name(name), f"must be a number of seconds from {low:g} to {high:g}, got {show_value(value)}"
        )
    object.__setattr__(cfg, name, float(value))


def _check_number(cfg: NodeConfig, name: str, low: float, high: float, unit: str) -> None:
    value = getattr(cfg, name)
    is_number = isinstance(value, int) and not isinstance(value, bool)
    is_number = is_number or (isinstance(value, float) and math.isfinite(value))
    if not is_number or not low <= value <= high:
        raise ConfigError(option_name(name), f"must be a number of {unit} from {low:g} to {high:g}, "
                                             f"got {show_value(value)}")
    object.__setattr__(cfg, name, float(value))


def _check_int(cfg: NodeConfig, name: str, low: int, high: int) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(option_name(name), f"must be an integer from {low} to {high}, got {show_value(value)}")
