"""Node configuration: precedence of command line, file, environment and defaults; validation."""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.config import (
    DEFAULT_DATA_DIR,
    OPTION_NAMES,
    ConfigError,
    NodeConfig,
    resolve_config,
    split_endpoint,
)

HOST = "edge-01"


def resolve(cli: dict[str, Any] | None = None, toml: str | None = None, env: dict[str, str] | None = None,
            hostname: str = HOST) -> NodeConfig:
    return resolve_config(cli or {}, toml, env or {}, hostname)


def test_defaults() -> None:
    cfg = resolve()
    assert cfg == NodeConfig(
        data_dir="/var/lib/meshd",
        site="default",
        name=HOST,
        listen="0.0.0.0:7700",
        advertise=None,
        admin_socket="/var/lib/meshd/admin.sock",
        labels={},
        join=None,
        peers=(),
        mdns=True,
        heartbeat_interval=0.2,
        lease=1.0,
        raft_min_timeout=0.7,
        raft_max_timeout=1.2,
        log_max_bytes=1024 * 1024,
        log_keep=3,
    )
    assert (cfg.listen_ip, cfg.listen_port) == ("0.0.0.0", 7700)


def test_option_names_are_dashed_fields() -> None:
    assert "data-dir" in OPTION_NAMES and "raft-min-timeout" in OPTION_NAMES
    assert len(OPTION_NAMES) == len(dataclasses.fields(NodeConfig)) - 2  # all but `given`, `config_file`
    assert "given" not in OPTION_NAMES and "config-file" not in OPTION_NAMES


# --- precedence ---------------------------------------------------------------------
def test_cli_beats_file_beats_env_beats_default() -> None:
    toml = 'data-dir = "/from/file"\nsite = "file-site"\n'
    env = {"MESHD_DATA_DIR": "/from/env"}
    assert resolve({"data_dir": "/from/cli"}, toml, env).data_dir == "/from/cli"
    assert resolve({"data_dir": None}, toml, env).data_dir == "/from/file"
    assert resolve({}, "site = 'x'", env).data_dir == "/from/env"
    assert resolve({}, None, {}).data_dir == DEFAULT_DATA_DIR
    assert resolve({"site": "cli-site"}, toml).site == "cli-site"
    assert resolve({"site": None}, toml).site == "file-site"


def test_empty_env_var_counts_as_unset() -> None:
    assert resolve(env={"MESHD_DATA_DIR": ""}).data_dir == DEFAULT_DATA_DIR


def test_admin_socket_follows_the_resolved_data_dir() -> None:
    assert resolve({"data_dir": "/srv/m"}).admin_socket == "/srv/m/admin.sock"
    assert resolve({"data_dir": "/srv/m/"}).admin_socket == "/srv/m/admin.sock"
    assert resolve(env={"MESHD_DATA_DIR": "/e"}).admin_socket == "/e/admin.sock"
    assert resolve({"admin_socket": "/run/x.sock"}).admin_socket == "/run/x.sock"


def test_cli_list_replaces_file_list() -> None:
    toml = 'label = ["a=1", "b=2"]\npeer = ["198.18.0.1:7700"]\n'
    cfg = resolve({"label": ["c=3"], "peer": ["198.18.0.2:7700"]}, toml)
    assert cfg.labels == {"c": "3"}
    assert cfg.peers == ("198.18.0.2:7700",)
    # argparse `append` leaves None (or an empty default) when the flag is not given
    assert resolve({"label": None, "peer": []}, toml).labels == {"a": "1", "b": "2"}


@pytest.mark.parametrize(
    ("cli", "toml", "mdns"),
    [
        ({}, None, True),
        ({"no_mdns": False}, None, True),
        ({"no_mdns": True}, None, False),
        ({}, "no-mdns = true", False),
        ({}, "no_mdns = false", True),
        ({}, "mdns = false", False),
        ({"mdns": True}, "mdns = false", True),
        ({"no_mdns": True}, "mdns = true", False),
        ({"no_mdns": False}, "mdns = false", False),  # store_true left off: the file decides
    ],
)
def test_mdns_spellings(cli: dict, toml: str | None, mdns: bool) -> None:
    assert resolve(cli, toml).mdns is mdns


