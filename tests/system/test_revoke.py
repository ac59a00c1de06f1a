"""`meshctl revoke`: a member is expelled everywhere, for good (real daemons on loopback)."""

from __future__ import annotations

import json
import shutil

import pytest

from meshd import exitcodes
from meshd.io.admin import AdminError
from meshd.io.localsite import sleeper_app, wait_for

pytestmark = pytest.mark.system

APP = sleeper_app("svc", 3)


def test_revoke_expels_the_node_everywhere(three):
    leader = three.leader()
    leader.call("deploy", spec_toml=APP, wait=True, timeout=30)
    victim = next(n for n in three.nodes if n is not leader)
    survivor = next(n for n in three.nodes if n is not leader and n is not victim)

    with pytest.raises(AdminError, match="no member named"):
        leader.call("revoke", node="nobody", reason="")
    with pytest.raises(AdminError, match="cannot revoke itself"):
        leader.call("revoke", node=leader.name, reason="")

    result = leader.call("revoke", node=victim.name, reason="stolen from the cabinet")
    assert result["revoked"] is True and result["node"] == victim.name

    # the node stops itself (and its workloads) when the news reaches it
    assert victim.proc.wait(timeout=20) == exitcodes.EXIT_REVOKED
    assert "revoked" in victim.log_text()
    # every member sees it revoked; it no longer counts as a member
    for node in (leader, survivor):
        wait_for(lambda: three.node_state(victim.name, via=node) == "revoked", 10, what="revoked everywhere")
    assert leader.call("status")["members"] == 2
    # its workloads run elsewhere
    wait_for(lambda: len([a for a in three.running("svc") if a["node"] != victim.name]) == 3, 20,
             what="replacements")
    # it left the Raft configuration
    wait_for(lambda: any("removed from the Raft voters" in e["message"] for e in leader.call("events")), 10,
             what="removal from Raft")
    audit = leader.call("audit")
    assert any(a["action"] == "revoke" and a["target"] == victim.name and a["actor"] for a in audit)

    # restarted on its data dir: refuses to run
    victim.start()
    assert victim.proc.wait(timeout=20) == exitcodes.EXIT_REVOKED
    assert victim.log_text().count("revoked") >= 2

    # same device key, fresh data, a valid token: no member admits it again
    for path in victim.data_dir.iterdir():
        if path.name != "node.key":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    victim.start(join=three.token(via=survivor))
    assert victim.proc.wait(timeout=30) == exitcodes.EXIT_REFUSED
    assert "revoked" in victim.log_text().rsplit("starting", 1)[-1]
    # The refusal, whichever member gave it, is in the replicated audit: who, from where, why.
    def refused():
        return [a for a in leader.call("audit") if a["action"] == "join-refused" and victim.name in a["target"]]
    [record] = wait_for(refused, 15, what="the refused join in the leader's audit")
    assert "revoked" in record["reason"] and " from 127.0.0.1:" in record["reason"], record
    assert record["actor"] in {n.name for n in (leader, survivor)}
    assert leader.call("revoke", node=victim.name, reason="")["revoked"] is True  # idempotent


def _digest_of(root) -> str:
    from meshd.io.builddigest import measure_files
    return measure_files([root / "meshd", root / "attestation", root / "crdt"])


def _upgrade(copy, note: str) -> str:
    """A changed build in `copy` (one line more): its full reference digest."""
    state_py = copy / "meshd" / "state.py"
    state_py.write_text(state_py.read_text() + f"\n# {note}\n")
    return _digest_of(copy)


