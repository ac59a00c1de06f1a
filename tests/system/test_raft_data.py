"""A member of a real 3-node site restarted on a damaged Raft journal: a byte flipped in an
entry (once its Raft thread failed every tick, forever), and a term no site reaches (once it
became the whole site's term through this node's vote requests). Each is refused at start
(meshd.io.raftdata) with one line naming the file and the way back; the site goes on."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest
from pysyncobj.journal import FIRST_RECORD_OFFSET, LAST_RECORD_OFFSET_OFFSET

from meshd.exitcodes import EXIT_ERROR
from meshd.io.localsite import wait_for
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
def test_a_member_on_a_damaged_journal_refuses_to_start_and_the_site_goes_on(three, how):
    leader = three.leader()
    victim = next(n for n in three.nodes if n is not leader)
    victim.terminate()
    journal = victim.data_dir / "raft" / "journal"
    kept = victim.data_dir.parent / "raft-kept"
    shutil.copytree(journal.parent, kept)
    damage(journal, how)
    victim.start()
    wait_for(lambda: not victim.alive, 20, what=f"{victim.name} refusing to start")
    assert victim.proc.returncode == EXIT_ERROR
    said = victim.log_text()
    errors = [line for line in said.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"the Raft journal {journal} is damaged (" in errors[0], errors
    assert ("does not decode" in errors[0] or "is none" in errors[0]) if how == "entry" else \
        f"has term {MAX_TERM * 64}" in errors[0]
    assert "meshctl node remove" in errors[0] and "Traceback" not in said
    # the site never took the damage in: its term is what it was, and it commits
    status = leader.call("status")
    assert status["role"] == "leader" and status["term"] < 100
    assert leader.call("token_create", site=None, ttl=None)["token"]
    # put back, the member comes back
    shutil.rmtree(journal.parent)
    shutil.copytree(kept, journal.parent)
    victim.start()
    three.wait_ready(victim, 30)
    wait_for(lambda: (victim.try_call("status") or {}).get("role") == "follower", 30, what="following again")
