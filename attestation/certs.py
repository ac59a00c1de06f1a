"""Membership certificates: short-lived X.509 certificates issued to attested nodes.

The mesh root is a self-signed Ed25519 CA. A member certificate carries the node's own
Ed25519 public key, its node id as the subject common name and as a URI SAN
(meshd://<mesh>/<site>/<node id>), and lives MEMBER_CERT_LIFETIME: it is renewed only with
fresh evidence (SPIRE-style), so a node that stops attesting loses its identity by itself.

Invariants:
- Pure: no I/O; `now` is passed in. Serial numbers come from the caller (deterministic tests).
- `check_member_cert` accepts a certificate only if the root signed it, it is within its
  validity (give or take VALIDITY_TOLERANCE), it is a member certificate of this mesh, and
  its node is not revoked; otherwise it returns the reason.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from attestation.names import URI_SCHEME, member_uri, members_named
from attestation.revocation import RevocationList

# Short enough that an expelled node whose revocation has not reached a member yet is cut
# off within the hour anyway; renewal with fresh evidence happens well before (re-attestation
# period), so a healthy member never holds an expired certificate.
MEMBER_CERT_LIFETIME = 3600.0
ROOT_CERT_LIFETIME = 20 * 365 * 86400.0  # the mesh root outlives the hardware
CLOCK_SKEW = 60.0  # not-before is backdated this much: members' clocks differ a little
# A certificate is taken this long before its not-before and after its not-after: the
# clocks of the node that issued it and of the node that checks it may be this far apart
# (a board without a real-time clock boots hours off until NTP answers; an unsynced NTP
# step). Members are cut off by revocation (the signed list and the secret rotation), not
# by expiry; expiry only bounds how long a stolen certificate of a node that went away
# unrevoked is worth something, and two hours more of that is the price of a site that a
# skewed clock does not split.
VALIDITY_TOLERANCE = 2 * 3600.0


def _time(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc)


def make_root(root_key: Ed25519PrivateKey, mesh_id: str, now: float) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"meshd root {mesh_id}"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshd")])
    return (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(root_key.public_key())
            .serial_number(1)
            .not_valid_before(_time(now - CLOCK_SKEW)).not_valid_after(_time(now + ROOT_CERT_LIFETIME))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"{URI_SCHEME}://{mesh_id}")]),
                           critical=False)
            .sign(root_key, algorithm=None))


def issue_member_cert(root_key: Ed25519PrivateKey, root_cert: x509.Certificate, node_public_key: bytes,
                      mesh_id: str, site: str, node_id: str, now: float, serial: int,
                      lifetime: float = MEMBER_CERT_LIFETIME) -> x509.Certificate:
    public = Ed25519PublicKey.from_public_bytes(node_public_key)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id),
                                     x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, site)]))
            .issuer_name(root_cert.subject)
            .public_key(public)
            .serial_number(serial)
            .not_valid_before(_time(now - CLOCK_SKEW)).not_valid_after(_time(now + lifetime))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
                member_uri(mesh_id, site, node_id))]), critical=False)
            .sign(root_key, algorithm=None))


@dataclass(frozen=True)
class CertCheck:
    ok: bool
    reason: str
    node_id: str | None = None
    site: str | None = None


def validity_problem(not_before: float, not_after: float, now: float) -> str | None:
    """Why a certificate valid from `not_before` to `not_after` is not valid at `now`, give
    or take VALIDITY_TOLERANCE; None when it is."""
    if now < not_before - VALIDITY_TOLERANCE:
        return f"certificate is not valid yet (for {not_before - now:.0f}s more)"
    if now > not_after + VALIDITY_TOLERANCE:
        return f"certificate expired {now - not_after:.0f}s ago"
    return None


def check_member_cert(cert: x509.Certificate, root_cert: x509.Certificate, mesh_id: str, now: float,
                      revocations: RevocationList | None = None) -> CertCheck:
    if cert.issuer != root_cert.subject:
        return CertCheck(False, "certificate is not issued by this mesh's root (foreign root)")
    root_key = root_cert.public_key()
    if not isinstance(root_key, Ed25519PublicKey):
        return CertCheck(False, "the mesh root is not an Ed25519 key")
    try:
        root_key.verify(cert.signature, cert.tbs_certificate_bytes)
    except InvalidSignature:
        return CertCheck(False, "certificate signature does not verify against this mesh's root (foreign root)")
    problem = validity_problem(cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp(), now)
    if problem:
        return CertCheck(False, problem)
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        return CertCheck(False, "certificate names no meshd member")
    members = members_named(uris, mesh_id)
    if len(members) != 1:
        return CertCheck(False, "certificate is not a member certificate of this mesh")
    site, node_id = members[0]
    if revocations is not None and revocations.is_revoked(node_id):
        return CertCheck(False, f"node {node_id} is revoked", node_id, site)
    return CertCheck(True, "member certificate verified", node_id, site)


def cert_to_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def cert_from_pem(text: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(text.encode())
