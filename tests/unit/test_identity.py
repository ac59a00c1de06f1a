"""meshd.io.identity: what a data dir's identity, membership, certificates and ports read
back as when the files are damaged (truncated, garbage, flipped, missing): an error naming
the file and the way back, or (ports) the membership's record, never a traceback or an
empty stand-in."""

from __future__ import annotations

import json
import logging

import pytest

from meshd.io.identity import (DataDirError, Membership, NODE_KEY_FILE, PORTS_FILE, check_certificates,
                               load_or_create_identity, load_ports, save_ports)

MEMBER = Membership(site="lab", mesh_id="m" * 16, site_secret="ab" * 32, voter=True, peer_port=4001,
                    raft_port=4002, partners=["127.0.0.1:5002"], root_key="", secret_epoch=3)


@pytest.fixture
def data_dir(tmp_path):
    load_or_create_identity(tmp_path)
    MEMBER.save(tmp_path)
    return tmp_path


def test_a_sound_data_dir_reads_back_what_was_written(data_dir):
    first = load_or_create_identity(data_dir)
    assert load_or_create_identity(data_dir).node_id == first.node_id
    assert Membership.load(data_dir) == MEMBER


@pytest.mark.parametrize("damage", [b"", b"\x00" * 64, b"-----BEGIN PRIVATE KEY-----\ngarbage\n", "truncate"])
def test_a_damaged_node_key_is_named_with_the_way_back(data_dir, damage):
    path = data_dir / NODE_KEY_FILE
    path.write_bytes(path.read_bytes()[:40] if damage == "truncate" else damage)
    with pytest.raises(DataDirError) as caught:
        load_or_create_identity(data_dir)
    assert str(caught.value).startswith(f"{path} is damaged (")
    assert "meshctl node remove" in str(caught.value) and "join it again" in str(caught.value)


def test_a_missing_node_key_beside_a_membership_is_damage_not_a_new_node(data_dir):
    (data_dir / NODE_KEY_FILE).unlink()
    with pytest.raises(DataDirError, match="missing, while membership.json says this node is a member"):
        load_or_create_identity(data_dir)
    assert not (data_dir / NODE_KEY_FILE).exists()  # nothing was made up in its place


@pytest.mark.parametrize("content, problem", [
    (b"", "not JSON"),
    (b'{"site": "lab", "mesh_id"', "not JSON"),
    (b"\xff\xfe garbage", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (json.dumps({"site": "lab"}).encode(), "missing field 'mesh_id'"),
    (json.dumps({**MEMBER.__dict__, "voter": "yes"}).encode(), "field 'voter' is not a bool"),
    (json.dumps({**MEMBER.__dict__, "raft_port": 70000}).encode(), "field 'raft_port' is not a port"),
    (json.dumps({**MEMBER.__dict__, "partners": "x"}).encode(), "field 'partners' is not a list"),
    (json.dumps({**MEMBER.__dict__, "site_secret": ""}).encode(), "the site or its secret is empty"),
    (json.dumps({**MEMBER.__dict__, "extra": 1}).encode(), "unknown field 'extra'"),
])
def test_a_damaged_membership_is_named_with_what_is_wrong(data_dir, content, problem):
    path = Membership.path(data_dir)
    path.write_bytes(content)
    with pytest.raises(DataDirError, match=problem) as caught:
        Membership.load(data_dir)
    assert str(caught.value).startswith(f"{path} is damaged (")


ROOT_KEY = None


def issue_for(data_dir) -> None:
    """Real certificates (a root, and a member certificate for the data dir's node key)."""
    import time

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from attestation.certs import cert_to_pem, issue_member_cert, make_root
    global ROOT_KEY
    ROOT_KEY = ROOT_KEY or Ed25519PrivateKey.generate()
    root_cert = make_root(ROOT_KEY, MEMBER.mesh_id, time.time())
    identity = load_or_create_identity(data_dir)
    (data_dir / "root.pem").write_text(cert_to_pem(root_cert))
    (data_dir / "member.pem").write_text(cert_to_pem(issue_member_cert(
        ROOT_KEY, root_cert, identity.public_key, MEMBER.mesh_id, "lab", identity.node_id, time.time(), serial=3)))


def test_certificates_that_are_missing_garbage_or_not_this_nodes_are_named(data_dir, tmp_path_factory):
    issue_for(data_dir)
    check_certificates(data_dir)
    member = data_dir / "member.pem"
    good = member.read_bytes()
    member.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataDirError, match=f"{member} is damaged"):
        check_certificates(data_dir)
    other = tmp_path_factory.mktemp("other")
    load_or_create_identity(other)
    issue_for(other)
    member.write_bytes((other / "member.pem").read_bytes())  # another node's: not our key's
    with pytest.raises(DataDirError, match="not a certificate that goes with this node"):
        check_certificates(data_dir)
    (data_dir / "root.pem").unlink()
    member.write_bytes(good)
    with pytest.raises(DataDirError, match="root.pem is damaged \\(missing\\)"):
        check_certificates(data_dir)


@pytest.mark.parametrize("content", [b"", b"{", b'{"peer_port": "x", "raft_port": 2}', b"[]",
                                     b'{"peer_port": 1}'])
def test_damaged_ports_are_no_record_with_a_warning(tmp_path, caplog, content):
    (tmp_path / PORTS_FILE).write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="meshd.daemon"):
        assert load_ports(tmp_path) == {}
    assert "ports.json is damaged" in caplog.text


def test_ports_are_written_only_when_they_change(tmp_path):
    path = tmp_path / PORTS_FILE
    assert load_ports(tmp_path) == {}
    save_ports(tmp_path, 4001, 4002, load_ports(tmp_path))
    assert load_ports(tmp_path) == {"peer_port": 4001, "raft_port": 4002}
    written = path.stat().st_mtime_ns, path.stat().st_ino
    save_ports(tmp_path, 4001, 4002, load_ports(tmp_path))
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == written  # the same file, untouched
    save_ports(tmp_path, 4001, 4003, load_ports(tmp_path))
    assert load_ports(tmp_path)["raft_port"] == 4003