@pytest.mark.parametrize(
    "toml",
    [
        'data-dir = "/d"\nadmin-socket = "/d/s"\nheartbeat-interval = 0.125\nlease = 2\nlabel = ["zone=north", "eq=a=b"]\npeer = ["198.18.0.9:1"]',
        'data_dir = "/d"\nadmin_socket = "/d/s"\nheartbeat_interval = 0.125\nlease = 2.0\nlabels = { zone = "north", eq = "a=b" }\npeers = ["198.18.0.9:1"]',
        'data_dir = "/d"\nadmin_socket = "/d/s"\nheartbeat_interval = 0.125\nlease = 2\n[labels]\nzone = "north"\neq = "a=b"\n',
    ],
    ids=["dashes", "underscores", "labels section"],
)
def test_file_spellings(toml: str) -> None:
    cfg = resolve(toml=toml)
    assert cfg.data_dir == "/d" and cfg.admin_socket == "/d/s"
    assert cfg.heartbeat_interval == 0.125 and cfg.lease == 2.0 and isinstance(cfg.lease, float)
    assert cfg.labels == {"zone": "north", "eq": "a=b"}


def test_tuning_from_cli() -> None:
    cfg = resolve({"raft_min_timeout": 1.0, "raft_max_timeout": 2.0, "heartbeat_interval": 0.2,
                   "log_max_bytes": 4096, "log_keep": 0})
    assert (cfg.raft_min_timeout, cfg.raft_max_timeout, cfg.heartbeat_interval) == (1.0, 2.0, 0.2)
    assert (cfg.log_max_bytes, cfg.log_keep) == (4096, 0)


@pytest.mark.parametrize(("given", "seconds"), [("30d", 2592000.0), ("12h", 43200.0), ("90m", 5400.0),
                                                ("7200s", 7200.0), ("7200", 7200.0), (86400, 86400.0)])
def test_document_retention_is_a_duration(given, seconds) -> None:
    assert resolve({"document_retention": given}).document_retention == seconds
    assert resolve({}).document_retention == 30 * 86400.0


@pytest.mark.parametrize(
    ("hostname", "name"),
    [("edge-01", "edge-01"), ("Edge-01", "edge-01"), ("host.example.com", "host.example.com"),
     ("n" * 40 + "." + "d" * 40, "n" * 40), ("host.example.com.", "host")],
)
def test_name_defaults_to_hostname(hostname: str, name: str) -> None:
    assert resolve(hostname=hostname).name == name


def test_ipv6_endpoints() -> None:
    cfg = resolve({"listen": "[::]:0", "advertise": "2001:db8::1", "peer": ["[2001:db8::2]:7700"]})
    assert (cfg.listen_ip, cfg.listen_port) == ("::", 0)
    assert cfg.peers == ("[2001:db8::2]:7700",)


