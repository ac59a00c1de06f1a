"""meshd.node.joining and meshd.node.admitting: how a starting node becomes a member, whom a joiner
asks, what each answer means."""

from __future__ import annotations

import pytest

from meshd.admission import Verdict
from meshd.commands import NOT_FOUND, TOKEN, Ok, Refused
from meshd import sitestate
from meshd.node import admitting
from meshd.node.admitting import DENIED, RETRY_ELSEWHERE, RETRY_LATER, JoinRefusal
from meshd.node.joining import (FOUND, JOIN, RESUME, RETRY_CANDIDATE_AFTER, Joining, StartPath, Unreachable,
                                start_conflict, start_path)
from meshd.state import SiteState

from tests.unit.test_admission import site_with_token


def test_only_a_denial_ends_a_join_early():
    joining = Joining(site="lab", started=0.0, timeout=10.0)
    assert joining.failed("a:1", Unreachable("connection refused"), 1.0) == (True, None)
    assert joining.failed("a:1", Unreachable("connection refused"), 2.0) == (False, None)  # said once
    assert joining.failed("b:1", JoinRefusal(RETRY_ELSEWHERE, "no state yet"), 2.0) == (True, None)
    assert joining.failed("b:1", JoinRefusal(RETRY_LATER, "election"), 3.0) == (True, None)
    new, give_up = joining.failed("c:1", JoinRefusal(DENIED, "join token was already used"), 3.0)
    assert new and give_up is not None and "already used" in give_up.reason


def test_the_timeout_says_what_it_waited_for():
    joining = Joining(site="lab", started=0.0, timeout=5.0)
    assert joining.expired(4.9) is None
    assert "none found yet" in joining.expired(5.0).reason
    joining.failed("a:1", Unreachable("connection refused"), 1.0)
    assert "a:1: connection refused" in joining.expired(6.0).reason
    status = joining.status(6.0)
    assert status["attempts"][0] == {"address": "a:1", "outcome": "unreachable", "reason": "connection refused",
                                     "s_ago": 5.0}


def test_a_named_leader_is_asked_first_and_failed_candidates_wait_a_moment():
    joining = Joining(site="lab", started=0.0)
    assert joining.candidates(["m1", "m2"], ["p1"], 0.0) == ["p1", "m1", "m2"]
    joining.failed("m1", JoinRefusal(RETRY_ELSEWHERE, "no root key", leader="L"), 0.0)
    assert joining.candidates(["m1", "m2"], [], 0.1) == ["L", "m2"]
    assert joining.candidates(["m1", "m2"], [], RETRY_CANDIDATE_AFTER) == ["L", "m2", "m1"]


def test_a_member_without_the_sites_state_never_denies():
    assert admitting.cannot_decide(SiteState(), member=False, leader=None).code == RETRY_ELSEWHERE
    busy = admitting.cannot_decide(SiteState(), member=True, leader="198.18.0.1:7700")
    assert busy.code == RETRY_ELSEWHERE and busy.leader == "198.18.0.1:7700"
    assert admitting.cannot_decide(site_with_token(), member=True, leader=None) is None


def test_a_hello_for_another_site_is_sent_elsewhere_before_any_challenge_naming_nothing_of_this_one():
    state = site_with_token()  # site s1, with a token for s1
    other = admitting.cannot_decide(state, member=True, leader=None, site="shop")
    assert other.code == RETRY_ELSEWHERE and "site 'shop'" in other.reason and "s1" not in other.reason
    assert admitting.cannot_decide(state, member=True, leader=None, site="s1") is None
    assert sitestate.apply(state, {"op": "create_token", "ts": 1.0, "token_id": "nb", "site": "newsite",
                                   "secret": "00" * 32, "expires_at": 10**10}).ok
    assert admitting.cannot_decide(state, member=True, leader=None, site="newsite") is None  # founds it here
    assert admitting.cannot_decide(state, member=True, leader=None, site={"x": 1}) is None  # the token decides
    unknown = admitting.verdict_refusal(state, Verdict(False, ("unknown join token",)), "other")
    assert "s1" not in unknown.reason


def test_an_unknown_token_is_no_verdict_a_known_one_is():
    state = site_with_token()
    refused = Verdict(False, ("join token was already used",))
    assert admitting.verdict_refusal(state, refused, "tok").code == DENIED
    assert admitting.verdict_refusal(state, Verdict(False, ("unknown join token",)), "other").code == RETRY_ELSEWHERE
    assert admitting.commit_refusal(Refused(TOKEN, "join token expired")).code == DENIED
    assert admitting.commit_refusal(Refused(NOT_FOUND, "not founded")).code == RETRY_ELSEWHERE


