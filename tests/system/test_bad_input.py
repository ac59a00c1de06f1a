"""Bad input against a live daemon: each gets a clear error, changes nothing, and the daemon keeps serving."""

from __future__ import annotations

import json
import os
import shutil
import pickle
import socket
import struct
import time
from pathlib import Path

import pytest

from meshd import exitcodes, tokens
from meshd.io.admin import AdminError
from meshd.io.tls import joiner_context
from meshd.io.localsite import sleeper_app

pytestmark = pytest.mark.system


@pytest.fixture
def one(make_site):
    site = make_site("b")
    site.found()
    return site


def snapshot(node) -> dict:
    return {"apps": node.call("apps"), "nodes": [(n["node_id"], n["state"]) for n in node.call("nodes", site=None)],
            "allocs": node.call("allocs", app=None, node=None)}


def raw_admin(path: str, payload: bytes, read: bool = True) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(payload)
        if not read:
            return b""
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


@pytest.mark.parametrize("payload, expected", [
    (b"\x00\x00\x00\x05hello", b"bad request"),
    (struct.pack(">I", 50 * 1024 * 1024) + b"{", b"exceeds"),
    (struct.pack(">I", 2) + b"[]", b"bad request"),
    (b"\xff\xfe\xfd\xfc" * 4, b"exceeds"),
])
def test_junk_on_the_admin_socket_is_refused(one, payload, expected):
    node = one.nodes[0]
    before = snapshot(node)
    reply = raw_admin(node.socket, payload)
    assert expected in reply
    assert snapshot(node) == before


def test_unknown_command_and_bad_arguments(one):
    node = one.nodes[0]
    with pytest.raises(AdminError, match="unknown command"):
        node.call("self_destruct")
    with pytest.raises(AdminError, match="wrong type"):
        node.call("nodes", site=42)
    with pytest.raises(AdminError, match="missing argument"):
        node.call("stop")


@pytest.mark.parametrize("spec, key", [
    ('[app]\nname = "x"\nreplicas = -1\ncommand = ["a"]', "app.replicas"),
    ('[app]\nname = "Bad Name"\ncommand = ["a"]', "app.name"),
    ('[app]\nname = "x"\ncommand = []', "app.command"),
    ('[app]\nname = "x"\ncommand = ["a"]\nfrobnicate = 1', "frobnicate"),
    ('[app]\nname = "x"\ncommand = ["a"]\n[app.resources]\ncpu = "lots"', "app.resources.cpu"),
    ('[app]\nname = "x"\ncommand = ["a"]\n[app.restart]\npolicy = "sometimes"', "app.restart.policy"),
    ('[app\nname = "x"', "toml"),
])
def test_invalid_specs_name_the_key_and_change_nothing(one, spec, key):
    node = one.nodes[0]
    before = snapshot(node)
    with pytest.raises(AdminError) as err:
        node.call("deploy", spec_toml=spec, wait=False, timeout=None)
    assert key in str(err.value)
    assert snapshot(node) == before


@pytest.mark.parametrize("payload", [
    b"GET / HTTP/1.0\r\n\r\n",
    b"\x00" * 64,
    struct.pack(">I", 100 * 1024 * 1024),
    pickle.dumps({"type": "join_hello"}),
    struct.pack(">I", 18) + b'{"type": "attack"}',
])
def test_junk_on_the_peer_port_is_refused_and_the_daemon_keeps_serving(one, payload):
    node = one.nodes[0]
    host, port = node.call("status")["address"].rsplit(":", 1)
    # Not even TLS: the handshake fails and the connection ends without one byte of service.
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        reply = s.recv(65536)
    assert b"error" not in reply and b"challenge" not in reply
    # Inside TLS (as a joiner would connect): the frame layer refuses it with a reason.
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with joiner_context().wrap_socket(raw) as s:
            s.sendall(payload)
            reply = s.recv(65536)
    assert b"error" in reply
    assert node.call("status")["role"] == "leader"


def test_an_unauthenticated_client_gets_no_member_call(one):
    """TLS without a member certificate (or with a valid HMAC but no certificate): refused."""
    node = one.nodes[0]
    host, port = node.call("status")["address"].rsplit(":", 1)
    hello = json.dumps({"type": "member_hello"}).encode()
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with joiner_context().wrap_socket(raw) as s:
            s.sendall(struct.pack(">I", len(hello)) + hello)
            reply = s.recv(65536)
    assert b"member calls need a valid member certificate" in reply
    assert node.call("status")["role"] == "leader"


def test_raw_pickle_on_the_raft_port_is_not_executed(one, tmp_path):
    node = one.nodes[0]
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    host, port = node.call("status")["raft_address"].rsplit(":", 1)
    import zlib
    body = zlib.compress(pickle.dumps(Exploit()))
    for payload in (struct.pack("i", len(body)) + body, pickle.dumps(Exploit())):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(payload)
            time.sleep(0.3)
    time.sleep(0.5)
    assert not marker.exists()
    assert node.call("status")["role"] == "leader"


