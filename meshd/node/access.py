"""Who may open or keep a connection to this node: one rule for member calls, sync
sessions, and for cutting what is open when the state changes.

Invariants:
- A node of our site must be a current member of it (not left, not revoked).
- A node of another site is in our records only if it once was ours, so for it the mesh
  root's revocation list decides.
- Checked when a connection opens and again whenever the site's state changes, so revoking
  cuts what is already open.
"""

from __future__ import annotations

from meshd.state import ADMIN_LEFT, ADMIN_REVOKED, SiteState


def may_connect(state: SiteState, own_site: str, site: str, node_id: str, listed_revoked: frozenset[str]) -> bool:
    node = state.nodes.get(node_id)
    if node is not None and node.admin == ADMIN_REVOKED:
        return False
    if site == own_site and (node is None or node.admin == ADMIN_LEFT):
        return False
    return node_id not in listed_revoked
