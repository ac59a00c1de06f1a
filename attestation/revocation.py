"""The revocation list: which nodes are expelled from a mesh, signed by the mesh root.

Each list carries a number that only grows; a member replaces its list only with a verified
one of a higher number for the same mesh, so an old list (one that does not yet name a newly
expelled node) can never be replayed to bring that node back.

Between sites each entry also travels alone (`sign_revocation` / `open_revocation`), signed by
the same root: the mesh document keeps them as a grow-only set, so two sites that revoked
different nodes while cut off both end up with both, whatever their lists' numbers.

Invariants:
- Pure: no I/O, no clock.
- Revocation is forever within a mesh: `with_revoked` and `with_entries` only add entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from attestation.evidence import NODE_ID
from attestation.signed import AttestationError, open_document, sign_document

REVOCATION_KIND = "revocations"
REVOCATION_ENTRY_KIND = "revocation"  # one entry on its own, for other sites
MAX_REASON_CHARS = 200


@dataclass(frozen=True)
class Revocation:
    node_id: str
    at: float
    by: str  # who revoked (an operator or a node name), for the audit trail
    reason: str


@dataclass(frozen=True)
class RevocationList:
    mesh_id: str
    number: int
    entries: dict[str, Revocation] = field(default_factory=dict)

    def is_revoked(self, node_id: str) -> bool:
        return node_id in self.entries

    def with_revoked(self, node_id: str, at: float, by: str, reason: str) -> RevocationList:
        """The next list: this node added (or kept), number + 1."""
        entries = dict(self.entries)
        entries.setdefault(node_id, Revocation(node_id, at, by[:64], reason[:MAX_REASON_CHARS]))
        return RevocationList(self.mesh_id, self.number + 1, entries)

    def with_entries(self, revocations: list[Revocation]) -> RevocationList:
        """The next list: these entries added (entries already listed are kept as they are)."""
        entries = dict(self.entries)
        for revocation in revocations:
            entries.setdefault(revocation.node_id, revocation)
        return RevocationList(self.mesh_id, self.number + 1, entries)

    def to_body(self) -> dict:
        return {"mesh_id": self.mesh_id, "number": self.number,
                "entries": [_entry_body(r) for _, r in sorted(self.entries.items())]}


def sign_revocations(root_key: Ed25519PrivateKey, revocations: RevocationList) -> dict:
    return sign_document(root_key, REVOCATION_KIND, revocations.to_body())


def sign_revocation(root_key: Ed25519PrivateKey, mesh_id: str, revocation: Revocation) -> dict:
    return sign_document(root_key, REVOCATION_ENTRY_KIND, {"mesh_id": mesh_id, **_entry_body(revocation)})


def open_revocation(document: object, root_public_key: bytes, mesh_id: str) -> Revocation:
    """One entry signed on its own, for this mesh; AttestationError with the reason otherwise."""
    body = open_document(document, REVOCATION_ENTRY_KIND, root_public_key)
    if body.get("mesh_id") != mesh_id:
        raise AttestationError("revocation: issued for another mesh")
    return _entry(body)


def _entry_body(r: Revocation) -> dict:
    return {"node_id": r.node_id, "at": r.at, "by": r.by, "reason": r.reason}


def _entry(item: object) -> Revocation:
    try:
        node_id, at, by, reason = item["node_id"], item["at"], item["by"], item["reason"]  # type: ignore[index]
    except (KeyError, TypeError):
        raise AttestationError("revocations: each entry needs node_id, at, by, reason") from None
    if not isinstance(node_id, str) or not NODE_ID.match(node_id):
        raise AttestationError("revocations: entry node_id must be a node id")
    if isinstance(at, bool) or not isinstance(at, (int, float)) or not isinstance(by, str) \
            or not isinstance(reason, str):
        raise AttestationError(f"revocations: entry for {node_id} is malformed")
    return Revocation(node_id, float(at), by, reason)


def open_revocations(document: object, root_public_key: bytes) -> RevocationList:
    body = open_document(document, REVOCATION_KIND, root_public_key)
    mesh_id, number, raw = body.get("mesh_id"), body.get("number"), body.get("entries")
    if not isinstance(mesh_id, str) or not mesh_id:
        raise AttestationError("revocations: mesh_id must be a non-empty string")
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        raise AttestationError("revocations: number must be a non-negative integer")
    if not isinstance(raw, list):
        raise AttestationError("revocations: entries must be a list")
    entries = {entry.node_id: entry for entry in map(_entry, raw)}
    return RevocationList(mesh_id, number, entries)


def supersedes(candidate: RevocationList, current: RevocationList | None) -> bool:
    """Adopt `candidate` only if it is newer for the same mesh and forgets nobody."""
    if current is None:
        return True
    return (candidate.mesh_id == current.mesh_id and candidate.number > current.number
            and set(current.entries) <= set(candidate.entries))
