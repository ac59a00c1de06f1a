"""meshd.artifacts.plan: fetch what is wanted from site holders, drop what the site forgot,
report holdings when the site shows others."""

from meshd.artifacts import plan
from tests.unit.test_artifact_catalog import add, manifest, site
from tests.unit.test_sitestate import cmd
from meshd import sitestate

ME, OTHER = f"{1:032x}", f"{2:032x}"


def test_a_wanted_artifact_is_fetched_from_holders_other_than_this_node():
    state = site()
    doc = manifest()
    digest = doc["body"]["digest"]
    decision = plan.decide(state, ME, frozenset(), frozenset({digest}))
    assert decision.fetch == () and "not known to this site" in dict(decision.waiting)[digest]
    assert add(state, doc).ok
    assert dict(plan.decide(state, ME, frozenset(), frozenset({digest})).waiting)[digest] == \
        "no member of the site holds it"
    assert sitestate.apply(state, cmd("heartbeat", node_id=OTHER, seq=2, artifacts=[digest])).ok
    [fetch] = plan.decide(state, ME, frozenset(), frozenset({digest})).fetch
    assert fetch.manifest.digest == digest and fetch.holders == (OTHER,)
    assert plan.decide(state, ME, frozenset({digest}), frozenset({digest})).fetch == ()


def test_holdings_are_reported_when_they_differ_and_forgotten_ones_dropped_unless_wanted():
    state = site()
    doc = manifest()
    digest = doc["body"]["digest"]
    assert add(state, doc).ok
    assert plan.decide(state, ME, frozenset({digest}), frozenset()).report == (digest,)
    assert sitestate.apply(state, cmd("heartbeat", node_id=ME, seq=2, artifacts=[digest])).ok
    assert plan.decide(state, ME, frozenset({digest}), frozenset()).report is None
    assert sitestate.apply(state, cmd("remove_artifact", digest=digest)).ok
    assert plan.decide(state, ME, frozenset({digest}), frozenset({digest})).drop == ()  # a workload has it
    decision = plan.decide(state, ME, frozenset({digest}), frozenset())
    assert decision.drop == (digest,) and decision.report == ()
