"""This node's own Raft files (raft/journal, raft/journal.meta, raft/snapshot), checked before
Raft starts on them.

pysyncobj reads them without a word of doubt: a snapshot that does not load is logged
("failed to load full dump") and the node goes on with an empty state while its journal no
longer holds what the snapshot covered, serving `apps`, `allocs` and plans from a state that
is not the site's; a journal entry that no longer unpickles fails every Raft tick; a
damaged journal.meta reads as {} (no vote cast: this node could vote twice in a term); a
journal cut short or emptied raises from deep inside pysyncobj. Here each is found at start
and named (RaftDataError): the file, what is wrong, and the way back.

What is checked:
- journal: its header, the end offset it records within the file, every record's two
  copies of its size, indices that follow one another, terms that never go down nor past
  MAX_TERM, and every command decoding as pysyncobj will decode it;
- journal.meta: when present, a mapping that unpickles;
- snapshot: it loads whole (the MARKER written before the first snapshot is no snapshot,
  and fine: the journal then holds every entry). The loaded state is kept in the
  SnapshotStore, so pysyncobj's own read at the first tick does not load it a second time.

Invariants:
- Nothing is changed on disk: a check reads only.
- A check of sound files costs one pass over them (the snapshot's load happens anyway).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from pysyncobj import pickle as raft_pickle
from pysyncobj.journal import FIRST_RECORD_OFFSET, LAST_RECORD_OFFSET_OFFSET, NAME_SIZE

from meshd.io.snapshots import MARKER, SnapshotError, SnapshotStore, load

# Terms: see meshd.io.raft (a site holds about an election a second at most; 2**53 is what the
# state and the mesh document hold exactly).
MAX_TERM = 2**53
# pysyncobj's command types (syncobj._COMMAND_TYPE): regular, no-op, membership, version.
COMMAND_TYPES = (0, 1, 2, 3)
RECORD_HEAD = struct.Struct("<IQQ")  # size, index, term
SIZE = struct.Struct("<I")
APP_NAME = b"PYSYNCOBJ"


class RaftDataError(Exception):
    """This node's own Raft data (journal, snapshot) cannot be used; the message names the file."""


def check_raft_dir(raft_dir: Path, snapshots: SnapshotStore | None = None) -> None:
    """Raise RaftDataError naming the first damaged file of `raft_dir` (absent files are
    fine: a node that never ran Raft). A sound snapshot's loaded state goes to `snapshots`."""
    journal = raft_dir / "journal"
    if journal.exists():
        problem = journal_problem(journal.read_bytes())
        if problem:
            raise RaftDataError(f"the Raft journal {journal} is damaged ({problem})")
    meta = raft_dir / "journal.meta"
    if meta.exists():
        try:
            value = raft_pickle.loads(meta.read_bytes())
        except Exception:
            value = None
        if not isinstance(value, dict):
            raise RaftDataError(f"the Raft journal's metadata {meta} is damaged (it does not read as a record "
                                "of this node's vote)")
    snapshot = raft_dir / "snapshot"
    if snapshot.exists():
        data = snapshot.read_bytes()
        if data.startswith(MARKER):
            return
        try:
            state, meta_tuple = load(data)
        except SnapshotError as e:
            raise RaftDataError(f"the Raft snapshot {snapshot} is damaged ({e})") from None
        except Exception as e:  # an old-format (gzip pickle) snapshot that does not read
            raise RaftDataError(f"the Raft snapshot {snapshot} is damaged ({type(e).__name__})") from None
        if snapshots is not None:
            stat = os.stat(snapshot)
            snapshots.checked = ((stat.st_ino, stat.st_size, stat.st_mtime_ns), state, meta_tuple)


def journal_problem(data: bytes) -> str | None:
    """What is wrong with a pysyncobj journal file's bytes, or None."""
    if len(data) < FIRST_RECORD_OFFSET:
        return f"{len(data)} bytes, shorter than its header"
    if not data[:NAME_SIZE].startswith(APP_NAME):
        return "not a pysyncobj journal (unknown header)"
    end = SIZE.unpack_from(data, LAST_RECORD_OFFSET_OFFSET)[0]
    if not FIRST_RECORD_OFFSET <= end <= len(data):
        return f"it says its records end at byte {end}, outside the file of {len(data)} bytes"
    offset, index, term = FIRST_RECORD_OFFSET, None, 0
    while offset < end:
        if offset + RECORD_HEAD.size > end:
            return f"a record cut short at byte {offset}"
        size, idx, record_term = RECORD_HEAD.unpack_from(data, offset)
        if size < 16 or offset + 4 + size + 4 > end:
            return f"a record at byte {offset} of impossible size {size}"
        if SIZE.unpack_from(data, offset + 4 + size)[0] != size:
            return f"the record at byte {offset} does not end where its size says"
        if index is not None and idx != index + 1:
            return f"entry {idx} follows entry {index}"
        if record_term < term or record_term > MAX_TERM:
            return f"entry {idx} has term {record_term} after term {term}"
        command = data[offset + 4 + 16:offset + 4 + size]
        problem = _command_problem(command)
        if problem:
            return f"entry {idx}: {problem}"
        index, term = idx, record_term
        offset += size + 8
    return None


def _command_problem(command: bytes) -> str | None:
    if not command or command[0] not in COMMAND_TYPES:
        return "an unknown kind of command"
    if command[0] == 1:  # no-op: nothing follows
        return None
    try:
        decoded = raft_pickle.loads(command[1:])
    except Exception as e:
        return f"its command does not decode ({type(e).__name__})"
    if command[0] == 2 and not (isinstance(decoded, list) and len(decoded) >= 2 and decoded[0] in ("add", "rem")
                                and isinstance(decoded[1], str)):
        return "a membership change that is none"  # pysyncobj writes ['add'|'rem', node id, node]
    if command[0] == 0 and not (isinstance(decoded, tuple) or isinstance(decoded, int)):
        return "a command that is none"  # pysyncobj writes (method id, args[, kwargs]) or a method id
    if command[0] == 3 and not isinstance(decoded, int):
        return "a code version that is none"
    return None
