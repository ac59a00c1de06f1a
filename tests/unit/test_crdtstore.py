"""meshd.io.crdtstore: the durable replica on a real disk, and a writer SIGKILLed mid-write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from crdt.compaction import rebuild
from crdt.document import MeshDocument
from crdt.log import encode_record
from crdt.schema import AuditRecord
from meshd.io.crdtstore import DocumentStore


def audit(n: int) -> AuditRecord:
    return AuditRecord(audit_id=f"a/{n}", ts=float(n), actor="ops", action="deploy", target="web", site="a")


def ids(doc: MeshDocument) -> set[str]:
    return {r.audit_id for r in doc.records(AuditRecord)}


def test_what_was_appended_is_there_after_a_reopen(tmp_path):
    store = DocumentStore(tmp_path)
    doc = store.open()
    for n in range(20):
        store.append(doc.put(audit(n)))
    store.close()
    again = DocumentStore(tmp_path)
    assert ids(again.open()) == {f"a/{n}" for n in range(20)}
    assert again.replayed == 20


def test_a_torn_last_record_is_cut_and_appends_continue_after_it(tmp_path):
    store = DocumentStore(tmp_path)
    doc = store.open()
    store.append(doc.put(audit(1)))
    store.close()
    with open(tmp_path / "log", "ab") as f:
        f.write(encode_record(MeshDocument().put(audit(2)))[:-3])  # a crash mid-append
    store = DocumentStore(tmp_path)
    doc = store.open()
    assert ids(doc) == {"a/1"}
    store.append(doc.put(audit(3)))
    store.close()
    assert ids(DocumentStore(tmp_path).open()) == {"a/1", "a/3"}


def test_compaction_folds_the_log_into_a_snapshot(tmp_path):
    store = DocumentStore(tmp_path, compact_at=2000)
    doc = store.open()
    for n in range(40):
        store.append(doc.put(audit(n)))
        if store.needs_compaction():
            store.compact(doc)
    assert (tmp_path / "snapshot").exists() and store.log_bytes < 2000
    store.close()
    assert ids(DocumentStore(tmp_path).open()) == {f"a/{n}" for n in range(40)}


def test_a_crash_between_snapshot_and_log_truncation_replays_harmlessly(tmp_path):
    store = DocumentStore(tmp_path)
    doc = store.open()
    for n in range(5):
        store.append(doc.put(audit(n)))
    log_before = (tmp_path / "log").read_bytes()
    store.compact(doc)
    store.close()
    (tmp_path / "log").write_bytes(log_before)  # as if the truncation never happened
    assert ids(DocumentStore(tmp_path).open()) == {f"a/{n}" for n in range(5)}


def test_a_corrupt_snapshot_is_set_aside_not_merged(tmp_path):
    store = DocumentStore(tmp_path)
    doc = store.open()
    store.append(doc.put(audit(1)))
    store.compact(doc)
    store.append(doc.put(audit(2)))
    store.close()
    data = bytearray((tmp_path / "snapshot").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "snapshot").write_bytes(bytes(data))
    assert ids(DocumentStore(tmp_path).open()) == {"a/2"}  # the log alone
    assert (tmp_path / "snapshot.bad").exists()


WRITER = """
import sys
from crdt.schema import AuditRecord
from meshd.io.crdtstore import DocumentStore
store = DocumentStore(sys.argv[1], compact_at=int(sys.argv[2]))
doc = store.open()
n = len(doc.records(AuditRecord))
while True:
    store.append(doc.put(AuditRecord(audit_id=f"w/{n}", ts=float(n), actor="ops", action="x" * 40,
                                     target="web", site="a")))
    print(f"ack w/{n}", flush=True)  # acknowledged only after append returned
    if store.needs_compaction():
        store.compact(doc)
    n += 1
