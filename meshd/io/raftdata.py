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
  MAX_TERM, every command decoding as pysyncobj will decode it, and the checksum every
  command of ours carries (`seal`: pysyncobj's records have none, and a flipped byte inside
  a command that still unpickles would replay as another command, silently);
- journal.meta: a mapping of pysyncobj's three fields with their types; present whenever
  the journal holds an entry of a term above 0 (pysyncobj writes it, synchronously, when it
  takes a term, before any entry of that term: a lone founder that never held an election
  has entries of term 0 and no record yet), and absent only with the journal (its vote
  lost: this node could vote twice in a term);
- snapshot: it loads whole (the MARKER written before the first snapshot is no snapshot,
  and fine: the journal then holds every entry). The loaded state is kept in the
  SnapshotStore, so pysyncobj's own read at the first tick does not load it a second time.

Invariants:
- Nothing is changed on disk: a check reads only (`set_aside` is the one move, on request).
- A check of sound files costs one pass over them (the snapshot's load happens anyway).
"""

from __future__ import annotations

import os
import pickle
import shutil
import struct
import zlib
from pathlib import Path

from pysyncobj import pickle as raft_pickle
from pysyncobj.journal import FIRST_RECORD_OFFSET, LAST_RECORD_OFFSET_OFFSET, NAME_SIZE

from meshd.io.identity import fsync_dir
from meshd.io.snapshots import MARKER, SnapshotError, SnapshotStore, load

# Terms: see meshd.io.raft (a site holds about an election a second at most; 2**53 is what the
# state and the mesh document hold exactly).
MAX_TERM = 2**53
# pysyncobj's command types (syncobj._COMMAND_TYPE): regular, no-op, membership, version.
COMMAND_TYPES = (0, 1, 2, 3)
RECORD_HEAD = struct.Struct("<IQQ")  # size, index, term
SIZE = struct.Struct("<I")
APP_NAME = b"PYSYNCOBJ"
# A sealed command: this tag, the crc32 of the payload (4 bytes, big-endian), the payload
# (the command pickled). The tag has a version so another form can follow.
SEAL_TAG = b"MS1"
SEAL_HEAD = len(SEAL_TAG) + 4
# pysyncobj's journal.meta: what it stores, and the types it stores them as.
META_FIELDS = {"raftCommitIndex": (int,), "currentTerm": (int,), "votedForNodeId": (str, type(None))}
# Where damaged Raft files are moved (beside `raft/`), so the node starts from an empty
# state and takes the site's from its leader; one such copy is kept, the newest.
SET_ASIDE = "raft.damaged"


class RaftDataError(Exception):
    """This node's own Raft data (journal, snapshot) cannot be used; the message names the file."""


def seal(command: dict) -> bytes:
    """A command as it goes into the journal: with a checksum of its bytes."""
    payload = pickle.dumps(command, protocol=4)
    return SEAL_TAG + zlib.crc32(payload).to_bytes(4, "big") + payload


def unseal(sealed: object) -> object:
    """The command a sealed one holds. Anything else comes back as it is (a command written
    by a meshd that did not seal, or garbage the state machine refuses as not a command);
    a seal whose checksum fails comes back as None, which it refuses too."""
    if not isinstance(sealed, bytes) or not sealed.startswith(SEAL_TAG):
        return sealed
    return _unsealed(sealed)


def _unsealed(sealed: bytes) -> object:
    payload = sealed[SEAL_HEAD:]
    if len(sealed) < SEAL_HEAD or zlib.crc32(payload) != int.from_bytes(sealed[len(SEAL_TAG):SEAL_HEAD], "big"):
        return None
    try:
        return pickle.loads(payload)
    except Exception:
        return None


def set_aside(raft_dir: Path) -> Path:
    """Move damaged Raft files out of the way (replacing an older set-aside copy); the node
    then starts from no Raft state at all. Returns where they went."""
    aside = raft_dir.with_name(SET_ASIDE)
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(raft_dir, aside)
    fsync_dir(raft_dir.parent)
    return aside


def check_raft_dir(raft_dir: Path, snapshots: SnapshotStore | None = None) -> None:
    """Raise RaftDataError naming the first damaged file of `raft_dir` (absent files are
    fine: a node that never ran Raft). A sound snapshot's loaded state goes to `snapshots`."""
    journal = raft_dir / "journal"
    meta = raft_dir / "journal.meta"
    snapshot = raft_dir / "snapshot"
    last_term = 0
    if journal.exists():
        problem, last_term = journal_problem(journal.read_bytes())
        if problem:
            raise RaftDataError(f"the Raft journal {journal} is damaged ({problem})")
    elif meta.exists() or (snapshot.exists() and not snapshot.read_bytes().startswith(MARKER)):
        raise RaftDataError(f"the Raft journal {journal} is missing beside the rest of this node's Raft data")
    if meta.exists():
        problem = meta_problem(meta.read_bytes())
        if problem:
            raise RaftDataError(f"the Raft journal's metadata {meta} is damaged ({problem})")
    elif last_term > 0:
        raise RaftDataError(f"the Raft journal's metadata {meta} is missing (the record of this node's vote)")
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


def meta_problem(data: bytes) -> str | None:
    """What is wrong with a journal.meta file's bytes, or None."""
    try:
        value = raft_pickle.loads(data)
    except Exception:
        return "it does not read as a record of this node's vote"
    if not isinstance(value, dict) or not set(value) <= set(META_FIELDS):
        return "it is not a record of this node's vote"
    for name, kinds in META_FIELDS.items():
        if name in value and (not isinstance(value[name], kinds) or isinstance(value[name], bool)):
            return f"its {name} is not a {kinds[0].__name__}"
    if not 0 <= value.get("currentTerm", 0) <= MAX_TERM:
        return f"term {value['currentTerm']}"
    return None


def journal_problem(data: bytes) -> tuple[str | None, int]:
    """What is wrong with a pysyncobj journal file's bytes (or None), and the term of its
    last entry (up to the first damaged one; 0 when it holds none)."""
    if len(data) < FIRST_RECORD_OFFSET:
        return f"{len(data)} bytes, shorter than its header", 0
    if not data[:NAME_SIZE].startswith(APP_NAME):
        return "not a pysyncobj journal (unknown header)", 0
    end = SIZE.unpack_from(data, LAST_RECORD_OFFSET_OFFSET)[0]
    if not FIRST_RECORD_OFFSET <= end <= len(data):
        return f"it says its records end at byte {end}, outside the file of {len(data)} bytes", 0
    offset, index, term = FIRST_RECORD_OFFSET, None, 0
    while offset < end:
        if offset + RECORD_HEAD.size > end:
            return f"a record cut short at byte {offset}", term
        size, idx, record_term = RECORD_HEAD.unpack_from(data, offset)
        if size < 16 or offset + 4 + size + 4 > end:
            return f"a record at byte {offset} of impossible size {size}", term
        if SIZE.unpack_from(data, offset + 4 + size)[0] != size:
            return f"the record at byte {offset} does not end where its size says", term
        if index is not None and idx != index + 1:
            return f"entry {idx} follows entry {index}", term
        if record_term < term or record_term > MAX_TERM:
            return f"entry {idx} has term {record_term} after term {term}", term
        command = data[offset + 4 + 16:offset + 4 + size]
        problem = _command_problem(command)
        if problem:
            return f"entry {idx}: {problem}", term
        index, term = idx, record_term
        offset += size + 8
    return None, term


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
    if command[0] == 0 and isinstance(decoded, tuple) and len(decoded) >= 2 and isinstance(decoded[1], tuple) \
            and decoded[1] and isinstance(decoded[1][0], bytes) and decoded[1][0].startswith(SEAL_TAG) \
            and _unsealed(decoded[1][0]) is None:
        return "its command fails its checksum"
    if command[0] == 3 and not isinstance(decoded, int):
        return "a code version that is none"
    return None