def test_reused_and_expired_tokens_are_refused_with_a_clear_error(one):
    first = one.nodes[0]
    token = one.token()
    one.join()  # uses a fresh token from one.token()
    joined = one.add_node()
    joined.start(join=token)
    one.wait_ready(joined)
    # the same token again, from another device
    intruder = one.add_node()
    intruder.start(join=token)
    assert intruder.proc.wait(timeout=30) == exitcodes.EXIT_REFUSED
    assert "already used" in intruder.log_text()
    expired = first.call("token_create", site=None, ttl=1)["token"]
    time.sleep(1.5)
    late = one.add_node()
    late.start(join=expired)
    assert late.proc.wait(timeout=30) == exitcodes.EXIT_REFUSED
    assert "expired" in late.log_text()
    forged = tokens.format_token("lab", tokens.parse_token(expired).token_id, b"\x01" * 32)
    forger = one.add_node()
    forger.start(join=forged)
    assert forger.proc.wait(timeout=30) == exitcodes.EXIT_REFUSED
    assert "token" in forger.log_text()
    # withdrawn before use: `token ls` lists what may still be used, never a secret
    withdrawn = first.call("token_create", site=None, ttl=600)
    listed = first.call("token_ls")
    assert [t["token_id"] for t in listed] == [withdrawn["token_id"]] and listed[0]["state"] == "active"
    assert all(tokens.parse_token(withdrawn["token"]).secret.hex() not in json.dumps(t) for t in listed)
    assert first.call("token_revoke", token=withdrawn["token_id"][:6]) == {"token_id": withdrawn["token_id"],
                                                                          "revoked": True}
    assert first.call("token_ls") == []
    by_state = {t["token_id"]: t["state"] for t in first.call("token_ls", all=True)}
    assert by_state[withdrawn["token_id"]] == "revoked" and by_state[tokens.parse_token(token).token_id] == "used"
    refused = one.add_node()
    refused.start(join=withdrawn["token"])
    assert refused.proc.wait(timeout=30) == exitcodes.EXIT_REFUSED
    assert "join token was revoked" in refused.log_text()
    with pytest.raises(AdminError, match="already used by"):
        first.call("token_revoke", token=tokens.parse_token(token).token_id)
    with pytest.raises(AdminError, match="no join token"):
        first.call("token_revoke", token="ffffffffffff")
    with pytest.raises(AdminError, match="site nowhere is not a site of this mesh .*add --new-site"):
        first.call("token_create", site="nowhere", ttl=None)
    names = sorted(n["name"] for n in first.call("nodes", site=None))
    assert names == sorted([first.name, one.nodes[1].name, joined.name])


def modified_copy_of_meshd(root: Path) -> Path:
    """The installed meshd, attestation and crdt packages, copied, with one line changed."""
    import attestation
    import crdt
    import meshd
    for package in (meshd, attestation, crdt):
        src = Path(package.__file__).parent
        shutil.copytree(src, root / src.name, ignore=shutil.ignore_patterns("__pycache__"))
    state = root / "meshd" / "state.py"
    state.write_text(state.read_text() + "\n# a local modification\n")
    return root


def test_modified_software_is_refused_and_changes_nothing(one, tmp_path):
    """Attestation: the joiner holds a valid token and key, but runs software whose digest
    the site's policy does not list."""
    leader = one.nodes[0]
    before = snapshot(leader)
    token = one.token()
    tampered = one.add_node()
    tampered.cwd = str(modified_copy_of_meshd(tmp_path / "sw"))
    tampered.start(join=token)
    assert tampered.proc.wait(timeout=30) == exitcodes.EXIT_REFUSED
    log = tampered.log_text()
    assert "attestation: " in log and "not a reference value" in log, log[-2000:]
    assert snapshot(leader) == before
    events = [e["message"] for e in leader.call("events")]
    assert any("refused" in m and "not a reference value" in m for m in events), events[-5:]
    # the token was not consumed: an honest device can still use it
    honest = one.add_node()
    honest.start(join=token)
    one.wait_ready(honest)


def test_allowing_a_new_digest_lets_that_software_join(one, tmp_path):
    """The upgrade path: an operator adds the new build's digest to the policy first."""
    from meshd.io.builddigest import measure_files
    leader = one.nodes[0]
    copy = modified_copy_of_meshd(tmp_path / "sw")
    digest = measure_files([copy / "meshd", copy / "attestation", copy / "crdt"])
    shown = leader.call("policy")
    assert digest not in sum(shown["allowed"].values(), [])
    assert shown["this_node"]["digest"] in shown["allowed"][shown["this_node"]["version"]]
    result = leader.call("policy_allow", version=shown["this_node"]["version"], digest=digest)
    assert result["serial"] == shown["serial"] + 1
    with pytest.raises(AdminError, match="sha256"):
        leader.call("policy_allow", version="1.0.0", digest="not-a-digest")
    upgraded = one.add_node()
    upgraded.cwd = str(copy)
    upgraded.start(join=one.token())
    one.wait_ready(upgraded)
    assert any(e.get("kind") == "attestation" for e in leader.call("events"))


