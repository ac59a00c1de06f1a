"""Which members must show fresh evidence now (re-attestation), decided from the replicated
state alone so that any new leader carries on where the old one stopped.

A member is due when:
- it is quarantined (its software was not in the policy): until the policy allows it, it
  is asked again whenever the caller's retry delay lets it (meshd.node.attesting), down
  or not, since a quarantined member may have lost the Raft secret and cannot heartbeat;
- it runs in another kernel boot than the one its last verified evidence came from (it
  rebooted, perhaps into other software), or reports other software than its evidence
  showed (meshd restarted after an upgrade), or
- its last verified evidence is older than the re-attestation period.

Invariants:
- Pure: no I/O; `now` is the same wall clock the state's timestamps use.
- Only active, reachable members are asked: left and revoked nodes are done with, and a
  down node cannot answer (liveness deals with it; it is asked again once it is back);
  a quarantined node is the exception above.
- Output is ordered most-urgent first: changed software and reboots, then quarantined
  members, then the longest unattested.
"""

from __future__ import annotations

from meshd.state import ADMIN_LEFT, ADMIN_REVOKED, LIVENESS_DOWN, SiteState


def due_for_attestation(state: SiteState, now: float, period: float) -> list[str]:
    changed, quarantined, stale = [], [], []
    for node in state.nodes.values():
        if node.admin in (ADMIN_LEFT, ADMIN_REVOKED):
            continue
        if node.quarantine:
            quarantined.append(node)
        elif node.liveness == LIVENESS_DOWN:
            continue
        elif (node.boot_id and node.boot_id != node.attested_boot_id) or (
                node.software and node.attested_software and node.software != node.attested_software):
            changed.append(node)
        elif now - node.attested_at >= period:
            stale.append(node)
    changed.sort(key=lambda n: n.node_id)
    quarantined.sort(key=lambda n: n.node_id)
    stale.sort(key=lambda n: (n.attested_at, n.node_id))
    return [n.node_id for n in changed + quarantined + stale]
