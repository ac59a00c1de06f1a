"""A new site founded inside an existing mesh, with real daemons on loopback.

`meshctl token create --site beta` on a member of site alpha makes a founder token; a node
started with it and `--peer` of that member (no mDNS: a new site is usually on another LAN)
becomes the first voter of site beta, in alpha's mesh. Later beta nodes join beta.
"""

from __future__ import annotations

import pytest

from meshd import exitcodes
from meshd.io.admin import AdminError
from meshd.io.localsite import wait_for

pytestmark = pytest.mark.system


def test_a_founder_token_founds_a_new_site_in_the_same_mesh(make_site):
    alpha = make_site("a", site="alpha", extra_args=("--no-mdns",))
    a1 = alpha.found()
    alpha_status = a1.call("status")
    with pytest.raises(AdminError, match="site must be"):
        a1.call("token_create", site="Not_A_Site", ttl=None)
    with pytest.raises(AdminError, match="site beta is not a site of this mesh .*--new-site"):
        a1.call("token_create", site="beta", ttl=None)
    founder_token = a1.call("token_create", site="beta", ttl=None, new_site=True)
    assert founder_token["site"] == "beta"

    beta = make_site("b", site="beta", extra_args=("--no-mdns", "--peer", alpha_status["address"]))
    b1 = beta.add_node()
    b1.start(join=founder_token["token"])

    def leads_beta():
        if not b1.alive:
            raise RuntimeError(f"{b1.name} exited:\n{b1.log_text()[-3000:]}")
        status = b1.try_call("status") or {}
        return status if status.get("site") == "beta" and status.get("role") == "leader" else None
    b1_status = wait_for(leads_beta, 30, what="the founder to lead site beta")
    assert b1_status["mesh_id"] == alpha_status["mesh_id"]
    beta.wait_ready(b1)

    # A second beta node joins beta with a token of beta; its first --peer is alpha's member,
    # which does not know that token: it asks the next one.
    b2 = beta.add_node(("--peer", b1_status["address"]))
    b2.start(join=beta.token(via=b1))
    beta.wait_ready(b2)
    b2_status = b2.call("status")
    assert (b2_status["site"], b2_status["mesh_id"]) == ("beta", alpha_status["mesh_id"])
    assert sorted(n["name"] for n in b1.call("nodes", site=None)) == ["b-1", "b-2"]
    # alpha sees beta's members with their health over beta's last minute (meshd.fleethealth),
    # from the summaries beta's leader publishes, not from raw samples
    def beta_health():
        rows = a1.call("nodes", site="beta")
        return rows if len(rows) == 2 and all(r["cpu_p50"] is not None for r in rows) else None
    seen = wait_for(beta_health, 40, interval=0.5, what="beta's members' health seen from alpha")
    for row in seen:
        assert 0 <= row["cpu_p50"] <= row["cpu_p95"] <= 100 and 0 < row["mem_p50"] <= row["mem_p95"] <= 100, row
        assert row["restarts"] == 0 and row["oom_kills"] == 0 and row["cpu_free"] is None

    # The founder token was single use.
    again = beta.add_node()
    again.start(join=founder_token["token"])
    assert again.proc.wait(timeout=30) == exitcodes.EXIT_REFUSED
    assert "already used" in again.log_text()

    # Alpha's members are as they were; its audit says who founded what.
    assert [n["name"] for n in a1.call("nodes", site=None)] == ["a-1"]
    audit = a1.call("audit")
    assert any(r["action"] == "found-site" and r["target"] == "beta" and r["site"] == "alpha" for r in audit), audit

    # The founder resumes its site from its data dir after a restart.
    b1.terminate()
    b1.start()
    status = wait_for(lambda: (b1.try_call("status") or {}).get("leader") and b1.try_call("status"), 30,
                      what="beta to have a leader again")
    assert (status["site"], status["mesh_id"]) == ("beta", alpha_status["mesh_id"])