# --- refusals -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cli", "toml", "option", "reason_part"),
    [
        ({"frobnicate": 1}, None, "frobnicate", "unknown option on the command line"),
        ({}, "frobnicate = 1", "frobnicate", "unknown option in the config file"),
        ({}, "[daemon]\nsite = 'a'", "daemon", "unknown section"),
        ({}, "site = ", "config", "not valid TOML"),
        ({}, 'data-dir = "/a"\ndata_dir = "/b"', "data-dir", "given twice"),
        ({}, 'label = ["a=1"]\nlabels = {b = "2"}', "labels", "given twice"),
        ({}, "mdns = true\nno-mdns = true", "mdns", "given twice"),
        ({}, "no-mdns = 1", "no-mdns", "true or false"),
        ({}, "mdns = 'yes'", "mdns", "true or false"),
        ({"data_dir": ""}, None, "data-dir", "non-empty"),
        ({"data_dir": "/a\0b"}, None, "data-dir", "NUL"),
        ({"data_dir": "/" + "d" * 5000}, None, "data-dir", "4096"),
        ({"data_dir": "/" + "d" * 100}, None, "admin-socket", "defaults to <data-dir>/admin.sock"),
        ({"admin_socket": "/" + "s" * 120}, None, "admin-socket", "107"),
        ({}, "site = 5", "site", "string"),
        ({"site": "Factory"}, None, "site", "lowercase"),
        ({"site": "a.b"}, None, "site", "lowercase"),
        ({"site": "-a"}, None, "site", "lowercase"),
        ({"name": "Node"}, None, "name", "lowercase"),
        ({"name": "n" * 64}, None, "name", "63"),
        ({"name": "node 1"}, None, "name", "lowercase"),
        ({"listen": "7700"}, None, "listen", "IP:PORT"),
        ({"listen": "localhost:7700"}, None, "listen", "numeric IP"),
        ({"listen": "0.0.0.0:65536"}, None, "listen", "0 to 65535"),
        ({"listen": "0.0.0.0:-1"}, None, "listen", "0 to 65535"),
        ({"listen": "0.0.0.0:"}, None, "listen", "0 to 65535"),
        ({"listen": "0.0.0.0:+80"}, None, "listen", "0 to 65535"),
        ({"listen": "::1:7700"}, None, "listen", "[IP]:PORT"),
        ({"listen": "[127.0.0.1]:7700"}, None, "listen", "[IP]:PORT"),
        ({"listen": "[::1]7700"}, None, "listen", "[IP]:PORT"),
        ({}, "listen = 7700", "listen", "IP:PORT"),
        ({"advertise": "198.18.0.1:7700"}, None, "advertise", "no port"),
        ({"advertise": "edge-01.local"}, None, "advertise", "IP address"),
        ({"advertise": "0.0.0.0"}, None, "advertise", "reach"),
        ({"advertise": "224.0.0.251"}, None, "advertise", "reach"),
        ({"label": ["zone"]}, None, "label", "key=value"),
        ({"label": ["=x"]}, None, "label", "label key"),
        ({"label": ["a b=x"]}, None, "label", "label key"),
        ({"label": ["a=1", "a=2"]}, None, "label", "twice"),
        ({"label": ["a=x\ny"]}, None, "label", "control"),
        ({}, "labels = 'a=1'", "label", "key=value"),
        ({}, "labels = { a = 1 }", "label", "string"),
        ({"label": [f"k{i}=v" for i in range(65)]}, None, "label", "at most 64"),
        ({"join": ""}, None, "join", "token"),
        ({"join": "abc def"}, None, "join", "without spaces"),
        ({"join": "x" * 5000}, None, "join", "4096"),
        ({}, "join = 5", "join", "token"),
        ({"bootstrap": "create"}, None, "bootstrap", "one of auto, found, join"),
        ({}, "bootstrap = true", "bootstrap", "one of auto, found, join"),
        ({"bootstrap": "found", "join": "mtk1_x"}, None, "bootstrap", 'drop join, or set bootstrap to "join"'),
        ({"join": "mtk1_x"}, "bootstrap = 'found'", "bootstrap", "but a join token is given"),
        ({"peer": ["198.18.0.1:0"]}, None, "peer", "1 to 65535"),
        ({"peer": ["198.18.0.1"]}, None, "peer", "IP:PORT"),
        ({"peer": ["0.0.0.0:7700"]}, None, "peer", "dialled"),
        ({"peer": ["198.18.0.1:7700", "198.18.0.1:7700"]}, None, "peer", "twice"),
        ({}, 'peer = "198.18.0.1:7700"', "peer", "list"),
        ({}, "peers = [1]", "peer", "IP:PORT"),
        ({"heartbeat_interval": 0}, None, "heartbeat-interval", "seconds"),
        ({"heartbeat_interval": float("nan")}, None, "heartbeat-interval", "seconds"),
        ({"heartbeat_interval": True}, None, "heartbeat-interval", "seconds"),
        ({}, "heartbeat-interval = '1'", "heartbeat-interval", "seconds"),
        ({"lease": 0.15}, None, "lease", "twice heartbeat-interval"),
        ({"lease": float("inf")}, None, "lease", "seconds"),
        ({"heartbeat_interval": 1.0}, None, "lease", "twice heartbeat-interval"),
        ({"raft_min_timeout": 0.15}, None, "raft-min-timeout", "3 times heartbeat-interval"),
        ({"heartbeat_interval": 0.25}, None, "raft-min-timeout", "3 times heartbeat-interval"),
        ({"raft_max_timeout": 0.4}, None, "raft-max-timeout", "more than raft-min-timeout"),
        ({"raft_min_timeout": 1.5}, None, "raft-max-timeout", "more than raft-min-timeout"),
        ({"raft_min_timeout": 0.001}, None, "raft-min-timeout", "seconds"),
        ({"raft_max_timeout": 10**400}, None, "raft-max-timeout", "huge"),
        ({"log_max_bytes": 100}, None, "log-max-bytes", "4096"),
        ({"log_max_bytes": 2**63}, None, "log-max-bytes", "integer"),
        ({"log_max_bytes": 4096.0}, None, "log-max-bytes", "integer"),
        ({"log_keep": -1}, None, "log-keep", "0 to 1000"),
        ({}, "log-keep = true", "log-keep", "integer"),
        ({"reserve_cpu": -0.1}, None, "reserve-cpu", "cores from 0"),
        ({"reserve_cpu": float("nan")}, None, "reserve-cpu", "cores"),
        ({}, 'reserve-cpu = "1"', "reserve-cpu", "cores"),
        ({"reserve_memory_mb": 1.5}, None, "reserve-memory-mb", "integer"),
        ({"reserve_memory_mb": -1}, None, "reserve-memory-mb", "integer from 0"),
        ({"metrics": "localhost:9740"}, None, "metrics", "numeric IP address"),
        ({"metrics": "on"}, None, "metrics", "or off"),
        ({"document_retention": "30 days"}, None, "document-retention", "duration like 30d"),
        ({"document_retention": "4m"}, None, "document-retention", "from 5m to 3650d"),
        ({"document_retention": "-3d"}, None, "document-retention", "from 5m to 3650d"),
        ({"document_retention": "inf"}, None, "document-retention", "from 5m to 3650d"),
        ({}, "document-retention = true", "document-retention", "from 5m to 3650d"),
        ({}, "document-retention = '4000d'", "document-retention", "from 5m to 3650d"),
    ],
)
def test_bad_option_is_refused_and_named(cli: dict, toml: str | None, option: str, reason_part: str) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve(cli, toml)
    assert caught.value.option == option
    assert reason_part in caught.value.reason
    assert str(caught.value).startswith(f"{option}: ")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("cli", "toml", "env", "source"),
    [
        ({"listen": "x"}, None, {}, "(from the command line)"),
        ({}, 'listen = "x"', {}, "(from the config file)"),
        ({}, "label = ['x']", {}, "(from the config file)"),
        ({}, None, {"MESHD_DATA_DIR": "/" + "d" * 5000}, "(from $MESHD_DATA_DIR)"),
    ],
)
def test_refusal_says_where_the_value_came_from(cli: dict, toml: str | None, env: dict, source: str) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve(cli, toml, env)
    assert caught.value.reason.endswith(source)


