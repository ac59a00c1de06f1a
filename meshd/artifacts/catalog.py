"""What a site knows of its artifacts: which are known (their manifests), who holds them,
what pins them, and whether a manifest may join the catalog.

The catalog is part of the replicated site state (`SiteState.artifacts`: digest -> signed
manifest document; `SiteState.artifacts_removed`: digest -> when the last removed manifest
was pushed; `NodeRecord.artifacts`: what each member holds complete).

Invariants:
- Pure: reads a SiteState, no I/O, no clock.
- `admit` accepts a manifest only when it opens with a key this mesh trusts now (the root,
  or a release key of the root-signed policy in force) and it is not a replay: a manifest of
  a removed artifact pushed no later than the removed one is refused, so an old copy cannot
  bring back what an operator removed. Pushing the same bytes again (a newer manifest) can.
- An artifact is pinned while any kept version of any app of this site's state names it
  (the running one, the history `keep_versions` keeps, pinned versions): `rm` refuses
  those, and a node's store never drops them.
- `staging` names, for a node, the artifacts of an app's new version while its deployment
  replaces a replica there: the node fetches them before the replica changes
  (meshd.rollout.unstaged holds the change until they are there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from attestation.signed import AttestationError
from meshd.artifacts.manifest import Manifest, ManifestError, open_manifest
from meshd.state import ADMIN_LEFT, ADMIN_REVOKED, SiteState

# Artifacts one site's catalog holds: every member keeps each manifest in its state (about
# 600 bytes each); a site with more is keeping what nothing runs.
MAX_CATALOG = 4096
# Removals remembered against replays: older ones go first. A manifest older than a removal
# forgotten this way could be taken in again; it still has to be signed by a trusted key.
MAX_REMOVED = 10_000


@dataclass(frozen=True)
class Refusal:
    reason: str


def trusted_keys(state: SiteState) -> dict[str, str]:
    """Hex public key -> what it is, for the keys whose manifests this site accepts."""
    keys = {state.trust_root: "mesh root"} if state.trust_root else {}
    for key in release_keys(state):
        keys.setdefault(key, "release key")
    return keys


def release_keys(state: SiteState) -> tuple[str, ...]:
    """The offline release keys the policy in force names (`meshctl policy release-key`)."""
    if not state.policy or not state.trust_root:
        return ()
    from attestation.policy import open_policy
    try:
        return tuple(sorted(open_policy(state.policy, bytes.fromhex(state.trust_root)).release_keys))
    except (AttestationError, ValueError):
        return ()


def admit(state: SiteState, document: Any) -> Manifest | Refusal:
    """The manifest when it may join this site's catalog, else why not."""
    try:
        manifest = open_manifest(document, mesh=state.mesh_id, trusted=trusted_keys(state))
    except ManifestError as e:
        return Refusal(str(e))
    removed = state.artifacts_removed.get(manifest.digest)
    if removed is not None and manifest.pushed_at <= removed:
        return Refusal(f"manifest of {manifest.digest[:19]}... was pushed at {manifest.pushed_at:.0f}, no later than "
                       "the one removed from this site: a replayed old manifest (push the file again)")
    return manifest


def manifest_of(state: SiteState, digest: str) -> Manifest | None:
    document = state.artifacts.get(digest)
    if document is None:
        return None
    try:
        return open_manifest(document, mesh=state.mesh_id, trusted=trusted_keys(state), digest=digest)
    except ManifestError:
        return None  # its key is no longer trusted (a release key taken out of the policy)


def pins(state: SiteState) -> dict[str, list[str]]:
    """Digest -> the app versions that name it ("app@v3"), for every kept version."""
    out: dict[str, list[str]] = {}
    for name, record in sorted(state.apps.items()):
        versions = {record.version: record.spec}
        versions.update({v.version: v.spec for v in record.history})
        for version, spec in sorted(versions.items()):
            for ref in spec.artifacts:
                if ref.digest:
                    where = f"{name}@v{version}"
                    if where not in out.setdefault(ref.digest, []):
                        out[ref.digest].append(where)
    return out


def holders(state: SiteState, digest: str) -> list[str]:
    """Names of the members of this site that hold `digest` complete."""
    return sorted(n.name for n in state.nodes.values()
                  if digest in n.artifacts and n.admin not in (ADMIN_LEFT, ADMIN_REVOKED))


def holder_ids(state: SiteState, digest: str) -> list[str]:
    return sorted(n.node_id for n in state.nodes.values()
                  if digest in n.artifacts and n.admin not in (ADMIN_LEFT, ADMIN_REVOKED))


def listing(state: SiteState) -> list[dict]:
    """`meshctl artifact ls`: every known artifact with its holders and pins."""
    pinned = pins(state)
    rows = []
    for digest, document in sorted(state.artifacts.items(), key=lambda kv: _body(kv[1]).get("name", "")):
        body = _body(document)
        rows.append({"digest": digest, "name": body.get("name", ""), "size": body.get("size", 0),
                     "holders": holders(state, digest), "pinned_by": pinned.get(digest, []),
                     "pushed_by": body.get("pushed_by", ""), "pushed_at": body.get("pushed_at", 0.0)})
    return rows


def removal_refusal(state: SiteState, digest: str) -> str | None:
    pinned = pins(state).get(digest)
    if pinned:
        return f"{digest[:19]}... is pinned by {', '.join(pinned[:5])}: remove or purge those versions first"
    return None


def _body(document: Mapping[str, Any]) -> Mapping[str, Any]:
    body = document.get("body") if isinstance(document, Mapping) else None
    return body if isinstance(body, Mapping) else {}


def staging(state: SiteState, node_id: str) -> frozenset[str]:
    """The artifacts of the new versions of apps whose deployment is replacing a replica on
    this node: fetched before the replica changes (meshd.rollout.unstaged waits for them)."""
    wanted: set[str] = set()
    for alloc in state.allocs.on_node(node_id):
        record = state.apps.get(alloc.app)
        d = record.deployment if record is not None else None
        if record is None or d is None or not d.active or not alloc.live or record.runs(alloc.version):
            continue
        wanted.update(a.digest for a in record.spec.artifacts if a.digest)
    return frozenset(wanted)