@pytest.mark.parametrize("forgery", ["foreign root", "expired"])
def test_member_calls_with_bad_certificates_are_refused(one, tmp_path, forgery):
    """A certificate that names a real member, for that member's real key, but signed by a
    foreign root, or by the real root and expired: no member call."""
    import time as clock

    import trio
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from attestation.certs import (MEMBER_CERT_LIFETIME, VALIDITY_TOLERANCE, cert_from_pem, cert_to_pem,
                                   issue_member_cert, make_root)
    from meshd.io import peer
    from meshd.io.tls import PeerTLS

    founder = one.nodes[0]
    member = one.join()
    data = member.data_dir
    membership = json.loads((data / "membership.json").read_text())
    key = serialization.load_pem_private_key((data / "node.key").read_bytes(), password=None)
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    node_id = member.call("status")["node_id"]
    if forgery == "foreign root":
        root_key = Ed25519PrivateKey.generate()
        root_cert = make_root(root_key, membership["mesh_id"], clock.time())
        issued_at = clock.time()
    else:
        root_key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(membership["root_key"]))
        root_cert = cert_from_pem((data / "root.pem").read_text())
        # lived an hour, ended an hour past the tolerance for clocks that differ
        issued_at = clock.time() - MEMBER_CERT_LIFETIME - VALIDITY_TOLERANCE - 3600
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / "node.key").write_bytes((data / "node.key").read_bytes())
    (forged / "root.pem").write_text((data / "root.pem").read_text())
    (forged / "member.pem").write_text(cert_to_pem(issue_member_cert(
        root_key, root_cert, public, membership["mesh_id"], membership["site"], node_id, issued_at, serial=99)))
    address = founder.call("status")["address"]

    def call(cert_dir):
        async def run():
            return await peer.member_call(address, node_id=node_id, site_secret=membership["site_secret"],
                                          call={"call": "logs", "alloc": "nosuch"},
                                          context=PeerTLS(cert_dir).client_context(verify_server=False))
        try:
            trio.run(run)
        except (peer.PeerError, trio.BrokenResourceError) as e:
            return str(e)
        return "served"

    # control: the member's real certificate gets through to the call (which then fails on
    # the unknown allocation, not on authentication)
    assert "authentication" not in call(data) and "certificate" not in call(data)
    refused = call(forged)
    assert "closed the connection" in refused or "TLS" in refused or "member certificate" in refused, refused
    assert founder.call("status")["role"] == "leader"




def test_requiring_tpm_on_a_software_only_site_is_refused_unless_forced(one):
    """An operator's mistake that would wreck the site: every member (this one too) has
    software-only evidence, so requiring TPM evidence would have the site revoke them all at
    their next re-attestation. Refused with who and why; nothing changes."""
    leader = one.nodes[0]
    before = leader.call("policy")
    with pytest.raises(AdminError, match=r"not requiring TPM evidence in site lab: b-1 have software-only evidence "
                                         r"and would be revoked .* this node itself.*--force"):
        leader.call("policy_require_tpm", site="lab", required=True)
    assert leader.call("policy") == before
    with pytest.raises(AdminError, match="a node cannot revoke itself"):
        leader.call("revoke", node=leader.name, reason="", force=True)


@pytest.mark.parametrize("timeout", [10**400, 1e308, 0, -5, 86_401])
def test_a_wait_timeout_out_of_range_is_refused_before_anything_is_deployed(one, timeout):
    from meshd.io.adminclient import admin_call_sync
    leader = one.nodes[0]
    before = snapshot(leader)
    with pytest.raises(AdminError, match="timeout must be more than 0 and at most 86400 seconds"):
        admin_call_sync(leader.socket, "deploy", {"spec_toml": sleeper_app("svc", 1), "wait": True,
                                                  "timeout": timeout}, timeout=10)
    assert snapshot(leader) == before


def test_a_flood_of_idle_peer_connections_does_not_keep_a_joiner_out(one):
    """200 connections from one host that never speak: beyond the per-host bound they are
    closed at accept, before any TLS; the rest time out. A node joining meanwhile (from
    another address) gets through at once."""
    from meshd.io import peer
    node = one.nodes[0]
    host, port = node.call("status")["address"].rsplit(":", 1)
    flood = []
    for _ in range(200):
        s = socket.socket()
        s.bind(("127.0.0.2", 0))  # one attacking host, not the daemons' own 127.0.0.1
        s.settimeout(5)
        s.connect((host, int(port)))
        flood.append(s)
    time.sleep(0.5)

    def closed(s: socket.socket) -> bool:
        s.settimeout(0.01)
        try:
            return s.recv(1) == b""
        except (socket.timeout, BlockingIOError):
            return False
        except ConnectionResetError:
            return True
    still_open = [s for s in flood if not closed(s)]
    assert len(still_open) <= peer.MAX_PEER_CONNECTIONS_PER_HOST
    started = time.monotonic()
    one.join(timeout=20)  # through the peer port, while the flood holds its places
    assert time.monotonic() - started < 15
    for s in flood:
        s.close()
    assert node.call("status")["role"] == "leader"
