"""A member of a real 3-node site restarted on a data dir with one file damaged at a time
(the way power loss and worn SD cards leave them): its identity files stop it with one
`error:` line naming the file and the way back (never a traceback); a lost or garbage
ports.json is only a cache, and the member comes back on the ports the site knows it by."""

from __future__ import annotations

import shutil

import pytest

from meshd.exitcodes import EXIT_ERROR
from meshd.io.localsite import wait_for


@pytest.mark.parametrize("name, damage", [
    ("membership.json", b'{"site": "lab", "mesh_'),
    ("membership.json", b"\x00" * 300),
    ("node.key", b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI\n"),
    ("node.key", None),  # lost
    ("member.pem", b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"),
])
def test_damaged_identity_files_stop_the_member_with_the_file_named(three, name, damage):
    leader = three.leader()
    victim = next(n for n in three.nodes if n is not leader)
    victim.terminate()
    kept = victim.data_dir.parent / "kept"
    shutil.copytree(victim.data_dir, kept, ignore=shutil.ignore_patterns("*.sock", "allocs"))
    path = victim.data_dir / name
    if damage is None:
        path.unlink()
    else:
        path.write_bytes(damage)
    victim.start()
    wait_for(lambda: not victim.alive, 20, what=f"{victim.name} refusing to start")
    assert victim.proc.returncode == EXIT_ERROR
    said = victim.log_text()
    errors = [line for line in said.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"{path} is damaged" in errors[0] and "meshctl node remove" in errors[0], errors
    assert "Traceback" not in said
    if name == "node.key":  # nothing made up in its place: the identity is not silently new
        assert not path.exists() or path.read_bytes() == damage
    # put back, the member comes back
    shutil.copy2(kept / name, path)
    victim.start()
    wait_for(lambda: (victim.try_call("status") or {}).get("role") in ("follower", "leader"), 30,
             what=f"{victim.name} following again")


@pytest.mark.parametrize("damage", [None, b"{garbage"])
def test_a_lost_or_garbage_ports_record_keeps_the_ports_the_site_knows(three, damage):
    leader = three.leader()
    victim = next(n for n in three.nodes if n is not leader)
    before = victim.call("status")
    victim.terminate()
    path = victim.data_dir / "ports.json"
    if damage is None:
        path.unlink()
    else:
        path.write_bytes(damage)
    victim.start()
    after = wait_for(lambda: (lambda s: s if s and s.get("role") in ("follower", "leader") else None)(
        victim.try_call("status")), 30, what=f"{victim.name} following again")
    assert (after["address"], after["raft_address"]) == (before["address"], before["raft_address"])
    three.wait_ready(victim, 30)
    if damage is not None:
        assert "ports.json is damaged" in victim.log_text()
