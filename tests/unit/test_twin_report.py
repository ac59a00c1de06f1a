"""meshd.twin.report: the picture reads without the text; the files are the run's, exactly."""

from __future__ import annotations

import json
import textwrap
import xml.etree.ElementTree as ET

from meshd.twin import report
from meshd.twin.run import Twin
from meshd.twin.scenario import parse

SVG = "{http://www.w3.org/2000/svg}"


def _run(text: str) -> Twin:
    twin = Twin(parse(textwrap.dedent(text)))
    twin.run()
    return twin


def test_the_picture_has_a_lane_per_node_and_marks_each_failure():
    twin = _run("""\
        [sim]
        duration = "1m"
        [[site]]
        name = "f"
        [[site.node]]
        name = "n"
        count = 3
        [[app]]
        name = "web"
        replicas = 2
        command = ["web"]
        [[event]]
        at = "5s"
        do = "deploy"
        app = "web"
        [[event]]
        at = "20s"
        do = "kill"
        node = "n-2"
        """)
    root = ET.fromstring(report.picture(twin))
    titles = [t.text for t in root.iter(f"{SVG}title")]
    assert "kill n-2" in titles  # the failure's mark
    assert {"n-1: leader", "n-2: up", "n-2: down", "n-3: up"} <= set(titles)  # node lanes by state
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "site f" in texts and "n-3" in texts
    paths = [p for p in root.iter(f"{SVG}path") if p.find(f"{SVG}title").text == "running"]
    assert len(paths) == 1


def test_a_fleet_of_many_sites_is_drawn_as_strips_and_the_files_are_valid():
    twin = _run("""\
        [sim]
        duration = "30s"
        [[site]]
        name = "s"
        count = 10
        [[site.node]]
        name = "n"
        [[app]]
        name = "web"
        command = ["web"]
        sites = ["s"]
        [[event]]
        at = "2s"
        do = "deploy"
        app = "web"
        via = "s-1"
        """)
    root = ET.fromstring(report.picture(twin))
    assert any(t.text == "the fleet (10 sites)" for t in root.iter(f"{SVG}text"))
    titles = [t.text or "" for t in root.iter(f"{SVG}title")]
    assert "s-1: 100% running" in titles and "s-1: 100% on the newest version" in titles
    lines = report.timeline_jsonl(twin).splitlines()
    assert [json.loads(line) for line in lines] == twin.timeline
    assert json.loads(report.summary_json(twin)) == twin.summary()
    text = report.timeline_text(twin)
    assert text.count("\n") == len(twin.timeline)
