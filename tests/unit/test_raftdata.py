"""meshd.io.raftdata: a real node's Raft files (a pysyncobj journal with real commands, a
real snapshot of a state with allocations) damaged the ways power loss and worn SD cards
damage them, each found at start and named; sound files pass, and a sound snapshot is
loaded once."""

from __future__ import annotations

import os
import struct
import time

import pytest

from meshd.io.raftdata import RaftDataError, check_raft_dir, journal_problem, seal, set_aside, unseal
from meshd.io.snapshots import MARKER, SnapshotStore, dump_chunks
from meshd.state import Alloc, SiteState

from tests.unit.test_raft import STEP_TIMEOUT, _heartbeat, _lone_voter
from tests.system.test_raft_data import records


@pytest.fixture(scope="module")
def journal_bytes(tmp_path_factory) -> bytes:
    """The journal of a real lone voter that committed ten commands, sealed as RaftNode.submit
    seals them."""
    tmp = tmp_path_factory.mktemp("raft")
    node = _lone_voter(tmp)
    try:
        deadline = time.monotonic() + STEP_TIMEOUT
        while not node.raft._isLeader():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        done: list = []
        for seq in range(10):
            node.raft.apply_command(seal(_heartbeat(seq)), callback=lambda result, error: done.append(error))
        while len(done) < 10:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        node.close()
    return (tmp / "lone" / "raft" / "journal").read_bytes()


@pytest.fixture(scope="module")
def meta_bytes(tmp_path_factory) -> bytes:
    from pysyncobj.pickle import dumps
    return dumps({"votedForNodeId": "127.0.0.1:1", "currentTerm": 3, "raftCommitIndex": 11})


def write(raft_dir, name: str, data: bytes):
    raft_dir.mkdir(parents=True, exist_ok=True)
    (raft_dir / name).write_bytes(data)
    return raft_dir / name


def test_a_sound_journal_passes(tmp_path, journal_bytes):
    write(tmp_path, "journal", journal_bytes)
    write(tmp_path, "journal.meta", b"\x80\x04}\x94.")  # {}
    assert journal_problem(journal_bytes) == (None, 1)  # its last entry's term
    check_raft_dir(tmp_path)
    check_raft_dir(tmp_path / "absent")  # a node that never ran Raft


def _flip(data: bytes, at: int, mask: int = 0xFF) -> bytes:
    out = bytearray(data)
    out[at] ^= mask
    return bytes(out)


