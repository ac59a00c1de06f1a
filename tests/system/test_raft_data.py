"""A member of a real 3-node site restarted on a damaged Raft journal: a byte flipped in an
entry (once its Raft thread failed every tick, forever), and a term no site reaches (once it
became the whole site's term through this node's vote requests). Each is found at start
(meshd.io.raftdata) and named in one line; the member sets its Raft data aside and takes the
site's state from the leader, and the site never takes the damage in. A site's only voter
has nobody to take it from: it stops with the file named and the way back."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from pysyncobj.journal import FIRST_RECORD_OFFSET, LAST_RECORD_OFFSET_OFFSET

from meshd.exitcodes import EXIT_ERROR
from meshd.io.localsite import sleeper_app, wait_for
from meshd.io.raftdata import MAX_TERM


def records(journal: Path) -> list[tuple[int, int]]:
    """(offset, size) of each record of a pysyncobj journal: a size (4 bytes), the index and
    term (8 + 8), the command, the size again."""
    data = journal.read_bytes()
    end = struct.unpack_from("<I", data, LAST_RECORD_OFFSET_OFFSET)[0]
    out, offset = [], FIRST_RECORD_OFFSET
    while offset < end:
        size = struct.unpack_from("<I", data, offset)[0]
        out.append((offset, size))
        offset += size + 8
    return out


def damage(journal: Path, how: str) -> None:
    data = bytearray(journal.read_bytes())
    found = records(journal)
    if how == "entry":  # a byte in the middle of the largest command: it no longer unpickles
        offset, size = max(found, key=lambda r: r[1])
        data[offset + 4 + 16 + (size - 16) // 2] ^= 0xFF
    else:  # the term of the last entry: a valid number no site reaches
        offset, _size = found[-1]
        struct.pack_into("<Q", data, offset + 4 + 8, MAX_TERM * 64)
    journal.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["entry", "term"])
def test_a_member_on_a_damaged_journal_rebuilds_from_the_leader_and_the_site_goes_on(three, how):
    leader = three.leader()
    leader.call("deploy", spec_toml=sleeper_app("svc", 4), wait=True, timeout=30)
    victim = next(n for n in three.nodes if n is not leader)
    victim.terminate()
    journal = victim.data_dir / "raft" / "journal"
    damage(journal, how)
    damaged = journal.read_bytes()
    said_before = len(victim.log_text())
    victim.start()
    wait_for(lambda: (victim.try_call("status") or {}).get("role") == "follower"
             and not victim.try_call("status").get("recovering"), 30, what=f"{victim.name} rebuilt and following")
    said = victim.log_text()[said_before:]
    warnings = [line for line in said.splitlines() if f"the Raft journal {journal}" in line and '"warning"' in line]
    assert len(warnings) == 1 and "rebuilds the site's state" in warnings[0], warnings
    assert ("does not decode" in warnings[0] or "is none" in warnings[0]) if how == "entry" else \
        f"has term {MAX_TERM * 64}" in warnings[0]
    assert "Traceback" not in said
    assert (victim.data_dir / "raft.damaged" / "journal").read_bytes() == damaged  # kept for a look, not used
    # the site never took the damage in: its term is what it was, and it commits
    status = leader.call("status")
    assert status["role"] == "leader" and status["term"] < 100
    assert leader.call("token_create", site=None, ttl=None)["token"]
    wait_for(lambda: sorted(a["alloc_id"] for a in victim.call("allocs")) ==
             sorted(a["alloc_id"] for a in leader.call("allocs")) != [], 20, what="the site's allocations")
    three.wait_ready(victim, 30)


def test_a_sites_only_voter_on_a_damaged_journal_stops_with_the_file_named(make_site):
    site = make_site()
    site.start(1)
    (only,) = site.nodes
    only.terminate()
    journal = only.data_dir / "raft" / "journal"
    damage(journal, "term")
    only.start()
    wait_for(lambda: not only.alive, 20, what=f"{only.name} refusing to start")
    assert only.proc.returncode == EXIT_ERROR
    said = only.log_text()
    errors = [line for line in said.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"the Raft journal {journal} is damaged (" in errors[0], errors
    assert "only voter" in errors[0] and "meshctl node remove" in errors[0] and "Traceback" not in said
    assert journal.exists() and not (only.data_dir / "raft.damaged").exists()  # nothing moved: its only copy
