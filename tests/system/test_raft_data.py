"""A member of a real 3-node site restarted on a damaged Raft journal: a byte flipped in an
entry (its Raft thread fails every tick: the Raft watchdog ends the daemon, naming why, as it
would end a wedged loop, instead of a node that looks alive while it takes no part), and a
term no site reaches (refused at start with the file named; it never becomes the site's
term through this node's vote requests)."""

from __future__ import annotations

import shutil
import struct
import time
from pathlib import Path

from pysyncobj.journal import FIRST_RECORD_OFFSET, LAST_RECORD_OFFSET_OFFSET

from meshd.exitcodes import EXIT_ERROR, EXIT_SOFTWARE
from meshd.io.localsite import wait_for
from meshd.io.raft import MAX_TERM, RAFT_STALL_LIMIT


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


def test_a_member_on_a_damaged_journal_ends_itself_and_the_site_goes_on(three):
    leader = three.leader()
    a, b = [n for n in three.nodes if n is not leader]
    for victim in (a, b):
        victim.terminate()
    kept = a.data_dir.parent / "a-raft-kept"
    shutil.copytree(a.data_dir / "raft", kept)

    # An absurd term: refused at once, one error line naming the file.
    damage(a.data_dir / "raft" / "journal", "term")
    a.start()
    wait_for(lambda: not a.alive, 20, what=f"{a.name} refusing to start")
    assert a.proc.returncode == EXIT_ERROR
    said = a.log_text()
    assert f"the Raft journal {a.data_dir / 'raft' / 'journal'} holds term {MAX_TERM * 64}" in said
    assert "Traceback" not in said
    # restored, it rejoins; the site's term is what it was
    shutil.rmtree(a.data_dir / "raft")
    shutil.copytree(kept, a.data_dir / "raft")
    a.start()
    three.wait_ready(a, 30)
    assert leader.call("status")["term"] < 100

    # A damaged entry: its ticks fail; the Raft watchdog ends it, with the reason.
    damage(b.data_dir / "raft" / "journal", "entry")
    started = time.monotonic()
    b.start()
    wait_for(lambda: not b.alive, RAFT_STALL_LIMIT + 20, interval=0.2, what=f"{b.name} ended by the Raft watchdog")
    took = time.monotonic() - started
    print(f"\nended {took:.1f} s after start (limit {RAFT_STALL_LIMIT:g} s)")
    assert b.proc.returncode == EXIT_SOFTWARE
    said = b.log_text()
    assert "raft thread wedged" in said and "its ticks keep failing or stopped" in said
    assert said.count("raft tick failed") == 1  # its trace once, then a count every few seconds
    assert took >= RAFT_STALL_LIMIT
    # the others lead on: a deploy commits
    status = leader.call("status")
    assert status["role"] == "leader" and status["term"] < 100
    assert leader.call("token_create", site=None, ttl=None)["token"]
