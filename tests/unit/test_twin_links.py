"""meshd.twin.links: the real sync sessions over simulated links (delay, bandwidth, loss, cuts)."""

from __future__ import annotations

import random

from crdt.document import MeshDocument
from crdt.schema import SiteSummary
from meshd.twin.links import MIN_RTO, Network
from meshd.twin.scenario import LinkSpec


def _net(**link) -> tuple[Network, dict[str, MeshDocument]]:
    docs = {"a": MeshDocument(client_id=1), "b": MeshDocument(client_id=2)}
    return Network((LinkSpec("a", "b", **link),), docs, random.Random(1)), docs


def _summary(site: str, ts: float) -> SiteSummary:
    return SiteSummary(site=site, nodes=3, ready=3, leader="n1", addresses=("198.18.0.1:7700",), ts=ts)


def _run_until_quiet(net: Network, start: float) -> float:
    now = start
    while (at := net.next_arrival()) is not None:
        now = at
        net.deliver(now)
    return now


def test_an_update_arrives_after_the_delay_and_its_bytes_over_the_bandwidth():
    net, docs = _net(delay=0.1, bandwidth=80_000.0)  # 10 kB/s
    net.open(0.0)
    _run_until_quiet(net, 0.0)
    update = docs["a"].put_many([_summary("a", 1.0)])
    net.push("a", update, 10.0)
    [transit] = net.in_flight
    assert transit.at == 10.0 + transit.message.size / 10_000 + 0.1
    net.deliver(transit.at - 1e-6)
    assert docs["b"].get(SiteSummary, "a") is None  # not before it arrives
    net.deliver(transit.at)
    assert docs["b"].get(SiteSummary, "a") is not None and net.changed == {"b"}


def test_loss_is_resent_so_it_shows_as_delay_and_order_is_kept():
    net, docs = _net(delay=0.01, loss=0.5)
    net.open(0.0)
    _run_until_quiet(net, 0.0)
    for i in range(20):
        net.push("a", docs["a"].put_many([_summary("a", float(i))]), 1.0)
    arrivals = [t.at for t in sorted(net.in_flight)]
    assert arrivals == sorted(arrivals) and max(arrivals) >= 1.0 + 0.01 + MIN_RTO  # some were resent
    _run_until_quiet(net, 1.0)
    assert docs["b"].get(SiteSummary, "a").ts == 19.0  # every update arrived


def test_a_cut_drops_what_is_on_the_way_and_a_heal_catches_up_by_state_vectors():
    net, docs = _net(delay=0.5)
    net.open(0.0)
    _run_until_quiet(net, 0.0)
    net.push("a", docs["a"].put_many([_summary("a", 1.0)]), 1.0)
    net.cut(("a", "b"))
    assert net.deliver(10.0) == 0 and docs["b"].get(SiteSummary, "a") is None
    docs["b"].put_many([_summary("b", 2.0)])  # written while cut: nobody to push it to
    net.heal(("a", "b"), 20.0)
    _run_until_quiet(net, 20.0)
    assert docs["a"].state_vector() == docs["b"].state_vector()
    assert docs["b"].get(SiteSummary, "a") is not None and docs["a"].get(SiteSummary, "b") is not None
    assert net.bytes_between()["a-b"] > 0
