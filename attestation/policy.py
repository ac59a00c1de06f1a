"""Reference values and policy: what software may join, signed by the mesh root.

A policy bundle says, for one mesh: which meshd package digests are allowed for each version,
the minimum version, which sites require TPM-backed evidence, and how old evidence may be.
It carries a serial that only grows: a member keeps the newest bundle it has verified.

Invariants:
- Pure: no I/O, no clock.
- `open_policy` returns a Policy only for a bundle signed by the given root key and well
  formed; otherwise AttestationError with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from attestation.evidence import HEX_DIGEST, VERSION, version_tuple
from attestation.signed import AttestationError, open_document, sign_document

POLICY_KIND = "policy"
# Evidence older than this (by its own iat, against the verifier's clock) is stale even with
# a fresh nonce: a challenge is answered within seconds.
DEFAULT_EVIDENCE_MAX_AGE = 60.0
# A member whose clock is further off the leader's than this is told so (an event): edge boxes
# without RTC batteries drift, and NTP fixes them soon after boot. Never a reason to refuse
# evidence (attestation.verifier: freshness is the nonce's).
MAX_CLOCK_SKEW = 30.0
# A release key is a raw Ed25519 public key in hex; a handful of pipelines sign releases.
RELEASE_KEY = re.compile(r"[0-9a-f]{64}")
MAX_RELEASE_KEYS = 32


@dataclass(frozen=True)
class Policy:
    mesh_id: str
    serial: int
    min_version: str
    allowed_digests: dict[str, frozenset[str]]  # version -> allowed meshd-package digests
    tpm_required_sites: frozenset[str] = frozenset()
    evidence_max_age: float = DEFAULT_EVIDENCE_MAX_AGE
    issued_at: float = 0.0
    # Offline release keys (hex raw Ed25519 public keys) whose artifact manifests the mesh
    # accepts beside the root's (meshd.artifacts): a release pipeline signs without a voter.
    release_keys: frozenset[str] = frozenset()

    def to_body(self) -> dict:
        body = {"mesh_id": self.mesh_id, "serial": self.serial, "min_version": self.min_version,
                "allowed_digests": {v: sorted(d) for v, d in sorted(self.allowed_digests.items())},
                "tpm_required_sites": sorted(self.tpm_required_sites), "evidence_max_age": self.evidence_max_age,
                "issued_at": self.issued_at}
        if self.release_keys:  # only when set: a bundle without them reads as before
            body["release_keys"] = sorted(self.release_keys)
        return body


def sign_policy(root_key: Ed25519PrivateKey, policy: Policy) -> dict:
    return sign_document(root_key, POLICY_KIND, policy.to_body())


def open_policy(document: object, root_public_key: bytes) -> Policy:
    body = open_document(document, POLICY_KIND, root_public_key)
    try:
        mesh_id, serial, min_version = body["mesh_id"], body["serial"], body["min_version"]
        allowed, tpm_sites = body["allowed_digests"], body["tpm_required_sites"]
        max_age, issued_at = body["evidence_max_age"], body["issued_at"]
    except KeyError as e:
        raise AttestationError(f"policy: missing {e.args[0]}") from None
    if not isinstance(mesh_id, str) or not mesh_id:
        raise AttestationError("policy: mesh_id must be a non-empty string")
    if isinstance(serial, bool) or not isinstance(serial, int) or serial < 0:
        raise AttestationError("policy: serial must be a non-negative integer")
    if not isinstance(min_version, str) or not VERSION.match(min_version):
        raise AttestationError("policy: min_version must be a version like 1.2.3")
    if not isinstance(allowed, dict):
        raise AttestationError("policy: allowed_digests must map versions to digest lists")
    digests: dict[str, frozenset[str]] = {}
    for version, values in allowed.items():
        if not VERSION.match(version) or not isinstance(values, list) or not all(
                isinstance(d, str) and HEX_DIGEST.match(d) for d in values):
            raise AttestationError(f"policy: allowed_digests[{version[:20]!r}] must be a list of sha256 hex digests")
        digests[version] = frozenset(values)
    if not isinstance(tpm_sites, list) or not all(isinstance(s, str) for s in tpm_sites):
        raise AttestationError("policy: tpm_required_sites must be a list of site names")
    if isinstance(max_age, bool) or not isinstance(max_age, (int, float)) or not 0 < max_age <= 86400:
        raise AttestationError("policy: evidence_max_age must be seconds in (0, 86400]")
    if isinstance(issued_at, bool) or not isinstance(issued_at, (int, float)):
        raise AttestationError("policy: issued_at must be a time")
    release = body.get("release_keys", [])
    if not isinstance(release, list) or len(release) > MAX_RELEASE_KEYS or not all(
            isinstance(k, str) and RELEASE_KEY.fullmatch(k) for k in release):
        raise AttestationError(f"policy: release_keys must be at most {MAX_RELEASE_KEYS} hex Ed25519 public keys")
    return Policy(mesh_id=mesh_id, serial=serial, min_version=min_version, allowed_digests=digests,
                  tpm_required_sites=frozenset(tpm_sites), evidence_max_age=float(max_age),
                  issued_at=float(issued_at), release_keys=frozenset(release))


def newer(candidate: Policy, current: Policy | None) -> bool:
    """A bundle replaces the current one only with a higher serial for the same mesh."""
    return current is None or (candidate.mesh_id == current.mesh_id and candidate.serial > current.serial)


def rank(document: dict, policy: Policy) -> tuple[int, float, str]:
    """Orders the bundles of one mesh the same way on every site: by serial, then issue time,
    then signature. Two sites cut off from each other that both changed the policy made two
    bundles of the same serial; every site ends with the same one of them."""
    return (policy.serial, policy.issued_at, str(document.get("sig", "")))


def allows_version(policy: Policy, version: str) -> bool:
    return version_tuple(version) >= version_tuple(policy.min_version)
