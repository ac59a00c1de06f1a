"""Peer identity from certificates, and certificate installation (meshd.io.tls)."""

from __future__ import annotations

import pytest

from meshd.io.tls import PeerTLS, member_of

M = "mesh1"


def cert(*uris, not_before="Jan  1 00:00:00 2020 GMT", not_after="Jan  1 00:00:00 2100 GMT"):
    """A verified peer certificate as ssl's getpeercert() gives it."""
    return {"subject": ((("commonName", "x"),),), "subjectAltName": tuple(("URI", u) for u in uris),
            "notBefore": not_before, "notAfter": not_after}


@pytest.mark.parametrize("peer_cert,expected", [
    (cert(f"meshd://{M}/s1/{'a' * 32}"), ("s1", "a" * 32)),
    (None, None),  # no verified certificate (a joiner, or verification failed)
    ({}, None),
    (cert(f"meshd://other/s1/{'a' * 32}"), None),  # another mesh
    (cert(f"meshd://{M}"), None),  # the root's own name is not a member
    (cert(f"meshd://{M}/s1/"), None),
    (cert(f"meshd://{M}/s1/{'a' * 32}", f"meshd://{M}/s2/{'b' * 32}"), None),  # ambiguous
    ({"subjectAltName": (("DNS", f"meshd://{M}/s1/{'a' * 32}"),)}, None),  # not a URI entry
    (cert(f"meshd://{M}/s1/{'a' * 32}", not_after="Jan  1 00:00:00 2021 GMT"), None),  # long expired
    (cert(f"meshd://{M}/s1/{'a' * 32}", not_before="Jan  1 00:00:00 2099 GMT"), None),  # not valid for years
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


def _member_dir(path, root, root_cert, node_id: str, issued_at: float):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from attestation.certs import cert_to_pem, issue_member_cert

    path.mkdir()
    key = Ed25519PrivateKey.generate()
    (path / "node.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    (path / "root.pem").write_text(cert_to_pem(root_cert))
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    (path / "member.pem").write_text(cert_to_pem(issue_member_cert(root, root_cert, pub, M, "s1", node_id, issued_at,
                                                                   serial=7)))
    return PeerTLS(path)


def _handshake(server: PeerTLS, client: PeerTLS) -> tuple[dict, dict]:
    """A real TLS 1.3 handshake over a socket pair: what each side's getpeercert() says."""
    import socket
    import threading

    a, b = socket.socketpair()
    seen: dict = {}

    def serve():
        with server.server_context().wrap_socket(a, server_side=True) as tls:
            seen["client"] = tls.getpeercert()

    thread = threading.Thread(target=serve)
    thread.start()
    with client.client_context().wrap_socket(b) as tls:
        seen["server"] = tls.getpeercert()
    thread.join(5)
    return seen["server"], seen["client"]


def test_certificates_dated_by_a_clock_an_hour_off_are_taken_and_long_expired_ones_are_not(tmp_path):
    import time

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from attestation.certs import MEMBER_CERT_LIFETIME, VALIDITY_TOLERANCE, make_root

    root = Ed25519PrivateKey.generate()
    now = time.time()
    root_cert = make_root(root, M, now - 86400)
    # issued by a leader whose clock was an hour and a half behind ours: expired half an hour
    # ago by our clock (OpenSSL's own check would refuse the handshake)
    behind = now - MEMBER_CERT_LIFETIME - 1800
    # and by a leader an hour ahead: not valid yet by our clock
    ahead = now + 3600
    server = _member_dir(tmp_path / "server", root, root_cert, "a" * 32, behind)
    client = _member_dir(tmp_path / "client", root, root_cert, "b" * 32, ahead)
    server_cert, client_cert = _handshake(server, client)
    assert member_of(server_cert, M) == ("s1", "a" * 32)
    assert member_of(client_cert, M) == ("s1", "b" * 32)
    # beyond the tolerance: the handshake still goes through (the chain is sound), the
    # identity is refused
    assert member_of(server_cert, M, now=now + VALIDITY_TOLERANCE + 1) is None
    assert member_of(client_cert, M, now=now - VALIDITY_TOLERANCE - 1) is None
