"""Peer identity from certificates, and certificate installation (meshd.io.tls)."""

from __future__ import annotations

import pytest

from meshd.io.tls import PeerTLS, member_of

M = "mesh1"


def cert(*uris):
    return {"subject": ((("commonName", "x"),),), "subjectAltName": tuple(("URI", u) for u in uris)}


@pytest.mark.parametrize("peer_cert,expected", [
    (cert(f"meshd://{M}/s1/{'a' * 32}"), ("s1", "a" * 32)),
    (None, None),  # no verified certificate (a joiner, or verification failed)
    ({}, None),
    (cert(f"meshd://other/s1/{'a' * 32}"), None),  # another mesh
    (cert(f"meshd://{M}"), None),  # the root's own name is not a member
    (cert(f"meshd://{M}/s1/"), None),
    (cert(f"meshd://{M}/s1/{'a' * 32}", f"meshd://{M}/s2/{'b' * 32}"), None),  # ambiguous
    ({"subjectAltName": (("DNS", f"meshd://{M}/s1/{'a' * 32}"),)}, None),  # not a URI entry
])
def test_member_of(peer_cert, expected):
    assert member_of(peer_cert, M) == expected


def test_no_certificate_no_service(tmp_path):
    tls = PeerTLS(tmp_path)
    assert not tls.ready and tls.server_context() is None
    with pytest.raises(FileNotFoundError):
        tls.client_context()
    with pytest.raises(ValueError, match="PEM"):
        tls.install_certificate("not a certificate")


def test_a_renewed_certificate_must_match_the_node_key(tmp_path):
    import time

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from attestation.certs import cert_to_pem, issue_member_cert, make_root

    root = Ed25519PrivateKey.generate()
    root_cert = make_root(root, M, time.time())
    own, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    (tmp_path / "node.key").write_bytes(own.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    (tmp_path / "root.pem").write_text(cert_to_pem(root_cert))

    def pem_for(key):
        pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cert_to_pem(issue_member_cert(root, root_cert, pub, M, "s1", "a" * 32, time.time(), serial=3))

    tls = PeerTLS(tmp_path)
    tls.install_certificate(pem_for(own))
    assert tls.ready and tls.server_context() is not None
    installed = (tmp_path / "member.pem").read_text()
    with pytest.raises(ValueError, match="does not match"):
        tls.install_certificate(pem_for(other))
    assert (tmp_path / "member.pem").read_text() == installed, "a bad renewal changes nothing"
