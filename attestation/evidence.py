"""Evidence: what a node claims about itself, signed by its own Ed25519 key.

Claim names follow EAT (RFC 9711) where one fits:
- `eat_nonce`: the verifier's single-use challenge (hex), so evidence cannot be replayed;
- `ueid`: the node id (derived from the signing key: see meshd.tokens.node_id_for);
- `bootseed`: the kernel's boot id, so a reboot is visible and triggers re-attestation;
- `swname` / `swversion`: "meshd" and its version;
- `measurements`: digests of what runs, {"meshd-package": sha256 hex of the installed package
  files, "config": sha256 hex of the effective configuration};
- `iat`: when the evidence was made (seconds since the epoch, the attester's clock);
- `tpm` (TPM-backed evidence only): {"quote": hex TPM2B_ATTEST, "signature": hex
  TPMT_SIGNATURE, "events": [sha256 hex, ...] the measurement PCR's event log, "credential":
  hex, the secret recovered by credential activation, on a join only}. See attestation.tpm.

Software evidence is self-reported: the key proves who signed, not that the measured files
are the ones that run. A TPM quote binds the measurements to the node's TPM.

Invariants:
- Pure: no I/O. `make_evidence` signs what it is given; measuring is the attester's job.
- `parse_claims` accepts only well-formed claims (types, lengths) and says what is wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from attestation.signed import AttestationError, sign_document
from attestation.tpm import CREDENTIAL_SIZE

EVIDENCE_KIND = "evidence"
# What operators are told about software evidence, wherever it is shown.
SOFTWARE_EVIDENCE = "software-only (self-reported)"
TPM_EVIDENCE = "tpm 2.0 quote"
SOFTWARE_NAME = "meshd"
MEASURED_PACKAGE = "meshd-package"
MEASURED_CONFIG = "config"
REQUIRED_MEASUREMENTS = (MEASURED_PACKAGE, MEASURED_CONFIG)

HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")  # sha256
NONCE = re.compile(r"^[0-9a-f]{32,128}$")  # 16 to 64 random bytes
NODE_ID = re.compile(r"^[0-9a-f]{32}$")
BOOT_ID = re.compile(r"^[0-9a-f-]{32,36}$")  # /proc/sys/kernel/random/boot_id
VERSION = re.compile(r"^\d{1,6}(\.\d{1,6}){0,3}$")
MAX_TPM_BLOB = 4096  # a quote is ~150 bytes, an RSA signature 262: generous, still bounded
HEX_BLOB = re.compile(r"^([0-9a-f]{2}){1,%d}$" % MAX_TPM_BLOB)
# The event log grows by one entry per start or code change within one boot; thousands
# without a reboot mean something else is wrong, and the bound keeps evidence small.
MAX_EVENT_LOG = 1024
CREDENTIAL_HEX = re.compile(r"^([0-9a-f]{2}){0,%d}$" % CREDENTIAL_SIZE)


@dataclass(frozen=True)
class Claims:
    nonce: str
    node_id: str
    boot_id: str
    version: str
    measurements: dict[str, str]
    issued_at: float
    tpm: TpmClaims | None = None

    def to_body(self) -> dict:
        body = {"eat_nonce": self.nonce, "ueid": self.node_id, "bootseed": self.boot_id, "swname": SOFTWARE_NAME,
                "swversion": self.version, "measurements": dict(self.measurements), "iat": self.issued_at}
        if self.tpm is not None:
            body["tpm"] = self.tpm.to_plain()
        return body


@dataclass(frozen=True)
class TpmClaims:
    quote: str  # hex of the TPM2B_ATTEST
    signature: str  # hex of the TPMT_SIGNATURE
    events: tuple[str, ...]  # sha256 hex digests extended into the measurement PCR, in order
    credential: str = ""  # hex secret from credential activation (joins only)

    def to_plain(self) -> dict:
        plain: dict = {"quote": self.quote, "signature": self.signature, "events": list(self.events)}
        if self.credential:
            plain["credential"] = self.credential
        return plain


def _parse_tpm(raw: object) -> TpmClaims:
    if not isinstance(raw, dict) or not set(raw) <= {"quote", "signature", "events", "credential"}:
        raise AttestationError("evidence: tpm must hold quote, signature, events and optionally credential")
    for key in ("quote", "signature"):
        value = raw.get(key)
        if not isinstance(value, str) or not HEX_BLOB.match(value):
            raise AttestationError(f"evidence: tpm.{key} must be hex of at most {MAX_TPM_BLOB} bytes")
    events = raw.get("events")
    if not isinstance(events, list) or len(events) > MAX_EVENT_LOG or not all(
            isinstance(e, str) and HEX_DIGEST.match(e) for e in events):
        raise AttestationError(f"evidence: tpm.events must be a list of at most {MAX_EVENT_LOG} sha256 hex digests")
    credential = raw.get("credential", "")
    if not isinstance(credential, str) or not CREDENTIAL_HEX.match(credential):
        raise AttestationError(f"evidence: tpm.credential must be hex of at most {CREDENTIAL_SIZE} bytes")
    return TpmClaims(raw["quote"], raw["signature"], tuple(events), credential)


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
    extra = set(body) - {"eat_nonce", "ueid", "bootseed", "swname", "swversion", "measurements", "iat", "tpm"}
    if extra:
        raise AttestationError(f"evidence: unknown claim {sorted(extra)[0]!r}")
    tpm = _parse_tpm(body["tpm"]) if "tpm" in body else None
    return Claims(nonce=nonce, node_id=node_id, boot_id=boot_id, version=version, measurements=dict(measurements),
                  issued_at=float(issued_at), tpm=tpm)


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))
