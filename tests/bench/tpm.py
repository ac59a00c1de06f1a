"""TPM attestation benchmark: joins and verifications with TPM 2.0 evidence (swtpm).

    python3 -m tests.bench.tpm [--runs 5] [--json bench-results/tpm.json]

Each run builds a fresh site whose founder and TPM joiners each have their own swtpm, and
measures, with the software path as the baseline in the same run:
- join_tpm_s: `meshd run --join --tpm` process start -> `ready` in the leader's `nodes`
  (TPM keys, credential activation, a quote; target 1 s, as for software joins);
- join_software_s: the same join without a TPM;
- verify_tpm_ms: the verifier on one piece of TPM evidence (quote signature, event log
  replay, nonce binding; target 5 ms), beside verify_software_ms;
- quote_ms: one quote from swtpm, the attester's side. swtpm answers faster than a
  discrete TPM chip (those take tens to hundreds of ms per quote): context, not a target.
"""

from __future__ import annotations

import os
import time

from attestation.evidence import TpmClaims
from attestation.tpm import quote_data
from attestation.verifier import TpmBinding, verify
from meshd.io.localsite import LocalSite
from meshd.io.tpm import TpmDevice
from tests.bench.attestation import per_call_ms
from tests.bench.one_site import measure_join
from tests.bench.report import run_site_benchmark
from tests.swtpm import SoftwareTpm
from tests.unit.attestation_world import GOOD_DIGEST, NOW, Node, challenge, policy

TARGETS = {"join_tpm_s": (1.0, "s"), "join_software_s": (None, "s"), "verify_tpm_ms": (5.0, "ms"),
           "verify_software_ms": (None, "ms"), "quote_ms": (None, "ms")}
QUOTES_PER_RUN = 20  # each goes through the swtpm socket: fewer than the pure calls


def measure_verify(root, samples: dict[str, list[float]]) -> None:
    sim = SoftwareTpm(root / "tpm-verify").start()
    (root / "verify").mkdir()
    device = TpmDevice(sim.tcti, root / "verify")
    try:
        device.open()
        events = tuple(device.measure(GOOD_DIGEST))
        node, nonce = Node(), os.urandom(16).hex()
        t0 = time.perf_counter()
        for _ in range(QUOTES_PER_RUN):
            attest, signature = device.quote(quote_data(nonce, node.node_id))
        samples["quote_ms"].append((time.perf_counter() - t0) * 1000 / QUOTES_PER_RUN)
        evidence = node.evidence(nonce, tpm=TpmClaims(attest.hex(), signature.hex(), events))
        software = node.evidence(nonce)
        binding, chal, pol = TpmBinding(device.ak_public), challenge(node, nonce), policy()
        assert verify(evidence, chal, node.public, pol, "s1", NOW, None, binding).tpm_backed
        samples["verify_tpm_ms"].append(per_call_ms(lambda: verify(evidence, chal, node.public, pol, "s1", NOW,
                                                                   None, binding)))
        samples["verify_software_ms"].append(per_call_ms(lambda: verify(software, chal, node.public, pol, "s1",
                                                                        NOW)))
    finally:
        device.close()
        sim.stop()


def one_run(site: LocalSite, samples: dict[str, list[float]]) -> None:
    sims = [SoftwareTpm(site.root / f"tpm{i}") for i in range(3)]
    try:
        founder = site.add_node(("--tpm", sims[0].start().tcti))
        founder.start()
        site.wait_ready(founder, 30)
        for sim in sims[1:]:
            samples["join_tpm_s"].append(measure_join(site, ("--tpm", sim.start().tcti)))
        samples["join_software_s"].append(measure_join(site))
        measure_verify(site.root, samples)
    finally:
        site.close()
        for sim in sims:
            sim.stop()


def main(argv: list[str] | None = None) -> int:
    return run_site_benchmark("tpm", __doc__, one_run, TARGETS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
