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
        "no member of the mesh holds it"
    assert sitestate.apply(state, cmd("heartbeat", node_id=OTHER, seq=2, artifacts=[digest])).ok
    [fetch] = plan.decide(state, ME, frozenset(), frozenset({digest})).fetch
    assert fetch.manifest.digest == digest and [x.node_id for x in fetch.sources] == [OTHER]
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


def test_one_member_pulls_from_another_site_and_the_rest_fetch_from_it():
    import json

    from crdt.schema import ArtifactHolding
    from meshd.artifacts import sites
    state = site()
    doc = manifest()
    digest = doc["body"]["digest"]
    spec = {"app": {"name": "det", "replicas": 2, "command": ["run"],
                    "artifact": [{"name": "model", "digest": digest}]}}
    assert sitestate.apply(state, cmd("submit_app", spec=spec, actor="op")).ok
    # the site has the spec but not the manifest: taken in from the site that published it
    far = ArtifactHolding(digest=digest, site="far", manifest=json.dumps(doc), holders=(f"{9:032x}@10.9.0.9:7700",),
                          ts=1.0)
    assert sites.manifests_to_take_in(state, [far]) == [doc]
    assert add(state, doc).ok
    assert sites.manifests_to_take_in(state, [far]) == []
    placed = sitestate.apply(state, cmd("apply_plan", plan={"app": "det", "version": 1, "stops": [], "placements": [
        {"alloc_id": "a0", "replica": 0, "node_id": ME}, {"alloc_id": "a1", "replica": 1, "node_id": OTHER}]}))
    assert placed["placed"] == ["a0", "a1"], placed
    pulling = sites.puller(state, digest)
    assert pulling in (ME, OTHER) and sites.needing(state, digest) == sorted([ME, OTHER])
    for node_id in (ME, OTHER):
        decision = plan.decide(state, node_id, frozenset(), frozenset({digest}), [far])
        if node_id == pulling:
            [fetch] = decision.fetch
            assert fetch.sources[0].site == "far" and fetch.sources[0].address == "10.9.0.9:7700"
        else:  # from the puller: the pieces it verified so far, while it pulls the rest
            [fetch] = decision.fetch
            assert [(x.node_id, x.site) for x in fetch.sources] == [(pulling, "")]
    published = sites.holdings_to_publish(state, lambda key: None, 5.0)
    assert [(r.digest, r.site, r.holders) for r in published] == [(digest, "s1", ())]
    assert sites.holdings_to_publish(state, lambda key: published[0], 6.0) == []
