"""meshd.fleethealth: a member's health as a few numbers per interval, from the resources the
site's state has of it; bounded, and never a made-up figure."""

from __future__ import annotations

import dataclasses

from meshd import fleethealth
from meshd.fleethealth import SAMPLE_PERIOD, WINDOW, HealthWindow, percentile
from meshd.state import NodeResources

from tests.unit.test_sitestate import founded


def with_resources(state, node_id, **resources):
    node = state.nodes[node_id]
    state.nodes[node_id] = dataclasses.replace(node, resources=NodeResources(**resources))


def test_percentiles_by_nearest_rank():
    assert percentile([5.0], 50) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile(list(range(1, 101)), 95) == 95


def test_a_minute_of_samples_gives_the_50th_and_95th_percentiles():
    state = founded()
    [node_id] = state.nodes
    window = HealthWindow()
    busy = [10, 10, 10, 10, 10, 90, 10]  # one spike in seven samples
    for i, percent in enumerate(busy):
        with_resources(state, node_id, cpu_total=4.0, cpu_free=4.0 * (1 - percent / 100), mem_total_mb=1000,
                       mem_free_mb=500, oom_kills=2)
        window.observe(state, now=i * SAMPLE_PERIOD)
        window.observe(state, now=i * SAMPLE_PERIOD + 1)  # within the period: not sampled again
    figures = window.health(state, node_id, now=len(busy) * SAMPLE_PERIOD - SAMPLE_PERIOD)
    assert (figures.cpu_p50, figures.cpu_p95, figures.mem_p50, figures.mem_p95) == (10, 90, 50, 50)
    assert figures.oom_kills == 2 and figures.restarts == 0


def test_no_sample_in_the_window_is_no_figure_and_gone_nodes_are_forgotten():
    state = founded()
    [node_id] = state.nodes
    window = HealthWindow()
    assert window.health(state, node_id, now=0.0) == fleethealth.Health()  # never reported: nothing
    with_resources(state, node_id, cpu_total=2.0, cpu_free=1.0, mem_total_mb=100, mem_free_mb=50)
    window.observe(state, now=0.0)
    assert window.health(state, node_id, now=WINDOW + 1).cpu_p50 is None  # too old
    del state.nodes[node_id]
    window.observe(state, now=SAMPLE_PERIOD)
    assert not window._samples


def test_health_figures_are_published_once_a_minute_and_what_the_node_is_at_once():
    from crdt.schema import NodeSummary
    from meshd import meshstate

    base = NodeSummary(node_id="a" * 32, name="n1", site="s", state="ready", address="198.18.0.1:7700",
                       arch="x86_64", role="leader", allocs=1, labels=(), evidence="software", ts=1.0,
                       cpu_p50=10, cpu_p95=20, mem_p50=30, mem_p95=40)
    hotter = dataclasses.replace(base, cpu_p95=90, ts=2.0)
    assert meshstate.node_summary_due(None, base, 0.0)
    assert not meshstate.node_summary_due(base, hotter, fleethealth.PUBLISH_PERIOD - 1)
    assert meshstate.node_summary_due(base, hotter, fleethealth.PUBLISH_PERIOD)
    assert meshstate.node_summary_due(base, dataclasses.replace(hotter, state="down"), 0.0)  # at once
    assert not meshstate.node_summary_due(base, dataclasses.replace(base, ts=9.0), fleethealth.PUBLISH_PERIOD)
    blank = dataclasses.replace(base, cpu_p50=None, cpu_p95=None, mem_p50=None, mem_p95=None)
    assert meshstate.node_summary_due(blank, base, 0.0)  # its first figures go at once
    assert len(str(hotter.to_plain())) < 400  # a few hundred bytes a node a minute