def damaged(journal: bytes) -> list[tuple[str, bytes, str]]:
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "journal"
        path.write_bytes(journal)
        found = records(path)
    big_offset, big_size = max(found, key=lambda r: r[1])
    middle = big_offset + 4 + 16 + (big_size - 16) // 2
    last_offset = found[-1][0]
    type_byte = big_offset + 4 + 16
    return [
        ("empty", b"", "shorter than its header"),
        ("cut in half", journal[: len(journal) // 2], "cut short|impossible size|does not end|outside the file"),
        ("garbage", os.urandom(len(journal)), "unknown header"),
        ("a byte flipped in a command", _flip(journal, middle), "does not decode|is none"),
        # inside a sealed command's bytes: it still unpickles, as another command; the seal says so
        ("a letter's case flipped in a sealed command", _flip(journal, _letter_in(journal, last_offset, found[-1][1]), 0x20),
         "fails its checksum"),
        ("one bit of a command's kind", _flip(journal, type_byte, 0x02), "membership change that is none"),
        ("a record's size", _flip(journal, big_offset + 1), "impossible size|does not end|cut short"),
        ("an index", _flip(journal, last_offset + 4, 0x40), "follows entry"),
        ("an absurd term", journal[:last_offset + 12] + struct.pack("<Q", 2**60) + journal[last_offset + 20:],
         "has term 1152921504606846976"),
        ("the end offset", journal[:36] + struct.pack("<I", len(journal) + 10) + journal[40:], "outside the file"),
    ]


def _letter_in(journal: bytes, offset: int, size: int) -> int:
    """A letter in the last quarter of a record (inside its command's pickled fields): its
    case flipped, the command still unpickles (pysyncobj pickles bytes as latin-1 text)."""
    start = offset + 4 + 16 + (size - 16) * 3 // 4
    return next(i for i in range(start, offset + 4 + size) if chr(journal[i]).isalpha())


def test_each_damage_to_the_journal_is_named(tmp_path, journal_bytes, meta_bytes):
    write(tmp_path, "journal.meta", meta_bytes)
    for what, data, problem in damaged(journal_bytes):
        path = write(tmp_path, "journal", data)
        with pytest.raises(RaftDataError, match=problem) as caught:
            check_raft_dir(tmp_path)
        assert str(caught.value).startswith(f"the Raft journal {path} is damaged ("), what


def test_damaged_vote_metadata_is_named_not_read_as_no_vote(tmp_path, journal_bytes, meta_bytes):
    from pysyncobj.pickle import dumps
    write(tmp_path, "journal", journal_bytes)
    write(tmp_path, "journal.meta", meta_bytes)
    check_raft_dir(tmp_path)
    for data, problem in ((b"\x80\x04garbage", "does not read"), (dumps([1, 2]), "not a record"),
                          (dumps({"currentTerm": "3"}), "currentTerm is not a int"),
                          (dumps({"votedForNodeId": 7}), "votedForNodeId is not a str"),
                          (dumps({"currentTerm": 2**60}), "term 1152921504606846976"),
                          (dumps({"currentTerm": 1, "other": 2}), "not a record")):
        write(tmp_path, "journal.meta", data)
        with pytest.raises(RaftDataError, match=f"journal.meta is damaged .*{problem}"):
            check_raft_dir(tmp_path)


def test_a_journal_without_its_vote_record_or_a_vote_record_without_its_journal_is_damage(tmp_path, journal_bytes,
                                                                                          meta_bytes):
    write(tmp_path, "journal", journal_bytes)
    with pytest.raises(RaftDataError, match="journal.meta is missing"):
        check_raft_dir(tmp_path)
    (tmp_path / "journal").unlink()
    write(tmp_path, "journal.meta", meta_bytes)
    with pytest.raises(RaftDataError, match="journal .* is missing beside"):
        check_raft_dir(tmp_path)
    (tmp_path / "journal.meta").unlink()
    write(tmp_path, "snapshot", snapshot_bytes())
    with pytest.raises(RaftDataError, match="journal .* is missing beside"):
        check_raft_dir(tmp_path)
    write(tmp_path, "snapshot", MARKER)
    check_raft_dir(tmp_path)  # the marker alone: a node that never finished a snapshot


def test_a_sealed_command_comes_back_whole_and_a_damaged_seal_never_as_a_command():
    command = {"type": "heartbeat", "node_id": "n1", "seq": 7}
    sealed = seal(command)
    assert unseal(sealed) == command
    assert unseal(command) is command  # a journal of a meshd that did not seal
    for i in range(len(sealed)):
        flipped = _flip(sealed, i, 0x01)
        assert unseal(flipped) in (None, flipped), i  # refused, or not a seal (the tag itself)
    assert unseal(sealed[:5]) is None


def test_set_aside_moves_the_raft_dir_and_keeps_only_the_newest_copy(tmp_path):
    raft = tmp_path / "raft"
    write(raft, "journal", b"first")
    aside = set_aside(raft)
    assert aside == tmp_path / "raft.damaged" and (aside / "journal").read_bytes() == b"first" and not raft.exists()
    write(raft, "journal", b"second")
    set_aside(raft)
    assert (aside / "journal").read_bytes() == b"second" and not raft.exists()


def snapshot_bytes() -> bytes:
    state = SiteState()
    for i in range(3000):
        state.allocs[f"a{i}"] = Alloc(alloc_id=f"a{i}", app="web", version=1, replica=i, node_id="n1", state="running")
    return b"".join(dump_chunks(state, (("idx", 1), ("idx", 2), ["n"])))


def test_a_sound_snapshot_is_loaded_once_and_a_damaged_one_is_named(tmp_path, journal_bytes, meta_bytes):
    write(tmp_path, "journal", journal_bytes)
    write(tmp_path, "journal.meta", meta_bytes)
    good = snapshot_bytes()
    path = write(tmp_path, "snapshot", good)
    store = SnapshotStore()
    check_raft_dir(tmp_path, store)
    assert store.checked is not None and len(store.checked[1].allocs) == 3000
    loaded = []
    store.install = lambda finish: loaded.append(finish())
    assert store.read(str(path)) == store_meta(good)
    assert len(loaded[0].allocs) == 3000 and store.checked is None  # taken, not loaded again
    write(tmp_path, "snapshot", MARKER)
    check_raft_dir(tmp_path)  # no snapshot yet: the journal holds every entry
    for data in (good[: len(good) // 2], _flip(good, len(good) // 2), b"garbage", b"\x1f\x8bnot gzip"):
        write(tmp_path, "snapshot", data)
        with pytest.raises(RaftDataError, match=f"the Raft snapshot {path} is damaged"):
            check_raft_dir(tmp_path)


def store_meta(data: bytes) -> tuple:
    from meshd.io.snapshots import open_snapshot
    return open_snapshot(data).meta
