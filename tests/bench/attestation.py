"""Attestation benchmark: the cost of the pure checks a verifier runs per node.

    python3 -m tests.bench.attestation [--runs 5] [--json bench-results/attestation.json]

Measures, per call (median over --runs rounds of ROUND_CALLS calls each):
- verify: one software evidence against challenge, policy and a revocation list (target
  <= 5 ms), with its baseline in the same run: one bare Ed25519 signature check, the
  floor of any verification;
- member certificate check: signature, validity, SAN, revocation.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from attestation.certs import check_member_cert, issue_member_cert, make_root
from attestation.revocation import RevocationList
from attestation.verifier import verify
from tests.bench.report import report
from tests.unit.attestation_world import NOW, Node, challenge, policy

ROUND_CALLS = 500  # enough calls that the timer's resolution does not matter
TARGETS = {"verify_ms": (5.0, "ms"), "ed25519_verify_ms": (None, "ms"), "member_cert_check_ms": (None, "ms")}


def per_call_ms(fn) -> float:
    t0 = time.perf_counter()
    for _ in range(ROUND_CALLS):
        fn()
    return (time.perf_counter() - t0) * 1000 / ROUND_CALLS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", default="bench-results/attestation.json")
    args = parser.parse_args(argv)

    node = Node()
    nonce = "ab" * 16
    evidence = node.evidence(nonce)
    chal = challenge(node, nonce)
    pol = policy()
    revoked = RevocationList("mesh1", 0)
    for i in range(100):  # a mesh that has expelled a hundred devices
        revoked = revoked.with_revoked(f"{i:032x}", NOW, "op", "retired")
    message, signature = b"x" * 300, node.key.sign(b"x" * 300)
    public = node.key.public_key()
    root_key = Ed25519PrivateKey.generate()
    root = make_root(root_key, "mesh1", NOW)
    cert = issue_member_cert(root_key, root, node.public, "mesh1", "s1", node.node_id, NOW, serial=7)
    assert verify(evidence, chal, node.public, pol, "s1", NOW, revoked).ok
    assert check_member_cert(cert, root, "mesh1", NOW, revoked).ok

    samples: dict[str, list[float]] = {k: [] for k in TARGETS}
    for _ in range(args.runs):
        samples["verify_ms"].append(per_call_ms(lambda: verify(evidence, chal, node.public, pol, "s1", NOW, revoked)))
        samples["ed25519_verify_ms"].append(per_call_ms(lambda: public.verify(signature, message)))
        samples["member_cert_check_ms"].append(per_call_ms(lambda: check_member_cert(cert, root, "mesh1", NOW, revoked)))

    report("attestation", args.json, args.runs, samples, TARGETS, calls_per_run=ROUND_CALLS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
