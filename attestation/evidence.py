"""Evidence: what a node claims about itself, signed by its own Ed25519 key.

Claim names follow EAT (RFC 9711) where one fits:
- `eat_nonce`: the verifier's single-use challenge (hex), so evidence cannot be replayed;
- `ueid`: the node id (derived from the signing key: see meshd.tokens.node_id_for);
- `bootseed`: the kernel's boot id, so a reboot is visible and triggers re-attestation;
- `swname` / `swversion`: "meshd" and its version;
- `measurements`: digests of what runs, {"meshd-package": sha256 hex of the installed package
  files, "config": sha256 hex of the effective configuration};
- `iat`: when the evidence was made (seconds since the epoch, the attester's clock).

Software evidence is self-reported: the key proves who signed, not that the measured files
are the ones that run. A TPM quote (a later backend) binds the measurement to hardware.

Invariants:
- Pure: no I/O. `make_evidence` signs what it is given; measuring is the attester's job.
- `parse_claims` accepts only well-formed claims (types, lengths) and says what is wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from attestation.signed import AttestationError, sign_document

EVIDENCE_KIND = "evidence"
# What operators are told about software evidence, wherever it is shown.
SOFTWARE_EVIDENCE = "software-only (self-reported)"
SOFTWARE_NAME = "meshd"
MEASURED_PACKAGE = "meshd-package"
MEASURED_CONFIG = "config"
REQUIRED_MEASUREMENTS = (MEASURED_PACKAGE, MEASURED_CONFIG)

HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")  # sha256
NONCE = re.compile(r"^[0-9a-f]{32,128}$")  # 16 to 64 random bytes
NODE_ID = re.compile(r"^[0-9a-f]{32}$")
BOOT_ID = re.compile(r"^[0-9a-f-]{32,36}$")  # /proc/sys/kernel/random/boot_id
VERSION = re.compile(r"^\d{1,6}(\.\d{1,6}){0,3}$")


@dataclass(frozen=True)
class Claims:
    nonce: str
    node_id: str
    boot_id: str
    version: str
    measurements: dict[str, str]
    issued_at: float

    def to_body(self) -> dict:
        return {"eat_nonce": self.nonce, "ueid": self.node_id, "bootseed": self.boot_id, "swname": SOFTWARE_NAME,
                "swversion": self.version, "measurements": dict(self.measurements), "iat": self.issued_at}


def make_evidence(private_key: Ed25519PrivateKey, claims: Claims) -> dict:
    return sign_document(private_key, EVIDENCE_KIND, claims.to_body())


def parse_claims(body: dict) -> Claims:
    """Claims from an evidence body whose signature was already checked."""
    def text(key: str, pattern: re.Pattern, what: str) -> str:
        value = body.get(key)
        if not isinstance(value, str) or not pattern.match(value):
            raise AttestationError(f"evidence: {key} must be {what}")
        return value

    nonce = text("eat_nonce", NONCE, "a hex nonce of 16 to 64 bytes")
    node_id = text("ueid", NODE_ID, "a node id (32 hex digits)")
    boot_id = text("bootseed", BOOT_ID, "a boot id")
    version = text("swversion", VERSION, "a version like 1.2.3")
    if body.get("swname") != SOFTWARE_NAME:
        raise AttestationError(f"evidence: swname must be {SOFTWARE_NAME!r}")
    measurements = body.get("measurements")
    if not isinstance(measurements, dict) or set(measurements) != set(REQUIRED_MEASUREMENTS):
        raise AttestationError(f"evidence: measurements must hold exactly {', '.join(REQUIRED_MEASUREMENTS)}")
    for name, digest in measurements.items():
        if not isinstance(digest, str) or not HEX_DIGEST.match(digest):
            raise AttestationError(f"evidence: measurement {name} must be a sha256 hex digest")
    issued_at = body.get("iat")
    if isinstance(issued_at, bool) or not isinstance(issued_at, (int, float)) or not 0 <= issued_at < 2**40:
        raise AttestationError("evidence: iat must be a time in seconds since the epoch")
    extra = set(body) - {"eat_nonce", "ueid", "bootseed", "swname", "swversion", "measurements", "iat"}
    if extra:
        raise AttestationError(f"evidence: unknown claim {sorted(extra)[0]!r}")
    return Claims(nonce=nonce, node_id=node_id, boot_id=boot_id, version=version, measurements=dict(measurements),
                  issued_at=float(issued_at))


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))
