"""meshd.twin.scenario: a scenario is checked whole; every refusal names the key and its line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from meshd.twin.scenario import ScenarioError, key_lines, parse, seconds

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "sim"

GOOD = textwrap.dedent("""\
    [sim]
    name = "two sites"
    duration = "10m"
    seed = 4

    [[site]]
    name = "a"

    [[site.node]]
    name = "box"
    count = 3
    arch = "aarch64"
    cpu = 2
    memory_mb = 1024
    labels = { zone = "east" }

    [[site]]
    name = "b"

    [[site.node]]
    name = "gpu"
    devices = { gpu = 2 }

    [[link]]
    between = ["a", "b"]
    delay = "40ms"
    loss = 0.01
    bandwidth = "1mbit"

    [[app]]
    name = "web"
    replicas = 2
    command = ["web"]
    sites = ["a"]

    [[event]]
    at = "1m"
    do = "kill"
    node = "box-2"

    [[event]]
    at = 30
    do = "deploy"
    app = "web"
    via = "a"
    """)


def test_a_good_scenario_is_read_whole():
    s = parse(GOOD)
    assert (s.name, s.duration, s.seed) == ("two sites", 600.0, 4)
    assert [n.name for n in s.sites[0].nodes] == ["box-1", "box-2", "box-3"]
    assert s.nodes["box-2"].profile.arch == "aarch64" and s.nodes["box-2"].profile.labels == (("zone", "east"),)
    assert s.nodes["gpu"].profile.devices == (("gpu", 2),) and s.site_of("gpu") == "b"
    link = s.links[0]
    assert (link.a, link.b, link.delay, link.loss, link.bandwidth) == ("a", "b", 0.04, 0.01, 1e6)
    assert s.apps["web"].replicas == 2
    assert [(e.at, e.kind) for e in s.events] == [(30.0, "deploy"), (60.0, "kill")]  # in time order


def test_every_example_parses():
    found = sorted(EXAMPLES.glob("*.toml"))
    assert len(found) >= 3
    for path in found:
        parse(path.read_text(), lambda name: (path.parent / name).read_text())


def test_site_groups_make_sites_nodes_links_and_targets():
    s = parse(textwrap.dedent("""\
        [[site]]
        name = "hq"
        [[site.node]]
        name = "hq"
        [[site]]
        name = "store"
        count = 3
        [[site.node]]
        name = "till"
        count = 2
        [[link]]
        between = ["hq", "store"]
        [[app]]
        id = "pos-v1"
        name = "pos"
        command = ["pos"]
        sites = ["store"]
        [app.rollout]
        waves = [{ sites = ["store-1"] }, { percent = 100 }]
        """))
    assert [site.name for site in s.sites] == ["hq", "store-1", "store-2", "store-3"]
    assert [n.name for n in s.sites[2].nodes] == ["store-2-till-1", "store-2-till-2"]
    assert sorted(link.key for link in s.links) == [("hq", "store-1"), ("hq", "store-2"), ("hq", "store-3")]
    assert s.apps["pos-v1"].name == "pos" and s.apps["pos-v1"].sites == ("store-1", "store-2", "store-3")
    assert s.groups == {"store": ("store-1", "store-2", "store-3")}


@pytest.mark.parametrize("value,expected", [(5, 5.0), (0.5, 0.5), ("40ms", 0.04), ("5s", 5.0), ("10m", 600.0),
                                            ("2h", 7200.0), ("7d", 604800.0), ("1.5 min", 90.0), ("x", None),
                                            (True, None), ("5 weeks", None)])
def test_durations(value, expected):
    assert seconds(value) == expected


def _replace(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new, 1)


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.parametrize("text,key,needle,reason", [
    (_replace('seed = 4', 'seed = 4\ncolour = "red"'), "sim.colour", "colour", "unknown key"),
    (_replace('count = 3', 'count = 3\nspeed = 9'), "site[0].node[0].speed", "speed", "unknown key"),
    (_replace('cpu = 2', 'cpu = -2'), "site[0].node[0].cpu", "cpu = -2", "cores from 0.1"),
    (_replace('memory_mb = 1024', 'memory_mb = 0'), "site[0].node[0].memory_mb", "memory_mb = 0", "MB from 16"),
    (_replace('devices = { gpu = 2 }', 'devices = { gpu = -1 }'), "site[1].node[0].devices.gpu", "devices",
     "count from 0"),
    (_replace('at = "1m"', 'at = "-5s"'), "event[0].at", 'at = "-5s"', "seconds or a duration"),
    (_replace('at = "1m"', 'at = -5'), "event[0].at", "at = -5", "must not be negative"),
    (_replace('at = "1m"', 'at = "11m"'), "event[0].at", 'at = "11m"', "after the end of the run"),
    (_replace('between = ["a", "b"]', 'between = ["a", "mars"]'), "link[0].between", "mars", "no site mars"),
    (_replace('node = "box-2"', 'node = "box-9"'), "event[0].node", "box-9", "no node"),
    (_replace('do = "kill"', 'do = "explode"'), "event[0].do", "explode", "must be one of"),
    (_replace('do = "kill"', 'do = "kill"\nreplicas = 3'), "event[0].replicas", "replicas = 3", "unknown key"),
    (_replace('app = "web"', 'app = "db"'), "event[1].app", 'app = "db"', "no app"),
    (_replace('sites = ["a"]', 'sites = ["z"]'), "app[0].sites", 'sites = ["z"]', "no site z"),
    (_replace('replicas = 2', 'replicas = "two"'), "app[0].replicas", 'replicas = "two"', ""),
    (_replace('name = "gpu"', 'name = "box-1"'), "site[1].node[0].name", 'name = "box-1"', "named twice"),
    (_replace('arch = "aarch64"', 'arch = "sparc"'), "site[0].node[0].arch", "sparc", "must be one of"),
    (_replace('bandwidth = "1mbit"', 'bandwidth = "fast"'), "link[0].bandwidth", "fast", "a rate"),
    (_replace('loss = 0.01', 'loss = 1.5'), "link[0].loss", "loss = 1.5", "a share"),
    (_replace('duration = "10m"', 'duration = 0'), "sim.duration", "duration = 0", "more than 0"),
])
def test_bad_input_names_the_key_and_its_line(text, key, needle, reason):
    with pytest.raises(ScenarioError) as e:
        parse(text)
    assert e.value.key == key
    assert e.value.line == _line_of(text, needle)
    assert reason in e.value.reason
    assert str(e.value).startswith(f"line {e.value.line}: {key}: ")


def test_broken_toml_and_missing_sites_are_refused():
    with pytest.raises(ScenarioError) as e:
        parse('[sim]\nname = "x"\nduration = \n')
    assert e.value.key == "toml" and e.value.line == 3
    with pytest.raises(ScenarioError) as e:
        parse('[sim]\nname = "x"\n')
    assert e.value.key == "site"


def test_key_lines_follow_array_tables():
    lines = key_lines(GOOD)
    assert lines[("site", 1, "node", 0, "name")] == _line_of(GOOD, 'name = "gpu"')
    assert lines[("event", 1, "via")] == _line_of(GOOD, 'via = "a"')
