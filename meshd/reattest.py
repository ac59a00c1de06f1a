"""Which members must show fresh evidence now (re-attestation), decided from the replicated
state alone so that any new leader carries on where the old one stopped.

A member is due when:
- it runs in another kernel boot than the one its last verified evidence came from (it
  rebooted, perhaps into other software), or
- its last verified evidence is older than the re-attestation period.

Invariants:
- Pure: no I/O; `now` is the same wall clock the state's timestamps use.
- Only active, reachable members are asked: left and revoked nodes are done with, and a
  down node cannot answer (liveness deals with it; it is asked again once it is back).
- Output is ordered most-urgent first: reboots, then the longest unattested.
"""

from __future__ import annotations

from meshd.state import ADMIN_LEFT, ADMIN_REVOKED, LIVENESS_DOWN, SiteState


def due_for_attestation(state: SiteState, now: float, period: float) -> list[str]:
    rebooted, stale = [], []
    for node in state.nodes.values():
        if node.admin in (ADMIN_LEFT, ADMIN_REVOKED) or node.liveness == LIVENESS_DOWN:
            continue
        if node.boot_id and node.boot_id != node.attested_boot_id:
            rebooted.append(node)
        elif now - node.attested_at >= period:
            stale.append(node)
    rebooted.sort(key=lambda n: n.node_id)
    stale.sort(key=lambda n: (n.attested_at, n.node_id))
    return [n.node_id for n in rebooted + stale]
