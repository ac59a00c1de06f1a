"""Mutual TLS on the peer port, with membership certificates.

Every peer connection is TLS 1.3. The server side always presents the member certificate
(issued by the mesh root at admission, renewed at every re-attestation) and asks for the
client's:
- a joiner has no certificate yet and cannot check ours (it has no root yet): its channel is
  encrypted but not mutually authenticated; the join's own proofs (token HMAC over the
  transcript, node signature, attestation evidence) authenticate it;
- a member call needs a client certificate that chains to this mesh's root, names a member
  of this mesh, and belongs to a node that is not revoked; the caller checks the server's
  certificate the same way and that it names the node it meant to reach.

Invariants:
- No certificate, no peer service: a node without a member certificate refuses TLS.
- Contexts are rebuilt from the files when a certificate is renewed; connections that are
  already open keep the certificate they started with.
- Identity comes from the certificate's URI SAN `meshd://<mesh>/<site>/<node id>`, parsed by
  the ssl module (no X.509 library loaded for it).
- Validity dates are checked with the stated clock tolerance
  (attestation.certs.VALIDITY_TOLERANCE), not by OpenSSL's exact check: a member whose clock
  is an hour off the leader's keeps its links. OpenSSL verifies the chain without the dates
  (X509_V_FLAG_NO_CHECK_TIME) and `member_of` checks them, on every verified certificate.
"""

from __future__ import annotations

import ssl
import time
from pathlib import Path

from attestation.certs import validity_problem
from attestation.names import members_named
from meshd.io.identity import MEMBER_CERT_FILE, NODE_KEY_FILE, ROOT_CERT_FILE, write_atomic

MAX_CERT_PEM = 16_384  # a member certificate is well under 1 KB; refuse anything huge
# OpenSSL's flag (x509_vfy.h) for a chain verified without its validity dates; the ssl module
# passes verify_flags through but names only some of them.
X509_V_FLAG_NO_CHECK_TIME = 0x200000


def _base(purpose: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3  # Ed25519 certificates; no legacy suites
    return ctx


def joiner_context() -> ssl.SSLContext:
    """For a node that is not a member yet: encrypted, server not verifiable (no root yet)."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def member_of(peer_cert: dict | None, mesh_id: str, now: float | None = None) -> tuple[str, str] | None:
    """(site, node id) that a verified peer certificate names in this mesh, and that is
    valid at `now` (the wall clock by default) within the clock tolerance; else None."""
    if not peer_cert:
        return None
    try:
        not_before = ssl.cert_time_to_seconds(peer_cert["notBefore"])
        not_after = ssl.cert_time_to_seconds(peer_cert["notAfter"])
    except (KeyError, ValueError):
        return None
    if validity_problem(not_before, not_after, time.time() if now is None else now):
        return None
    names = members_named((value for kind, value in peer_cert.get("subjectAltName", ()) if kind == "URI"), mesh_id)
    return names[0] if len(names) == 1 else None


class PeerTLS:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self._server: ssl.SSLContext | None = None
        self._clients: dict[bool, ssl.SSLContext] = {}

    @property
    def ready(self) -> bool:
        return (self.data_dir / MEMBER_CERT_FILE).exists() and (self.data_dir / ROOT_CERT_FILE).exists()

    def reload(self) -> None:
        self._server = None
        self._clients = {}

    def install_certificate(self, member_pem: str) -> None:
        """A renewed member certificate: new connections use it."""
        if "BEGIN CERTIFICATE" not in member_pem or len(member_pem) > MAX_CERT_PEM:
            raise ValueError("not a PEM certificate")
        candidate = self.data_dir / (MEMBER_CERT_FILE + ".new")
        write_atomic(candidate, member_pem.encode())
        try:
            # It must go with our key and chain to our root, or our own peer port would break.
            ctx = _base(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(candidate, self.data_dir / NODE_KEY_FILE)
        except ssl.SSLError as e:
            candidate.unlink(missing_ok=True)
            raise ValueError(f"the certificate does not match this node's key ({e.reason or e})") from None
        candidate.replace(self.data_dir / MEMBER_CERT_FILE)
        self.reload()

    def _load(self, ctx: ssl.SSLContext) -> ssl.SSLContext:
        ctx.verify_flags |= X509_V_FLAG_NO_CHECK_TIME  # member_of checks the dates (module header)
        ctx.load_cert_chain(self.data_dir / MEMBER_CERT_FILE, self.data_dir / NODE_KEY_FILE)
        ctx.load_verify_locations(self.data_dir / ROOT_CERT_FILE)
        return ctx

    def server_context(self) -> ssl.SSLContext | None:
        if not self.ready:
            return None
        if self._server is None:
            ctx = _base(ssl.PROTOCOL_TLS_SERVER)
            # Optional: joiners have no certificate. Member calls check that one was verified.
            ctx.verify_mode = ssl.CERT_OPTIONAL
            self._server = self._load(ctx)
        return self._server

    def client_context(self, verify_server: bool = True) -> ssl.SSLContext:
        """Our certificate for the server to check. `verify_server=False` only where the
        answer authenticates itself (attestation evidence signed by the node key), so that a
        member whose certificate expired while it was offline can still be re-attested."""
        if not self.ready:
            raise FileNotFoundError("no member certificate yet")
        ctx = self._clients.get(verify_server)
        if ctx is None:
            ctx = _base(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False  # identity is the URI SAN, checked by the caller
            ctx.verify_mode = ssl.CERT_REQUIRED if verify_server else ssl.CERT_NONE
            ctx = self._clients[verify_server] = self._load(ctx)
        return ctx
