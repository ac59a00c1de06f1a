"""Artifacts between sites: what a site's leader publishes in the mesh document, which
manifests it takes in from there, and which member of a site pulls an artifact from another
site (once for the whole site: the rest fetch it from that member over the LAN).

Invariants:
- Pure: reads a SiteState and document records; no I/O, no clock (`ts` is passed in).
- A site publishes, for each artifact of its catalog, its signed manifest and up to
  MAX_PUBLISHED_HOLDERS of its members holding it; again only when that changed. An artifact
  it removed is published with no holders, so no site pulls it from there any more.
- A manifest is taken in only for an artifact an app version of this site pins and the
  catalog lacks; the catalog still checks it (catalog.admit), whoever published it.
- One member pulls from another site: of the members whose workloads need it (or that stage
  it), the first by a hash of (digest, node id), the same on every member. Nobody else in
  the site pulls it over the uplink; they wait for it to hold the artifact, then fetch it
  from it (and from one another).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable, Iterable

from crdt.schema import MAX_PUBLISHED_HOLDERS, ArtifactHolding
from meshd.artifacts import catalog
from meshd.state import ADMIN_LEFT, ADMIN_REVOKED, SiteState


@dataclass(frozen=True)
class Source:
    """A member to fetch an artifact from: of this site, or of `site` (another)."""
    node_id: str
    address: str
    name: str
    site: str = ""  # "" for a member of this site


def holdings_to_publish(state: SiteState, published: Callable[[str], ArtifactHolding | None],
                        ts: float) -> list[ArtifactHolding]:
    out = []
    for digest, document in sorted(state.artifacts.items()):
        holders = tuple(sorted(f"{n.node_id}@{n.address}" for n in state.nodes.values()
                               if digest in n.artifacts and n.state == "ready"))[:MAX_PUBLISHED_HOLDERS]
        record = ArtifactHolding(digest=digest, site=state.site, manifest=json.dumps(document, sort_keys=True),
                                 holders=holders, ts=ts)
        old = published(record.key)
        if old is None or old.holders != record.holders or old.manifest != record.manifest:
            out.append(record)
    for digest in sorted(set(state.artifacts_removed) - set(state.artifacts)):
        old = published(f"{digest}/{state.site}")
        if old is not None and old.holders:
            out.append(ArtifactHolding(digest=digest, site=state.site, manifest=old.manifest, holders=(), ts=ts))
    return out


def manifests_to_take_in(state: SiteState, holdings: Iterable[ArtifactHolding]) -> list[dict]:
    wanted = set(catalog.pins(state)) - set(state.artifacts)
    out: dict[str, dict] = {}
    for record in holdings:
        if record.digest in wanted and record.digest not in out and record.site != state.site:
            try:
                document = json.loads(record.manifest)
            except ValueError:
                continue
            if isinstance(document, dict):
                out[record.digest] = document
    return [out[d] for d in sorted(out)]


def remote_sources(state: SiteState, holdings: Iterable[ArtifactHolding], digest: str) -> tuple[Source, ...]:
    """Members of other sites that hold `digest`, as their sites published them."""
    out = []
    for record in holdings:
        if record.digest != digest or record.site == state.site:
            continue
        for holder in record.holders:
            node_id, _, address = holder.partition("@")
            out.append(Source(node_id, address, f"{node_id[:8]} of site {record.site}", record.site))
    return tuple(sorted(out, key=lambda s: (s.site, s.node_id)))


def local_sources(state: SiteState, digest: str, node_id: str) -> tuple[Source, ...]:
    return tuple(Source(n.node_id, n.address, n.name) for n in sorted(state.nodes.values(), key=lambda n: n.node_id)
                 if digest in n.artifacts and n.node_id != node_id and n.admin not in (ADMIN_LEFT, ADMIN_REVOKED))


def needing(state: SiteState, digest: str) -> list[str]:
    """Members with a live replica whose version names `digest`, or a rollout staging it."""
    out = set()
    for app in catalog.pins(state).get(digest, []):
        record = state.apps[app.rpartition("@")[0]]
        for alloc in state.allocs.of_app(record.spec.name):
            if alloc.live and alloc.node_id in state.nodes and any(
                    a.digest == digest for a in record.spec_of(alloc.version).artifacts):
                out.add(alloc.node_id)
    for node_id in state.nodes:
        if digest in catalog.staging(state, node_id):
            out.add(node_id)
    return sorted(out)


def puller(state: SiteState, digest: str) -> str | None:
    """The member of this site that pulls `digest` from another site."""
    candidates = [n for n in needing(state, digest) if state.nodes[n].state == "ready"]
    if not candidates:
        return None
    return min(candidates, key=lambda n: hashlib.sha256(f"{digest}/{n}".encode()).digest())
