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


def test_the_config_digest_leaves_out_how_the_node_became_a_member_and_the_config_file():
    """A founder (bootstrap found) and the members that joined it (bootstrap join, a token)
    measure the same when they run with the same options, wherever the file is."""
    founder = resolve_config({"data_dir": "/d", "bootstrap": "found"}, None, {}, "h")
    joiner = resolve_config({"data_dir": "/d", "join": "mtk1_x"}, 'bootstrap = "join"\n', {}, "h",
                            config_file="/etc/meshd/meshd.toml")
    assert config_digest(founder) == config_digest(joiner)
