"""What this node does about artifacts, given the site's catalog and its own store: which
to fetch and from whom, which to drop, what to tell the site it holds, and why a workload
that needs one still waits.

Invariants:
- Pure: reads a SiteState and sets of digests; no I/O, no clock.
- A node fetches only what a workload of its own wants, or a rollout stages on it (the new
  version's artifacts where an old replica runs), only
  with a manifest the catalog holds and that opens with a key the mesh trusts now, and
  only from members of its site that hold it complete or are fetching it too (a swarm:
  each serves only the pieces it verified), never from itself; when none holds it
  does, only the site's puller (meshd.artifacts.sites.puller) fetches it from members of
  other sites that published it, so a site pulls it over its uplink once; the others fetch
  from the puller the pieces it has verified, while it pulls the rest.
- It drops only what the site removed from its catalog (`artifacts_removed`) and no
  workload here wants; the quota's garbage collection (meshd.artifacts.retention) is the
  store's, at the moment room is needed.
- It reports its holdings exactly when the site's record of it differs from its store.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Sequence

from crdt.schema import ArtifactHolding
from meshd.artifacts import catalog, sites
from meshd.artifacts.manifest import Manifest
from meshd.artifacts.sites import Source
from meshd.state import SiteState


@dataclass(frozen=True)
class Fetch:
    manifest: Manifest
    sources: tuple[Source, ...]  # members holding it: of this site, or (the puller) of others


@dataclass(frozen=True)
class Decision:
    fetch: tuple[Fetch, ...] = ()
    drop: tuple[str, ...] = ()
    report: tuple[str, ...] | None = None  # the holdings to tell the site, when it shows others
    waiting: tuple[tuple[str, str], ...] = ()  # (digest, why it cannot be fetched now)


def sources_of(state: SiteState, node_id: str) -> Source:
    node = state.nodes[node_id]
    return Source(node.node_id, node.address, node.name)


def decide(state: SiteState, node_id: str, held: frozenset[str], wanted: frozenset[str],
           holdings: Sequence[ArtifactHolding] = ()) -> Decision:
    """`wanted`: what this node's workloads wait for or run with; what rollouts stage here is
    added (`catalog.staging`). `holdings`: what other sites published of their artifacts (the mesh
    document): where this site's puller pulls from (meshd.artifacts.sites)."""
    wanted = wanted | catalog.staging(state, node_id)
    fetch, waiting = [], []
    for digest in sorted(wanted - held):
        manifest = catalog.manifest_of(state, digest)
        if manifest is None:
            why = ("its manifest is no longer signed by a key the mesh trusts" if digest in state.artifacts
                   else "not known to this site yet (push it, or wait for the site that has it)")
            waiting.append((digest, why))
            continue
        local = sites.local_sources(state, digest, node_id)
        if local:
            # and the members fetching it too: each serves the pieces it has verified (a swarm)
            holding = {s.node_id for s in local}
            swarm = tuple(sources_of(state, n) for n in sites.needing(state, digest) if n != node_id
                          and n not in holding)
            fetch.append(Fetch(manifest, local + swarm))
            continue
        remote = sites.remote_sources(state, holdings, digest)
        if not remote:
            waiting.append((digest, "no member of the mesh holds it"))
            continue
        pulling = sites.puller(state, digest)
        if pulling == node_id:
            fetch.append(Fetch(manifest, remote))
        elif pulling is not None and pulling in state.nodes:
            # from the puller, the pieces it has verified so far, while it pulls the rest
            fetch.append(Fetch(manifest, (sources_of(state, pulling),)))
        else:
            waiting.append((digest, f"a member of this site pulls it from site {remote[0].site}, then shares it"))
    drop = tuple(sorted(d for d in held - wanted if d in state.artifacts_removed and d not in state.artifacts))
    own = state.nodes.get(node_id)
    holdings = tuple(sorted(held - set(drop)))
    report = holdings if own is not None and tuple(own.artifacts) != holdings else None
    return Decision(fetch=tuple(fetch), drop=drop, report=report, waiting=tuple(waiting))
