"""meshd.twin.run: small scenarios on the real cores, their outcomes asserted."""

from __future__ import annotations

import textwrap
from pathlib import Path

from meshd.twin import report
from meshd.twin.run import Twin
from meshd.twin.scenario import parse

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "sim"

SITE = textwrap.dedent("""\
    [sim]
    name = "five boxes"
    duration = "{duration}"
    seed = {seed}

    [[site]]
    name = "f"

    [[site.node]]
    name = "n"
    count = 5
    cpu = 4
    memory_mb = 4096

    [[site.node]]
    name = "gpu"
    devices = {{ gpu = 1 }}

    [[app]]
    name = "web"
    replicas = 3
    command = ["web"]
    [app.resources]
    cpu = 1

    [[app]]
    name = "infer"
    replicas = 2
    command = ["infer"]
    [app.resources]
    devices = {{ gpu = 1 }}

    [[event]]
    at = "5s"
    do = "deploy"
    app = "web"

    [[event]]
    at = "5s"
    do = "deploy"
    app = "infer"
    """)


def run(text: str, seed: int | None = None) -> Twin:
    twin = Twin(parse(text), seed)
    twin.run()
    return twin


def site_text(events: str = "", duration: str = "2m", seed: int = 1) -> str:
    return SITE.format(duration=duration, seed=seed) + textwrap.dedent(events)


def where(twin: Twin, site: str, app: str) -> list[str]:
    return twin.summary()["sites"][site]["apps"][app]["nodes"]


def test_placement_and_what_cannot_be_placed_with_the_reason():
    twin = run(site_text())
    summary = twin.summary()
    assert summary["sites"]["f"]["apps"]["web"]["running"] == 3
    assert summary["sites"]["f"]["apps"]["infer"] == {
        "wanted": 2, "running": 1, "nodes": ["gpu"], "unplaced_reasons": summary["unplaced"][0]["reasons"]}
    [unplaced] = summary["unplaced"]
    assert (unplaced["app"], unplaced["missing"]) == ("infer", 1)
    assert "gpu" in unplaced["reasons"][0]  # no other node has a free gpu
    assert summary["placed"] == 4


def test_the_leader_lost_another_is_elected_and_its_replica_replaced_elsewhere():
    twin = run(site_text("""
        [[event]]
        at = "30s"
        do = "kill"
        node = "n-1"
        """))
    lines = [e["text"] for e in twin.timeline]
    elected = [e for e in twin.timeline if "elected leader (term 2)" in e["text"]]
    assert len(elected) == 1
    assert 30.7 <= elected[0]["t"] <= 30.0 + 1.2 + 0.1  # an election timeout after the loss (0.7-1.2 s)
    assert any("set_liveness n-1 down" in line for line in lines)
    [failure] = twin.summary()["failures"]
    assert failure["kind"] == "kill" and failure["leader_lost"] and failure["replicas_lost"] >= 1
    assert 1.0 < failure["recovered_after_s"] < 5.0
    assert "n-1" not in where(twin, "f", "web") and len(where(twin, "f", "web")) == 3


def test_a_paused_node_is_replaced_and_its_stale_replica_stopped_when_it_resumes():
    twin = run(site_text("""
        [[event]]
        at = "30s"
        do = "pause"
        node = "n-2"
        for = "20s"
        """))
    summary = twin.summary()
    assert summary["sites"]["f"]["apps"]["web"]["running"] == 3
    assert "n-2" not in where(twin, "f", "web")
    assert any(e["text"] == "n-2 resumed" and e["t"] == 50.0 for e in twin.timeline)
    stopped = [e for e in twin.timeline if e["text"].startswith("n-2: workloads stop")]
    assert stopped and stopped[0]["t"] > 50.0  # it stops what moved away only once it runs again


def test_a_minority_cut_off_keeps_running_what_it_runs_and_the_majority_replaces_it():
    twin = run(site_text("""
        [[event]]
        at = "30s"
        do = "partition"
        nodes = ["n-3"]
        for = "30s"
        """))
    cut_off = twin.sites["f"].nodes["n-3"]
    assert twin.summary()["failures"][0]["kind"] == "partition"
    assert len(where(twin, "f", "web")) == 3 and cut_off.reachable


def test_drain_moves_replicas_off_the_node():
    twin = run(site_text("""
        [[event]]
        at = "30s"
        do = "drain"
        node = "n-1"
        """))
    assert "n-1" not in where(twin, "f", "web") and len(where(twin, "f", "web")) == 3


TWO_SITES = textwrap.dedent("""\
    [sim]
    name = "cut"
    duration = "2h"
    seed = 2

    [[site]]
    name = "hq"
    [[site.node]]
    name = "hq"
    count = 3

    [[site]]
    name = "farm"
    [[site.node]]
    name = "t"
    count = 4

    [[link]]
    between = ["hq", "farm"]
    delay = "200ms"
    bandwidth = "256kbit"

    [[app]]
    name = "telemetry"
    replicas = 2
    command = ["telemetry"]
    sites = ["farm"]

    [[event]]
    at = "10s"
    do = "deploy"
    app = "telemetry"
    via = "hq"

    [[event]]
    at = "10m"
    do = "cut"
    between = ["hq", "farm"]
    for = "1h"

    [[event]]
    at = "30m"
    do = "scale"
    app = "telemetry"
    replicas = 4
    via = "hq"
    """)


