"""meshd.whatif: the real state machine and placement answer as if a node went down or was
drained, on a copy; the live state is left alone."""

import itertools

import pytest

from meshd import sitestate, whatif
from tests.unit.test_sitestate import cmd, founded

APP = {"app": {"name": "web", "replicas": 2, "command": ["sleep", "100"]}}


def running_site():
    state = founded(3)
    assert sitestate.apply(state, cmd("submit_app", spec=APP)).ok
    n1, n2, _ = sorted(state.nodes)
    placed = sitestate.apply(state, cmd("apply_plan", plan={"app": "web", "version": 1, "stops": [], "placements": [
        {"alloc_id": "a0", "replica": 0, "node_id": n1}, {"alloc_id": "a1", "replica": 1, "node_id": n2}]}))
    assert placed["placed"] == ["a0", "a1"]
    return state


def ids():
    counter = itertools.count()
    return lambda: f"new{next(counter)}"


def test_a_node_down_moves_its_replica_to_the_node_that_has_none_and_changes_nothing_live():
    state = running_site()
    before = {a: (x.state, x.node_id) for a, x in state.allocs.items()}
    imagined, notes = whatif.imagine(state, whatif.parse(["down:n2"]), 1e9)
    assert whatif.moves(imagined, ids()) == [{"app": "web", "replica": 1, "to": "n3", "reason": ""}]
    assert {a: (x.state, x.node_id) for a, x in state.allocs.items()} == before and notes == []
    assert state.nodes[sorted(state.nodes)[1]].liveness == "ready"


def test_drain_and_several_downs_and_what_cannot_be_placed():
    state = running_site()
    imagined, _ = whatif.imagine(state, whatif.parse(["drain:n1"]), 1e9)
    assert whatif.moves(imagined, ids()) == [{"app": "web", "replica": 0, "to": "n3", "reason": ""}]
    imagined, _ = whatif.imagine(state, whatif.parse(["down:n1", "down:n2", "down:n3"]), 1e9)
    moved = whatif.moves(imagined, ids())
    assert [m["replica"] for m in moved] == [0, 1] and all(m["to"] is None and m["reason"] for m in moved)


def test_cuts_are_notes_and_bad_what_ifs_are_refused():
    state = running_site()
    _, notes = whatif.imagine(state, whatif.parse(["cut:far"]), 1e9)
    assert notes == ["site far cut off: it runs on alone; changes for it wait until the link returns"]
    for bad, reason in ((["up:n1"], "use down:NODE"), (["down:"], "use down:NODE")):
        with pytest.raises(whatif.WhatIfError, match=reason):
            whatif.parse(bad)
    with pytest.raises(whatif.WhatIfError, match="no member of site s1 named so"):
        whatif.imagine(state, whatif.parse(["down:ghost"]), 1e9)
