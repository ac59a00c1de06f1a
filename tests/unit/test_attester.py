"""meshd.io.attester: what a node's evidence measures of its config."""

from __future__ import annotations

from meshd.config import resolve_config
from meshd.io.attester import config_digest


def test_the_config_digest_measures_values_not_where_they_came_from():
    said = resolve_config({"data_dir": "/d", "site": "default"}, None, {}, "h")
    by_default = resolve_config({"data_dir": "/d"}, None, {}, "h")
    assert said.given != by_default.given and said.site == by_default.site
    assert config_digest(said) == config_digest(by_default)
    assert config_digest(resolve_config({"data_dir": "/d", "site": "shop"}, None, {}, "h")) != config_digest(said)
