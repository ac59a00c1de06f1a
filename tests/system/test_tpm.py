"""TPM-backed membership with real daemons, each on its own software TPM (swtpm).

A joiner with a TPM names its endorsement and attestation keys, activates the leader's
credential in its TPM and quotes PCR 23; re-attestation quotes again. Refused: a quote over
PCR values its event log does not explain, software evidence from a TPM-backed member (a
downgrade), software members once the site requires TPM.
"""

from __future__ import annotations

import hashlib

import pytest

from attestation.evidence import SOFTWARE_EVIDENCE, TPM_EVIDENCE
from attestation.tpm import MEASUREMENT_PCR
from meshd import exitcodes
from meshd.io.localsite import wait_for
from tests.swtpm import SoftwareTpm, require_swtpm

pytestmark = pytest.mark.system

REATTEST = ("--reattest-interval", "1")  # re-attest every second, so the tests see it happen


@pytest.fixture
def tpms(site_root):
    require_swtpm()
    made: list[SoftwareTpm] = []

    def make() -> SoftwareTpm:
        sim = SoftwareTpm(site_root / f"tpm-{len(made) + 1}").start()
        made.append(sim)
        return sim

    yield make
    for sim in made:
        sim.stop()


def found_with_tpm(site, tpms):
    founder = site.add_node(("--tpm", tpms().tcti))
    founder.start()
    site.wait_ready(founder, 30)
    return founder


def evidence_of(site, name: str) -> dict:
    return next(row for row in site.leader().call("nodes") if row["name"] == name)


def test_tpm_backed_join_and_reattestation(make_site, tpms):
    site = make_site(extra_args=REATTEST)
    found_with_tpm(site, tpms)
    member = site.join(extra_args=("--tpm", tpms().tcti))
    plain = site.join()
    assert member.call("status")["evidence"] == TPM_EVIDENCE
    assert evidence_of(site, member.name)["evidence"] == TPM_EVIDENCE
    assert evidence_of(site, plain.name)["evidence"] == SOFTWARE_EVIDENCE
    assert "tpm_ak" not in evidence_of(site, member.name)
    # Quotes keep verifying at every re-attestation: the member stays, freshly attested.
    first = evidence_of(site, member.name)["attested_s_ago"]
    wait_for(lambda: evidence_of(site, member.name)["attested_s_ago"] < first or
             evidence_of(site, member.name)["attested_s_ago"] < 1.5, 15, what="a re-attestation")
    assert site.node_state(member.name) == "ready"
    # Its event log: the package digest, extended once at start.
    log = (member.data_dir / "tpm-events.json").read_text()
    assert member.call("policy")["this_node"]["digest"] in log


def test_a_quote_over_pcr_values_the_log_does_not_explain_is_refused(make_site, tpms):
    site = make_site()
    site.found()
    sim = tpms()
    sim.pcr_extend(MEASUREMENT_PCR, hashlib.sha256(b"something else").hexdigest())  # behind meshd's back
    joiner = site.add_node(("--tpm", sim.tcti))
    joiner.start(join=site.token())
    assert joiner.proc.wait(timeout=30) == exitcodes.EXIT_REFUSED
    assert "does not explain" in joiner.log_text()
    leader = site.leader()
    assert joiner.name not in [row["name"] for row in leader.call("nodes")]
    assert any("does not explain" in e["message"] for e in leader.call("events"))


def test_a_tpm_member_restarted_without_its_tpm_is_expelled(make_site, tpms):
    site = make_site(extra_args=REATTEST)
    site.found()
    site.join()  # a second voter keeps the site writable while the member is away
    sim = tpms()
    member = site.join(extra_args=("--tpm", sim.tcti))
    member.terminate()
    member.extra_args = tuple(a for a in member.extra_args if a not in ("--tpm", sim.tcti))
    member.start()  # same key, same membership, software evidence now: a downgrade
    wait_for(lambda: site.node_state(member.name) == "revoked", 30, what="the downgraded member revoked")
    assert any("carries no quote" in e["message"] for e in site.leader().call("events"))


def test_requiring_tpm_expels_software_members_and_refuses_new_ones(make_site, tpms):
    site = make_site(extra_args=REATTEST)
    founder = found_with_tpm(site, tpms)
    tpm_member = site.join(extra_args=("--tpm", tpms().tcti))
    soft = site.join()
    result = founder.call("policy_require_tpm", site="lab", required=True)
    assert result["tpm_required"] is True
    assert founder.call("policy")["tpm_required_sites"] == ["lab"]
    wait_for(lambda: site.node_state(soft.name) == "revoked", 30, what="the software member revoked")
    newcomer = site.add_node()
    newcomer.start(join=site.token(via=founder))  # not the revoked member, which may still be stopping
    assert newcomer.proc.wait(timeout=30) == exitcodes.EXIT_REFUSED
    assert "requires TPM-backed evidence" in newcomer.log_text()
    assert site.node_state(tpm_member.name) == "ready" and site.node_state(founder.name) == "ready"
