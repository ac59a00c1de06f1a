"""A small attestation world for the attestation tests: a mesh root, a policy, a node."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from attestation.evidence import MEASURED_CONFIG, MEASURED_PACKAGE, Claims, make_evidence
from attestation.policy import Policy
from attestation.verifier import Challenge
from meshd.tokens import node_id_for

NOW = 1_800_000_000.0
GOOD_DIGEST = hashlib.sha256(b"meshd 0.2.0 package files").hexdigest()
CONFIG_DIGEST = hashlib.sha256(b"config").hexdigest()


def raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass
class Node:
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)

    @property
    def public(self) -> bytes:
        return raw_public(self.key)

    @property
    def node_id(self) -> str:
        return node_id_for(self.public)

    def claims(self, nonce: str, **changes) -> Claims:
        values = dict(nonce=nonce, node_id=self.node_id, boot_id="0f3c1a52-8e0b-4f55-9d3a-7b9e2c4d5e6f",
                      version="0.2.0", measurements={MEASURED_PACKAGE: GOOD_DIGEST, MEASURED_CONFIG: CONFIG_DIGEST},
                      issued_at=NOW)
        values.update(changes)
        return Claims(**values)

    def evidence(self, nonce: str, **changes) -> dict:
        return make_evidence(self.key, self.claims(nonce, **changes))


def policy(**changes) -> Policy:
    values = dict(mesh_id="mesh1", serial=3, min_version="0.2.0",
                  allowed_digests={"0.2.0": frozenset({GOOD_DIGEST})}, issued_at=NOW - 100)
    values.update(changes)
    return Policy(**values)


def challenge(node: Node, nonce: str = "ab" * 16, issued_at: float = NOW - 1) -> Challenge:
    return Challenge(nonce=nonce, node_id=node.node_id, issued_at=issued_at)