def test_invalid_hostname_asks_for_a_name() -> None:
    with pytest.raises(ConfigError) as caught:
        resolve(hostname="my host")
    assert caught.value.option == "name" and "hostname" in caught.value.reason
    with pytest.raises(ConfigError) as caught:
        resolve(hostname="")
    assert "--name" in caught.value.reason


def test_config_error_pickles_and_is_a_value_error() -> None:
    err = ConfigError("listen", "bad")
    back = pickle.loads(pickle.dumps(err))
    assert (back.option, back.reason, str(back)) == ("listen", "bad", "listen: bad")
    assert isinstance(err, ValueError)


# --- NodeConfig built by hand ---------------------------------------------------------
def test_node_config_is_validated_on_construction() -> None:
    with pytest.raises(ConfigError):
        NodeConfig(data_dir="/d", name="n", listen="nowhere")
    cfg = NodeConfig(data_dir="/d", name="n", peers=["198.18.0.1:1"], labels={"a": "b"})  # type: ignore[arg-type]
    assert cfg.peers == ("198.18.0.1:1",) and cfg.admin_socket == "/d/admin.sock"


def test_node_config_is_frozen() -> None:
    cfg = NodeConfig(data_dir="/d", name="n")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.site = "other"  # type: ignore[misc]


def test_node_config_copies_the_callers_labels() -> None:
    labels = {"a": "1"}
    cfg = NodeConfig(data_dir="/d", name="n", labels=labels)
    labels["a"] = "2"
    assert cfg.labels == {"a": "1"}


