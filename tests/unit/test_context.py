"""meshd.io.context: the address a node announces (CONTRACT: `--advertise`, default the
`--listen` IP when it names one; with a wildcard, the first non-loopback address)."""

from __future__ import annotations

import pytest

from meshd.config import resolve_config
from meshd.io.context import advertise_ip_for, advertise_mismatch, default_advertise_ip


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


def test_a_node_says_when_peers_may_not_reach_it_at_the_address_it_announces():
    here = {"127.0.0.1", "192.0.2.10", "::1"}
    assert advertise_mismatch("192.0.2.10", "192.0.2.10", here) is None
    assert advertise_mismatch("0.0.0.0", "192.0.2.10", here) is None
    reason = advertise_mismatch("127.0.0.1", "192.0.2.10", here)
    assert reason and "listens only on 127.0.0.1" in reason and "--advertise 127.0.0.1" in reason
    reason = advertise_mismatch("0.0.0.0", "203.0.113.7", here)
    assert reason and "not an address of this device" in reason