"""


@pytest.mark.parametrize("compact_at", [10_000_000, 3000])  # without and with compactions under way
def test_a_writer_killed_mid_write_keeps_everything_it_acknowledged(tmp_path, compact_at):
    acked: set[str] = set()
    for round_ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(compact_at)],
                                stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
        time.sleep(0.3 + 0.05 * round_)  # start-up, then a few hundred writes
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        acked |= {line.split()[1] for line in out.splitlines() if line.startswith("ack ")}
        store = DocumentStore(tmp_path)
        present = ids(store.open())
        store.close()
        assert acked <= present, sorted(acked - present)[:5]
    assert len(acked) > 50  # the writer got well into its work each time


# --- rewriting the store for a new epoch -----------------------------------------------------

def new_epoch_document(doc: MeshDocument, fill: int) -> MeshDocument:
    """The document rebuilt into the next epoch (nothing dropped: a retention of centuries)."""
    rebuilt, _ = rebuild(doc.all_records(), now=1e6, retention=1e10, client_id=1000 + fill,
                         epoch=doc.epoch.successor(bytes([fill]) * 16))
    return rebuilt


@pytest.mark.parametrize("steps_done", [0, 1, 2, 3])
def test_a_crash_between_any_two_steps_of_a_rewrite_reopens_a_whole_document(tmp_path, steps_done):
    store = DocumentStore(tmp_path)
    doc = store.open()
    for n in range(30):
        store.append(doc.put(audit(n)))
    new = new_epoch_document(doc, 1)
    steps = store.rewrite_steps(new.epoch, new.full_update())
    for _ in range(steps_done):
        next(steps)  # then the process dies: nothing after this step ran
    store.close()
    again = DocumentStore(tmp_path)
    reopened = again.open()
    assert ids(reopened) == {f"a/{n}" for n in range(30)}
    expected_epoch = new.epoch if steps_done >= 1 else doc.epoch  # the new snapshot decides
    assert reopened.epoch == again.epoch == expected_epoch
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("log")) == [again.log_path.name]
    again.append(reopened.put(audit(30)))  # and it goes on from there
    again.close()
    assert ids(DocumentStore(tmp_path).open()) == {f"a/{n}" for n in range(31)}


def test_a_log_of_another_epoch_is_never_replayed_into_the_snapshots_document(tmp_path):
    store = DocumentStore(tmp_path)
    doc = store.open()
    store.append(doc.put(audit(1)))
    new = new_epoch_document(doc, 1)
    store.rewrite(new.epoch, new.full_update())
    store.close()
    (tmp_path / "log").write_bytes(encode_record(MeshDocument().put(audit(99))))  # a stray epoch-0 log
    reopened = DocumentStore(tmp_path).open()
    assert ids(reopened) == {"a/1"} and reopened.epoch == new.epoch and not (tmp_path / "log").exists()


EPOCH_WRITER = """
import os, sys
from crdt.compaction import rebuild
from crdt.schema import AuditRecord
from meshd.io.crdtstore import DocumentStore
store = DocumentStore(sys.argv[1])
doc = store.open()
n = len(doc.records(AuditRecord))
while True:
    store.append(doc.put(AuditRecord(audit_id=f"w/{n}", ts=float(n), actor="ops", action="x" * 40,
                                     target="web", site="a")))
    print(f"ack w/{n}", flush=True)  # acknowledged only after append returned
    if n % 25 == 0:  # a new epoch every 25 writes: the rewrite is often under way at the kill
        doc, _ = rebuild(doc.all_records(), now=1e6, retention=1e10, client_id=int.from_bytes(os.urandom(6), "big"),
                         epoch=doc.epoch.successor(os.urandom(16)))
        store.rewrite(doc.epoch, doc.full_update())
    n += 1
"""


def test_a_writer_killed_while_it_rewrites_epochs_keeps_everything_it_acknowledged(tmp_path):
    acked: set[str] = set()
    for round_ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", EPOCH_WRITER, str(tmp_path)],
                                stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
        time.sleep(0.4 + 0.05 * round_)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        acked |= {line.split()[1] for line in out.splitlines() if line.startswith("ack ")}
        store = DocumentStore(tmp_path)
        present = ids(store.open())
        assert store.epoch.generation >= 1 or round_ == 0
        store.close()
        assert acked <= present, sorted(acked - present)[:5]
        assert len([p for p in tmp_path.iterdir() if p.name.startswith("log")]) == 1
    assert len(acked) > 50


def test_a_lost_snapshot_keeps_the_log_of_its_epoch(tmp_path):
    store = DocumentStore(tmp_path)
    doc = store.open()
    store.append(doc.put(audit(1)))
    new = new_epoch_document(doc, 2)
    store.rewrite(new.epoch, new.full_update())
    store.append(new.put(audit(2)))
    store.close()
    (tmp_path / "snapshot").unlink()  # lost: what the epoch's log holds must not go with it
    again = DocumentStore(tmp_path)
    reopened = again.open()
    assert again.epoch == new.epoch and ids(reopened) == {"a/2"}
    assert (tmp_path / again.log_path.name).exists()
