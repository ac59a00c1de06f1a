"""meshd.io.snapshots: Raft snapshots written by a thread of ours, never half-written where
pysyncobj looks, loaded back whole; and a real pysyncobj node that compacts its log with
them and restarts from the snapshot."""

from __future__ import annotations

import gzip
import os
import pickle
import threading
import time
from pathlib import Path

import pytest
from pysyncobj.config import SERIALIZER_STATE

from meshd import sitestate
from meshd.io import snapshots
from meshd.io.ports import free_port
from meshd.io.raft import RaftNode, make_conf
from meshd.io.snapshots import MARKER, SnapshotError, SnapshotStore, dump_chunks, load
from meshd.state import Alloc, SiteState

from tests.unit.test_sitestate import APP, cmd, founded
from tests.unit.test_sitestate import node as site_node

META = ((b"entry", 7, 2), (b"entry", 6, 2), ())


def busy_state(allocs: int = 5_000) -> SiteState:
    state = founded(2)
    assert sitestate.apply(state, cmd("submit_app", spec=APP, request_id="r1")).ok
    node = next(iter(state.nodes))
    for i in range(allocs):
        state.allocs[f"a{i}"] = Alloc(alloc_id=f"a{i}", app="web", version=1, replica=i, node_id=node)
    return state


def test_a_snapshot_loads_back_as_the_same_state_with_its_dedupe_records_and_indexes():
    state = busy_state()
    data = b"".join(dump_chunks(state.snapshot_copy(), META))
    loaded, meta = load(data)
    assert meta == META
    assert loaded.allocs == state.allocs and loaded.nodes == state.nodes and loaded.apps == state.apps
    assert loaded.applied_requests == state.applied_requests and loaded.applied_order == state.applied_order
    assert loaded.applied_at == state.applied_at and len(state.applied_at) == len(state.applied_order) > 0
    assert loaded.applied == state.applied
    node = next(iter(state.nodes))
    assert loaded.allocs.live_count(node) == state.allocs.live_count(node) == 5_000
    # the retried command is still recognised after a restart from the snapshot
    assert sitestate.apply(loaded, cmd("submit_app", spec=APP, request_id="r1")) == \
        sitestate.apply(state, cmd("submit_app", spec=APP, request_id="r1"))


def test_a_snapshot_of_pysyncobjs_own_format_written_by_an_older_meshd_loads():
    state = busy_state(10)
    old = gzip.compress(pickle.dumps(({"site_state": state}, *META)))
    loaded, meta = load(old)
    assert loaded.allocs == state.allocs and meta == META


@pytest.mark.parametrize("data,reason", [
    (MARKER, "no snapshot was completed yet"),
    (b"junk" * 10, "unknown header"),
    (snapshots.MAGIC + b"\x78\x01garbage", "damaged"),
])
def test_what_is_not_a_whole_snapshot_is_refused_with_a_reason(data, reason):
    with pytest.raises(SnapshotError, match=reason):
        load(data)


def test_a_truncated_snapshot_is_refused():
    whole = b"".join(dump_chunks(busy_state(), META))
    with pytest.raises(SnapshotError):
        load(whole[: len(whole) // 2])


def test_write_leaves_the_snapshot_in_force_until_the_new_one_is_whole(tmp_path, monkeypatch):
    final = tmp_path / "snapshot"
    store = SnapshotStore()
    state = busy_state()
    store.state = lambda: state
    assert store.check() == SERIALIZER_STATE.NOT_SERIALIZING

    # First write, nothing in force: the marker is what pysyncobj renames into place.
    gate = threading.Event()
    real = snapshots.dump_chunks

    def slow(*args):
        gate.wait(5)
        yield from real(*args)

    monkeypatch.setattr(snapshots, "dump_chunks", slow)
    store.write(str(final) + ".tmp", META)
    os.replace(str(final) + ".tmp", final)  # what pysyncobj does as soon as write returns
    assert final.read_bytes() == MARKER and store.check() == SERIALIZER_STATE.SERIALIZING
    gate.set()
    wait_for_check(store, SERIALIZER_STATE.SUCCESS)
    assert store.check() == SERIALIZER_STATE.NOT_SERIALIZING  # reported once
    first = final.read_bytes()
    assert load(first)[0].allocs == state.allocs

    # A writer that fails: FAILED once, and the snapshot in force is untouched.
    def broken(*args):
        raise OSError("disk full")
        yield  # pragma: no cover

    monkeypatch.setattr(snapshots, "dump_chunks", broken)
    store.write(str(final) + ".tmp", META)
    assert os.path.samefile(str(final) + ".tmp", final)  # a link to the one in force
    os.replace(str(final) + ".tmp", final)
    wait_for_check(store, SERIALIZER_STATE.FAILED)
    assert final.read_bytes() == first and not Path(str(final) + ".part").exists()


def wait_for_check(store: SnapshotStore, wanted: int) -> None:
    deadline = time.monotonic() + 10
    while (status := store.check()) == SERIALIZER_STATE.SERIALIZING and time.monotonic() < deadline:
        time.sleep(0.01)
    assert status == wanted


def start_node(data_dir: Path, port: int) -> RaftNode:
    store = SnapshotStore()
    conf = make_conf(data_dir=data_dir, password="ab" * 32, bind_address=f"127.0.0.1:{port}", min_timeout=0.1,
                     max_timeout=0.2, append_period=0.02, snapshots=store)
    conf.logCompactionMinEntries = 50  # compact after a few commands, not 20,000
    return RaftNode(f"127.0.0.1:{port}", [], conf, lambda c, r: None, lambda: None, tick=0.02, snapshots=store)


def test_a_real_raft_node_compacts_into_a_snapshot_and_restarts_from_it(tmp_path):
    port = free_port()
    node = start_node(tmp_path, port)
    done = []
    try:
        deadline = time.monotonic() + 10
        while not node.raft._isLeader() and time.monotonic() < deadline:
            time.sleep(0.02)
        node.raft.apply_command(cmd("bootstrap", site="s1", mesh_id="m1", node=site_node(1)),
                                callback=lambda r, e: done.append(e))
        for i in range(120):
            node.raft.apply_command(cmd("create_token", token_id=f"t{i}", site="s1", secret="ab" * 32,
                                        expires_at=2e9), callback=lambda r, e: done.append(e))
        deadline = time.monotonic() + 20
        snapshot = tmp_path / "raft" / "snapshot"
        while time.monotonic() < deadline and not (len(done) == 121 and snapshot.exists()
                                                   and snapshot.read_bytes().startswith(snapshots.MAGIC)):
            time.sleep(0.05)
        assert len(done) == 121 and snapshot.read_bytes().startswith(snapshots.MAGIC)
        before = node.snapshot()
    finally:
        node.close()
    again = start_node(tmp_path, port)
    try:
        deadline = time.monotonic() + 10
        while len(again.snapshot().tokens) < 120 and time.monotonic() < deadline:
            time.sleep(0.05)
        after = again.snapshot()
        assert after.tokens == before.tokens and after.nodes == before.nodes and after.site == "s1"
    finally:
        again.close()