# --- endpoints ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:0", ("127.0.0.1", 0)), ("198.18.0.1:65535", ("198.18.0.1", 65535)),
     ("[::1]:7700", ("::1", 7700)), ("[fe80::1%eth0]:1", ("fe80::1%eth0", 1))],
)
def test_split_endpoint(text: str, expected: tuple[str, int]) -> None:
    assert split_endpoint(text) == expected


@given(st.text(max_size=30))
@settings(max_examples=300)
def test_split_endpoint_raises_only_value_error(text: str) -> None:
    try:
        ip, port = split_endpoint(text)
    except ValueError as err:
        assert "\n" not in str(err)
    else:
        assert 0 <= port <= 65535 and ip


option_values = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | st.lists(st.text(max_size=12), max_size=3)


@given(st.dictionaries(st.sampled_from([n.replace("-", "_") for n in OPTION_NAMES] + ["label", "peer", "no_mdns"]),
                       option_values, max_size=5))
@settings(max_examples=300)
def test_junk_cli_values_raise_only_config_error(cli: dict[str, Any]) -> None:
    try:
        cfg = resolve(cli)
    except ConfigError as err:
        assert "\n" not in str(err)
    else:
        assert isinstance(cfg, NodeConfig)


def test_the_config_remembers_which_options_the_operator_set():
    config = resolve_config({"data_dir": "/d", "site": None, "listen": "127.0.0.1:0"}, 'name = "n"\n', {}, "host1")
    assert config.given == {"data_dir", "listen", "name"}  # not site: its default
    assert "site" in resolve_config({"data_dir": "/d"}, 'site = "default"\n', {}, "h").given


def test_the_log_level_comes_from_the_command_line_or_the_config_file():
    assert resolve_config({"data_dir": "/d"}, None, {}, "h").log_level == "info"
    assert resolve_config({"data_dir": "/d"}, 'log-level = "debug"\n', {}, "h").log_level == "debug"
    assert resolve_config({"data_dir": "/d", "log_level": "error"}, 'log-level = "debug"\n', {}, "h").log_level == "error"
    with pytest.raises(ConfigError, match="log-level.*must be one of debug, info, warning, error"):
        resolve_config({"data_dir": "/d"}, 'log-level = "loud"\n', {}, "h")


def test_bootstrap_defaults_to_auto_and_comes_from_the_command_line_or_the_config_file():
    assert resolve().bootstrap == "auto" and "bootstrap" not in resolve().given
    assert resolve({}, 'bootstrap = "join"\n').bootstrap == "join"
    assert resolve({"bootstrap": "found"}, 'bootstrap = "join"\n').bootstrap == "found"
    assert resolve({"join": "mtk1_x"}, 'bootstrap = "join"\n').join == "mtk1_x"
    with pytest.raises(ConfigError) as caught:  # found with a token contradicts itself, wherever from
        resolve({"bootstrap": "found"}, 'join = "mtk1_x"\n')
    assert caught.value.reason.endswith("(from the command line)")


def test_the_config_file_path_is_kept_for_refusals_but_is_not_an_option():
    config = resolve_config({}, 'site = "s"\n', {}, "h", config_file="/etc/meshd/meshd.toml")
    assert config.config_file == "/etc/meshd/meshd.toml" and "config_file" not in config.given
    assert resolve_config({}, None, {}, "h").config_file is None
    with pytest.raises(ConfigError, match="unknown option in the config file"):
        resolve_config({}, 'config-file = "/x"\n', {}, "h")


def test_the_command_line_offers_exactly_the_bootstrap_modes():
    from meshd.cli.meshd_main import build_parser
    from meshd.config import BOOTSTRAP_MODES
    run = build_parser()._subparsers._group_actions[0].choices["run"]
    (action,) = [a for a in run._actions if a.dest == "bootstrap"]
    assert tuple(action.choices) == BOOTSTRAP_MODES and action.default is None  # None: not given, so auto