def test_an_upgraded_member_is_quarantined_until_its_build_is_allowed(make_site, tmp_path):
    """One member of three restarts into a changed build. Not allowed first: the site
    quarantines it (its workload moves, it is not revoked, the audit names the full digest)
    and takes it back on its own once the operator allows the digest. Allowed first: the
    upgrade passes without a quarantine."""
    from meshd import __version__
    from tests.system.test_bad_input import modified_copy_of_meshd
    site = make_site("up")
    site.start(2)
    copy = tmp_path / "sw"
    modified_copy_of_meshd(copy)
    state_py = copy / "meshd" / "state.py"
    state_py.write_text(state_py.read_text().replace("\n# a local modification\n", ""))  # the running build
    member = site.add_node()
    member.cwd = str(copy)
    member.start(join=site.token())
    site.wait_ready(member)
    leader = site.leader()
    leader.call("deploy", spec_toml=APP, wait=True, timeout=30)
    wait_for(lambda: any(a["node"] == member.name for a in site.running("svc")), 20, what="a replica on the member")

    def record():
        return next(n for n in leader.call("nodes") if n["name"] == member.name)

    # 1. Upgraded without allowing the build first.
    digest = _upgrade(copy, "release 2")
    assert member.terminate() == 0
    member.start()
    wait_for(lambda: record()["state"] == "quarantined", 30, what="quarantine")
    assert member.alive  # not revoked: it keeps running, and keeps its membership
    assert digest in record()["reason"] and f"--digest {digest}" in record()["reason"]
    own = member.call("status")  # the member itself says what it runs and why it is held apart
    assert own["software"] == digest
    wait_for(lambda: digest in member.call("status").get("quarantine", ""), 10, what="quarantine in own status")
    wait_for(lambda: len(site.running("svc")) == 3 and all(a["node"] != member.name for a in site.running("svc")),
             30, what="its replica moved")
    audit = [a for a in leader.call("audit") if a["action"] == "quarantine" and a["target"] == member.name]
    assert audit and digest in audit[0]["reason"] and audit[0]["actor"].startswith("attestation@"), audit
    events = [e["message"] for e in leader.call("events")]
    assert any(f"{member.name} quarantined" in m and digest in m for m in events), events[-6:]
    # Allowed: the next re-attestation releases it, and work may go to it again.
    leader.call("policy_allow", version=__version__, digest=digest)
    wait_for(lambda: record()["state"] == "ready", 30, what="release from quarantine")
    assert record()["attested_software"] == digest
    assert any(a["action"] == "release" and a["target"] == member.name for a in leader.call("audit"))

    # 2. Allowed before the upgrade: no quarantine at any point.
    attested_before = record()["attested_at"]
    digest = _upgrade(copy, "release 3")
    leader.call("policy_allow", version=__version__, digest=digest)
    assert member.terminate() == 0
    member.start()

    def upgraded():
        node = record()
        assert node["state"] in ("ready", "down", "joining"), node  # never quarantined, never revoked
        return node["attested_software"] == digest and node["attested_at"] > attested_before
    wait_for(upgraded, 30, what="re-attestation of the allowed upgrade")
    assert not [a for a in leader.call("audit") if a["action"] == "quarantine" and digest in a["reason"]]


def test_software_changed_under_a_running_member_quarantines_it(make_site, tmp_path):
    """The code of a running member is changed on disk (not restarted): its next periodic
    re-attestation measures the change and the site quarantines it; it is not revoked."""
    from tests.system.test_bad_input import modified_copy_of_meshd
    site = make_site("ra", extra_args=("--reattest-interval", "1"))
    site.start(2)
    copy = tmp_path / "sw"
    modified_copy_of_meshd(copy)
    state_py = copy / "meshd" / "state.py"
    original = state_py.read_text().replace("\n# a local modification\n", "")
    state_py.write_text(original)  # identical to the running software: admitted
    drifting = site.add_node()
    drifting.cwd = str(copy)
    drifting.start(join=site.token())
    site.wait_ready(drifting)
    first_cert = (drifting.data_dir / "member.pem").read_text()
    leader = site.leader()
    # healthy members keep passing: re-attested, not revoked
    wait_for(lambda: all(n["state"] == "ready" for n in leader.call("nodes")) and
             all(n["attested_at"] > n["joined_at"] for n in leader.call("nodes")), 15, what="re-attestations")

    # fresh evidence earned a fresh membership certificate (renewal)
    wait_for(lambda: (drifting.data_dir / "member.pem").read_text() != first_cert, 15, what="certificate renewal")
    state_py.write_text(original + "\n# changed after the join\n")
    wait_for(lambda: site.node_state(drifting.name, via=leader) == "quarantined", 30, what="quarantine")
    assert drifting.alive
    events = [e["message"] for e in leader.call("events")]
    assert any("failed re-attestation" in m and "not a reference value" in m for m in events), events[-6:]
    assert not any(a["action"] == "revoke" for a in leader.call("audit"))
    assert all(n["state"] == "ready" for n in leader.call("nodes") if n["name"] != drifting.name)