def test_an_edit_made_while_a_site_is_cut_off_reaches_it_when_the_link_returns():
    twin = run(TWO_SITES)
    took = [e for e in twin.timeline if e["site"] == "farm" and "take in telemetry" in e["text"]]
    assert [e["text"].split(": ", 1)[1] for e in took] == ["take in telemetry v1 from hq -> ok",
                                                           "take in telemetry v2 from hq -> ok"]
    assert 10.0 < took[0]["t"] < 11.0  # one way over the link: 200 ms plus the bytes at 256 kbit/s
    assert 4200.0 < took[1]["t"] < 4205.0  # after the heal at 70 min, not before
    summary = twin.summary()
    assert summary["sites"]["farm"]["apps"]["telemetry"]["running"] == 4
    [cut] = summary["cuts"]
    assert cut["healed_at"] == 4200.0 and cut["converged_after_s"] is not None and cut["converged_after_s"] < 5
    assert 0 < cut["bytes_to_converge"] < summary["bytes_between_sites"]["farm-hq"]
    assert twin.documents["hq"].state_vector() == twin.documents["farm"].state_vector()


def test_the_same_seed_gives_the_same_run_byte_for_byte():
    text = site_text("""
        [[event]]
        at = "30s"
        do = "kill"
        node = "n-1"
        """, seed=5)
    a, b = run(text), run(text)
    assert report.timeline_jsonl(a) == report.timeline_jsonl(b)
    assert report.summary_json(a) == report.summary_json(b)
    assert report.picture(a) == report.picture(b)
    runs = {report.timeline_jsonl(run(text, seed)) for seed in range(1, 9)}
    assert len(runs) > 1  # the seed matters: elections are drawn from it


def test_the_factory_example_runs_as_its_comment_says():
    path = EXAMPLES / "factory-leader-loss.toml"
    twin = Twin(parse(path.read_text(), lambda n: (path.parent / n).read_text()))
    twin.run()
    summary = twin.summary()
    assert summary["unplaced"] == []
    assert summary["sites"]["factory"]["apps"]["plc-gateway"]["nodes"] == ["gateway"]  # the serial adapter
    [kill] = summary["failures"]
    assert kill["leader_lost"] and kill["recovered_after_s"] is not None


def test_revoke_reboot_offline_and_a_failing_version_reverted():
    twin = run(textwrap.dedent("""\
        [sim]
        duration = "2m"
        [[site]]
        name = "f"
        [[site.node]]
        name = "n"
        count = 4
        [[app]]
        name = "web"
        replicas = 3
        command = ["web"]
        [[app]]
        id = "web-bad"
        name = "web"
        replicas = 3
        command = ["web", "--v2"]
        [app.health]
        kind = "exec"
        command = ["sim-health", "bad"]
        [app.update]
        healthy_deadline_s = 10
        [[event]]
        at = 5
        do = "deploy"
        app = "web"
        [[event]]
        at = 20
        do = "revoke"
        node = "n-3"
        reason = "stolen"
        [[event]]
        at = 40
        do = "reboot"
        node = "n-2"
        for = "10s"
        offline = true
        [[event]]
        at = 60
        do = "deploy"
        app = "web-bad"
        [[event]]
        at = 100
        do = "heal"
        """))
    text = [e["text"] for e in twin.timeline]
    assert any(t.startswith("n-3: expelled: this node was revoked from site f") and "stolen" in t for t in text)
    failures = {f["kind"]: f for f in twin.summary()["failures"]}
    assert failures["revoke"]["replicas_lost"] == 1 and 0 < failures["revoke"]["recovered_after_s"] < 2
    assert failures["reboot"]["replicas_lost"] == 1 and failures["reboot"]["recovered_after_s"] is not None
    # back from the reboot with its network down, it runs what its journal says, and stops the
    # replica the site replaced once the network returns
    restarted = text.index("n-2 restarted")
    assert text[restarted + 1] == "n-2: workloads start a02"
    assert any(e["text"] == "n-2: workloads stop a02" and e["t"] > 100 for e in twin.timeline)
    assert any("rollout web v2 fail" in t for t in text)  # the failing version is reverted ...
    record = twin.sites["f"].truth.apps["web"]
    assert record.spec.command == ("web",)  # ... to the first one
    assert twin.summary()["sites"]["f"]["apps"]["web"]["running"] == 3


def test_two_edits_made_apart_meet_as_one_winner_everywhere_and_the_conflict_is_told():
    twin = run(TWO_SITES + textwrap.dedent("""
        [[event]]
        at = "40m"
        do = "scale"
        app = "telemetry"
        replicas = 3
        via = "farm"
        """))
    [conflict] = twin.summary()["conflicts"]
    assert conflict["app"] == "telemetry" and conflict["seen_in"] == ["hq", "farm"]
    assert {conflict["winner_site"], *conflict["losers"]} == {"hq", "farm"}
    winners = {name: doc.app("telemetry").winner.edit_id for name, doc in twin.documents.items()}
    assert len(set(winners.values())) == 1  # every replica picks the same winner
    wanted = 4 if conflict["winner_site"] == "hq" else 3
    assert twin.summary()["sites"]["farm"]["apps"]["telemetry"]["running"] == wanted
