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
    assert leader.call("revoke", node=victim.name, reason="")["revoked"] is True  # idempotent


def test_software_changed_on_a_running_member_is_caught_by_re_attestation(make_site, tmp_path):
    """A member passes attestation at join; then its installed code is modified on disk. The
    leader's next re-attestation measures it, the evidence no longer verifies, and the site
    revokes the member by itself."""
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
    assert drifting.proc.wait(timeout=30) == exitcodes.EXIT_REVOKED
    assert "revoked" in drifting.log_text()
    assert site.node_state(drifting.name, via=leader) == "revoked"
    events = [e["message"] for e in leader.call("events")]
    assert any("failed re-attestation" in m and "not a reference value" in m for m in events), events[-6:]
    assert any(a["action"] == "revoke" and a["actor"].startswith("attestation@") for a in leader.call("audit"))
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
