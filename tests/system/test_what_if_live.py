"""`meshctl plan --what-if` on a real site, then the change made for real: the same answer."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from meshd.io.localsite import sleeper_app, wait_for

pytestmark = pytest.mark.system


def test_what_if_a_node_goes_down_matches_what_the_site_then_does(three, tmp_path):
    first = three.nodes[0]
    first.call("deploy", spec_toml=sleeper_app("web", 2), wait=True, timeout=30)
    by_node = {a["node"]: a for a in three.running("web", via=first)}
    victim = next(n for n in three.nodes[1:] if n.name in by_node)  # not the leader
    (tmp_path / "web.toml").write_text(sleeper_app("web", 2))
    shown = subprocess.run([sys.executable, "-m", "meshd.cli.meshctl", "--socket",
                            first.socket, "--json", "plan", str(tmp_path / "web.toml"), "--what-if",
                            f"down:{victim.name}"], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    answer = json.loads(shown.stdout)
    [move] = answer["moves"]
    assert move["app"] == "web" and move["to"] not in (None, victim.name)
    assert {a["node"] for a in three.running("web", via=first)} == set(by_node)  # nothing changed
    victim.kill()
    wait_for(lambda: {a["node"] for a in three.running("web", via=first)} == (set(by_node) - {victim.name})
             | {move["to"]}, 30, interval=0.2, what="the replica replaced where the what-if said")