def test_refusals_travel_with_their_code_and_a_codeless_one_is_asked_elsewhere():
    refusal = JoinRefusal(DENIED, "no", leader="198.18.0.1:7700")
    assert JoinRefusal.from_wire(refusal.to_wire()) == refusal
    assert JoinRefusal.from_wire({"type": "refused", "reason": "old meshd"}).code == RETRY_ELSEWHERE
    assert JoinRefusal.from_wire({"type": "refused", "code": "bogus", "leader": "x" * 999}).leader is None


def test_only_voters_get_the_root_key():
    state = site_with_token()
    common = dict(mesh_id="m", site="s1", site_secret="s" * 64, root_key="k" * 64, member_cert="PEM")
    voter = admitting.welcome(state, Ok({"voter": True}), "", "9" * 32, **common)
    nonvoter = admitting.welcome(state, Ok({"voter": False}), "", "9" * 32, **common)
    assert voter["root_key"] == "k" * 64 and "root_key" not in nonvoter
    assert voter["partners"] == ["198.18.0.1:7701"] and nonvoter["site_secret"] == "s" * 64
    founder = admitting.welcome(state, Ok({}), "s2", "9" * 32, **common)
    assert founder["founder"] is True and founder["site"] == "s2" and "site_secret" not in founder


def test_a_refused_join_gives_up_for_good_and_a_timeout_may_be_retried():
    joining = Joining(site="lab", started=0.0, timeout=5.0)
    assert joining.failed("c:1", JoinRefusal(DENIED, "bad token"), 1.0)[1].refused
    assert not joining.expired(6.0).refused


def test_a_data_dir_membership_is_never_kept_against_a_config_that_names_another_site():
    assert start_conflict(stored_site="lab", config_site="default", site_given=False, token_site=None) is None
    assert start_conflict(stored_site="lab", config_site="lab", site_given=True, token_site="lab") is None
    reason = start_conflict(stored_site="lab", config_site="shop", site_given=True, token_site=None)
    assert reason and "belongs to site lab" in reason and "site shop" in reason
    reason = start_conflict(stored_site="lab", config_site="default", site_given=False, token_site="shop")
    assert reason and "join token is for site shop" in reason
    # no membership yet: a token for another site than the one configured
    assert start_conflict(stored_site=None, config_site="lab", site_given=True, token_site="lab") is None
    assert start_conflict(stored_site=None, config_site="default", site_given=False, token_site="shop") is None
    reason = start_conflict(stored_site=None, config_site="lab", site_given=True, token_site="shop")
    assert reason == "the join token is for site shop, but the config says site lab"


START_CASES = [
    # (id, member, bootstrap, token, way)
    ("a member resumes whatever bootstrap says", True, "join", False, RESUME),
    ("a member resumes with found", True, "found", False, RESUME),
    ("a member resumes with its old token", True, "join", True, RESUME),
    ("a member resumes with auto", True, "auto", False, RESUME),
    ("auto founds without a token", False, "auto", False, FOUND),
    ("auto joins with a token", False, "auto", True, JOIN),
    ("found founds", False, "found", False, FOUND),
    ("join joins with a token", False, "join", True, JOIN),
    ("join without a token refuses", False, "join", False, None),
]


@pytest.mark.parametrize("member,bootstrap,token,way", [c[1:] for c in START_CASES], ids=[c[0] for c in START_CASES])
def test_start_path(member, bootstrap, token, way):
    path = start_path(member=member, bootstrap=bootstrap, token=token, data_dir="/var/lib/meshd",
                      config_file="/etc/meshd/meshd.toml")
    assert path.way == way
    assert (path.refusal is None) == (way is not None)


def test_a_join_without_a_token_names_what_to_set_where():
    in_file = start_path(member=False, bootstrap="join", token=False, data_dir="/var/lib/meshd",
                         config_file="/etc/meshd/meshd.toml")
    assert in_file == StartPath(None, (
        "bootstrap is join, but no join token is given and the data dir /var/lib/meshd holds no membership: "
        'set join = "TOKEN" (from `meshctl token create` on a member) in /etc/meshd/meshd.toml to join a mesh, '
        'or bootstrap = "found" there on the first device of a new mesh'))
    on_the_command_line = start_path(member=False, bootstrap="join", token=False, data_dir="/d", config_file=None)
    assert on_the_command_line.refusal is not None
    assert on_the_command_line.refusal.endswith(": give --join TOKEN (from `meshctl token create` on a member) "
                                                "to join a mesh, or --bootstrap found on the first device of a new mesh")
    assert "\n" not in in_file.refusal
