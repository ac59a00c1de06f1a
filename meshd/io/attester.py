"""The software attester: measures this node and signs evidence with its node key.

Measurements:
- meshd-package: SHA-256 over the installed meshd, attestation and crdt package files
  (relative path and contents of every .py file, in sorted order: attestation.measure), so
  any change to the code that runs changes the digest;
- config: SHA-256 of the effective configuration (without the one-time join token).

Without a TPM this evidence is self-reported: the key proves which node speaks, not that the
files it measured are the ones executing. With a TPM (meshd.io.tpm) the package digest is
also extended into the measurement PCR and the evidence carries the TPM's quote over it,
bound to the verifier's nonce.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from pathlib import Path

import attestation
import crdt
import meshd
from attestation.evidence import MEASURED_CONFIG, MEASURED_PACKAGE, Claims, TpmClaims, make_evidence
from attestation.measure import MEASURED_NAMES
from attestation.tpm import quote_data
from meshd import __version__
from meshd.config import NodeConfig
from meshd.io.builddigest import measure_files
from meshd.io.identity import Identity
from meshd.io.tpm import TpmDevice
from meshd.tokens import canonical

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
MEASURED_PACKAGES = (meshd, attestation, crdt)
assert tuple(p.__name__ for p in MEASURED_PACKAGES) == MEASURED_NAMES


def package_digest() -> str:
    """The digest of the installed code, measured now (a few ms): a file changed on disk
    since start shows at the next attestation."""
    return measure_files([Path(p.__file__).parent for p in MEASURED_PACKAGES])


@functools.lru_cache(maxsize=1)
def started_digest() -> str:
    """The digest of the code this process loaded, measured once (at start): what the node
    reports running, so that a restart into other software is re-attested at once."""
    return package_digest()


def config_digest(config: NodeConfig) -> str:
    plain = dataclasses.asdict(config)
    plain.pop("join", None)  # a one-time secret, not configuration
    plain.pop("bootstrap", None)  # how the node became a member, not what it does as one
    plain.pop("given", None)  # where each value came from, not what it is
    plain.pop("config_file", None)  # likewise
    plain.pop("log_level", None)  # how much the daemon says, not what it does
    return hashlib.sha256(canonical(plain)).hexdigest()


def boot_id() -> str:
    try:
        return Path(BOOT_ID_PATH).read_text().strip()
    except OSError:  # not Linux: a per-process id still shows restarts
        return _process_boot_id()


@functools.lru_cache(maxsize=1)
def _process_boot_id() -> str:
    return hashlib.sha256(f"{time.time_ns()}".encode()).hexdigest()[:32]


def node_evidence(identity: Identity, nonce: bytes, config: NodeConfig, tpm: TpmDevice | None = None,
                  credential: bytes = b"") -> dict:
    """Evidence answering `nonce`: software-only, or with a TPM quote when `tpm` is given
    (`credential`: the secret recovered by credential activation, on a join). Blocking."""
    digest = package_digest()
    tpm_claims = None
    if tpm is not None:
        events = tpm.measure(digest)
        attest, signature = tpm.quote(quote_data(nonce.hex(), identity.node_id))
        tpm_claims = TpmClaims(attest.hex(), signature.hex(), tuple(events), credential.hex())
    claims = Claims(nonce=nonce.hex(), node_id=identity.node_id, boot_id=boot_id(), version=__version__,
                    measurements={MEASURED_PACKAGE: digest, MEASURED_CONFIG: config_digest(config)},
                    issued_at=time.time(), tpm=tpm_claims)
    return make_evidence(identity.private_key, claims)