def test_a_revoked_members_open_connection_is_cut(three):
    """The revoked node still has a member call open (following logs on another member): the
    member cuts it when the revocation reaches it."""
    import json as jsonlib

    import trio

    from meshd.io import peer
    from meshd.io.tls import PeerTLS

    leader = three.leader()
    leader.call("deploy", spec_toml=APP.replace('["sleep", "3600"]', '["sh", "-c", "while true; do echo tick; sleep 0.2; done"]'),
                wait=True, timeout=30)
    victim = next(n for n in three.nodes if n is not leader)
    host = next(n for n in three.nodes if n is not victim)
    alloc = next(a for a in three.running("svc") if a["node"] == host.name)
    membership = jsonlib.loads((victim.data_dir / "membership.json").read_text())
    victim_id = victim.call("status")["node_id"]
    host_address = host.call("status")["address"]
    items: list[dict] = []
    outcome: list[str] = []

    async def follow_as_victim():
        async def collect(item):
            items.append(item)
        try:
            await peer.member_call(host_address, node_id=victim_id, site_secret=membership["site_secret"],
                                   call={"call": "logs", "alloc": alloc["alloc_id"], "follow": True, "tail": None},
                                   context=PeerTLS(victim.data_dir).client_context(), on_stream=collect, timeout=None)
            outcome.append("ended")
        except (peer.PeerError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            outcome.append(f"cut: {type(e).__name__}")

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow_as_victim)
            with trio.fail_after(10):
                while not items:
                    await trio.sleep(0.05)
            await trio.to_thread.run_sync(lambda: leader.call("revoke", node=victim.name, reason="test"))
            with trio.fail_after(10):
                while not outcome:
                    await trio.sleep(0.05)

    trio.run(main)
    assert outcome and items, (outcome, items[:2])
    # and it cannot open a new one
    with pytest.raises(peer.PeerError):
        trio.run(lambda: peer.member_call(host_address, node_id=victim_id, site_secret=membership["site_secret"],
                                          call={"call": "logs", "alloc": alloc["alloc_id"]},
                                          context=PeerTLS(victim.data_dir).client_context()))


def test_revoking_rotates_the_raft_secret_and_an_absent_member_catches_up(make_site):
    site = make_site("rs")
    site.start(4)
    leader = site.leader()
    others = [n for n in site.nodes if n is not leader]
    victim, away, present = others[0], others[1], others[2]

    def secret_of(node):
        return json.loads((node.data_dir / "membership.json").read_text())

    old = secret_of(victim)["site_secret"]
    away.pause()  # down during the rotation: misses it
    try:
        result = leader.call("revoke", node=victim.name, reason="stolen")
        assert result["secret_epoch"] == 1
        assert victim.proc.wait(timeout=20) == exitcodes.EXIT_REVOKED
        for node in (leader, present):
            wait_for(lambda: secret_of(node)["secret_epoch"] == 1, 10, what=f"{node.name} rotated")
            assert secret_of(node)["site_secret"] != old
        assert secret_of(away)["site_secret"] == old
        # the site keeps working on the new secret
        wait_for(lambda: site.leader() is not None, 15, what="a leader after the rotation")
        site.leader().call("deploy", spec_toml=APP, wait=True, timeout=30)
    finally:
        away.resume()
    # the absent member finds no leader with its old secret, fetches the new one, and is back
    wait_for(lambda: secret_of(away)["secret_epoch"] == 1, 30, what="the absent member to catch up")
    assert secret_of(away)["site_secret"] == secret_of(leader)["site_secret"]
    site.wait_ready(away, timeout=30)
