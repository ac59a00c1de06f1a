"""meshd.io.context: the address a node announces (CONTRACT: `--advertise`, default the
`--listen` IP when it names one; with a wildcard, the first non-loopback address)."""

from __future__ import annotations

import pytest

from meshd.config import resolve_config
from meshd.io.context import advertise_ip_for, default_advertise_ip


@pytest.mark.parametrize("cli, expected", [
    ({"listen": "127.0.0.1:7811"}, "127.0.0.1"),
    ({"listen": "198.18.0.5:0", "advertise": "198.18.0.9"}, "198.18.0.9"),
    ({"listen": "[2001:db8::5]:7700"}, "2001:db8::5"),
    ({"listen": "0.0.0.0:7700"}, None),
    ({"listen": "[::]:0"}, None),
])
def test_the_advertised_address(tmp_path, cli, expected):
    config = resolve_config({"data_dir": str(tmp_path), **cli}, None, {}, "host1")
    assert advertise_ip_for(config) == (expected or default_advertise_ip())
