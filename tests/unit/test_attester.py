"""meshd.io.attester: what a node's evidence measures of its config."""

from __future__ import annotations

from meshd.config import resolve_config
from meshd.io.attester import config_digest


def test_the_config_digest_measures_values_not_where_they_came_from():
    from_cli = resolve_config({"data_dir": "/d", "site": "lab"}, None, {}, "h")
    from_file = resolve_config({"data_dir": "/d"}, 'site = "lab"\n', {}, "h")
    assert from_cli.given != from_file.given
    assert config_digest(from_cli) == config_digest(from_file)
    assert config_digest(resolve_config({"data_dir": "/d", "site": "shop"}, None, {}, "h")) != config_digest(from_cli)
