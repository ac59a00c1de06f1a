"""meshd.node.trust: what follows a revocation, and that nothing follows a refused one."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd import sitestate
from meshd.commands import NOT_FOUND, STALE, UNTRUSTED, Ok, Refused, RevokeNode, RotateSecret
from meshd.node import trust
from meshd.node.effects import Commit, DistributeSecret, Emit, TellRevoked
from meshd.state import SiteState

from tests.unit.test_admission import NOW, ROOT, site_with_token
from tests.unit.test_sitestate import cmd, node


def site(members: int = 3) -> SiteState:
    state = site_with_token()
    for i in range(2, members + 1):
        assert sitestate.apply(state, cmd("create_token", ts=NOW, token_id=f"t{i}", site="s1", secret="ab" * 32,
                                          expires_at=NOW + 100)).ok
        assert sitestate.apply(state, cmd("admit_node", ts=NOW, token_id=f"t{i}", node=node(i))).ok
    return state


def test_the_revocation_names_the_node_in_the_next_signed_list():
    state = site()
    target = state.nodes[f"{2:032x}"]
    command = trust.revocation(state, target, "op@n1", "stolen" * 100, ROOT, NOW)
    assert isinstance(command, RevokeNode) and command.number == 1 and len(command.reason) == trust.MAX_REASON
    assert sitestate.apply(state, cmd("revoke_node", ts=NOW, **command.to_wire())).ok


def test_without_the_root_key_nothing_is_made():
    state = site()
    refused = trust.revocation(state, state.nodes[f"{2:032x}"], "op", "", None, NOW)
    assert isinstance(refused, Refused) and refused.code == UNTRUSTED and "voter" in refused.text
    forged = trust.revocation(state, state.nodes[f"{2:032x}"], "op", "", Ed25519PrivateKey.generate(), NOW)
    assert isinstance(forged, RevokeNode)  # signed by another key: the state machine refuses it
    assert sitestate.apply(state, cmd("revoke_node", ts=NOW, **forged.to_wire())).code == UNTRUSTED


def test_an_applied_revocation_tells_the_node_then_rotates_the_secret():
    state = site()
    target = state.nodes[f"{2:032x}"]
    command = trust.revocation(state, target, "op@n1", "", ROOT, NOW)
    result = sitestate.apply(state, cmd("revoke_node", ts=NOW, **command.to_wire()))
    tell, rotate = trust.after_revocation(target, command, result, "f" * 32, "n1")
    assert tell == TellRevoked(target, command.revocations)
    assert isinstance(rotate, Commit) and rotate.command == RotateSecret(actor="n1")
    epoch = sitestate.apply(state, cmd("rotate_secret", ts=NOW))
    [distribute] = rotate.then(epoch, state)
    # the new secret goes to current members only: not the revoked node, not this node
    assert distribute == DistributeSecret(1, (state.nodes[f"{3:032x}"],))


def test_a_refused_revocation_is_followed_by_nothing_but_its_reason():
    """Two revocations made from one view: the second list does not supersede the first."""
    state = site(4)
    a, b = state.nodes[f"{2:032x}"], state.nodes[f"{3:032x}"]
    first = trust.revocation(state, a, "op", "", ROOT, NOW)
    second = trust.revocation(state, b, "op", "", ROOT, NOW)
    assert sitestate.apply(state, cmd("revoke_node", ts=NOW, **first.to_wire())).ok
    refused = sitestate.apply(state, cmd("revoke_node", ts=NOW, **second.to_wire()))
    assert isinstance(refused, Refused) and refused.code == STALE
    [only] = trust.after_revocation(b, second, refused, "f" * 32, "n1")
    assert isinstance(only, Emit) and "refused" in only.message and only.data["code"] == STALE


def test_a_refused_rotation_distributes_nothing():
    [only] = trust.after_rotation(SiteState(), "f" * 32, Refused(NOT_FOUND, "no"))
    assert isinstance(only, Emit)
    assert isinstance(trust.after_rotation(SiteState(), "f" * 32, Ok({}))[0], Emit)  # no epoch: nothing sent


def test_revocations_adopted_from_elsewhere_tell_this_sites_members_and_rotate_once():
    state = site(4)
    named = [state.nodes[f"{2:032x}"], state.nodes[f"{3:032x}"]]
    effects = trust.after_adoption(state, Ok({"added": [n.node_id for n in named] + ["9" * 32]}), {"sig": "x"},
                                   "f" * 32, "n1")
    assert [type(e) for e in effects] == [TellRevoked, TellRevoked, Commit]
    assert trust.after_adoption(state, Ok({"added": []}), {}, "f" * 32, "n1") == []


def _ids(*numbers: int) -> set[str]:
    return {f"{i:032x}" for i in numbers}


def test_no_revocation_expels_the_node_making_it_the_last_voter_or_everyone():
    import dataclasses
    from meshd.commands import CONFLICT
    state = site(3)
    one, two, three = state.nodes["f" * 32], *(state.nodes[i] for i in sorted(_ids(2, 3)))
    # Itself: never, forced or not.
    refused = trust.revocation(state, two, "op", "", ROOT, NOW, own_id=two.node_id, force=True)
    assert isinstance(refused, Refused) and refused.code == CONFLICT and "this node itself" in refused.text
    # The last voter (the others are non-voters): refused, unless an operator forces it.
    for other in (one, three):
        state.nodes[other.node_id] = dataclasses.replace(other, voter=False)
    refused = trust.revocation(state, two, "op", "", ROOT, NOW, own_id=one.node_id)
    assert isinstance(refused, Refused) and "last voters" in refused.text and "--force" in refused.text
    assert isinstance(trust.revocation(state, two, "op", "", ROOT, NOW, own_id=one.node_id, force=True), RevokeNode)
    # Everyone: the set a policy change would expel.
    problem = trust.expulsion_problem(state, _ids(2, 3) | {one.node_id}, "")
    assert problem == (f"it would expel every member of site {state.site}", True)
    assert trust.expulsion_problem(state, _ids(3), one.node_id) is None  # a non-voter of three: fine


def test_no_revocation_leaves_the_site_without_a_majority_of_its_voters():
    """Five voters: expelling two leaves three of five (a quorum); three would leave two,
    which could never commit the removal of the others. Voters already down do not count
    among those left."""
    import dataclasses
    from meshd.state import LIVENESS_DOWN, LIVENESS_READY
    state = site(5)
    for node_id, record in list(state.nodes.items()):
        state.nodes[node_id] = dataclasses.replace(record, voter=True, liveness=LIVENESS_READY)
    assert trust.expulsion_problem(state, _ids(2, 3), "") is None
    problem = trust.expulsion_problem(state, _ids(2, 3, 4), "")
    assert problem == (f"it would leave 2 of the 5 voters of site {state.site} able to agree (3 needed): "
                       "the site would lose its quorum for good", True)
    # one voter down already: expelling two of the others leaves two able, of five
    down = sorted(_ids(5))[0]
    state.nodes[down] = dataclasses.replace(state.nodes[down], liveness=LIVENESS_DOWN)
    assert "lose its quorum" in trust.expulsion_problem(state, _ids(2, 3), "")[0]
    # the down voter itself may go: the four left are a majority
    assert trust.expulsion_problem(state, {down}, "") is None
    refused = trust.revocation(state, state.nodes[sorted(_ids(2))[0]], "op", "", ROOT, NOW, own_id="f" * 32)
    assert isinstance(refused, RevokeNode)  # one of five, with one down: three of five are left


def test_one_of_two_voters_may_go_but_not_one_of_three_with_another_down():
    """Removing a voter commits on a majority of the configuration without it: the one left
    of two commits alone; of three with one down, the one left of the other two cannot."""
    import dataclasses
    from meshd.state import LIVENESS_DOWN, LIVENESS_READY
    state = site(2)
    for node_id, record in list(state.nodes.items()):
        state.nodes[node_id] = dataclasses.replace(record, voter=True, liveness=LIVENESS_READY)
    assert trust.expulsion_problem(state, _ids(2), "f" * 32) is None
    state = site(3)
    for node_id, record in list(state.nodes.items()):
        state.nodes[node_id] = dataclasses.replace(record, voter=True, liveness=LIVENESS_READY)
    down = sorted(_ids(3))[0]
    state.nodes[down] = dataclasses.replace(state.nodes[down], liveness=LIVENESS_DOWN)
    assert "1 of the 3 voters" in trust.expulsion_problem(state, _ids(2), "f" * 32)[0]
    assert trust.expulsion_problem(state, {down}, "f" * 32) is None  # the down one itself: fine

