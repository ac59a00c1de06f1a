"""Member identities as URIs: `meshd://<mesh id>/<site>/<node id>`, the URI SAN of a
membership certificate (attestation.certs writes it; meshd.io.tls reads it from the ssl
module's parsed certificate, without loading an X.509 library).

Invariants:
- Pure: string work only.
- `members_named` returns only well-formed names of the given mesh; callers accept a
  certificate only when it names exactly one.
"""

from __future__ import annotations

from collections.abc import Iterable

URI_SCHEME = "meshd"


def member_uri(mesh_id: str, site: str, node_id: str) -> str:
    return f"{URI_SCHEME}://{mesh_id}/{site}/{node_id}"


def members_named(uris: Iterable[str], mesh_id: str) -> list[tuple[str, str]]:
    """(site, node id) for every URI that names a member of this mesh."""
    prefix = f"{URI_SCHEME}://{mesh_id}/"
    parts = [uri[len(prefix):].split("/") for uri in uris if uri.startswith(prefix)]
    return [(p[0], p[1]) for p in parts if len(p) == 2 and all(p)]
