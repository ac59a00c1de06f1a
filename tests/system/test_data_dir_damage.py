"""A member of a real 3-node site restarted on a data dir with one file damaged at a time, every
file × every way power loss and worn SD cards damage them (cut to nothing, cut in half,
garbage, a byte flipped in the middle, deleted). Each case ends one of two ways, and only
these:

- the member holds the site's exact state again (its allocations, apps and document state
  vector equal to the leader's): damaged Raft files are set aside and the state rebuilt from
  the leader, a damaged document replica is synced again from the peers, ports.json is a
  cache;
- or, for the files that are the member's identity (its key, certificates, membership), it
  stops with one `error:` line naming the file and the way back, never a traceback, and
  nothing in the data dir made up in the damaged file's place.

No case may end with the member answering state queries from a state that is not the site's.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from crdt.updatecheck import decode_state_vector
from meshd.exitcodes import EXIT_ERROR
from meshd.io.localsite import sleeper_app, wait_for

pytestmark = pytest.mark.system

MODES = ("empty", "half", "garbage", "flip", "delete")
# The member's identity: damage to any of these stops it with the file named.
IDENTITY = ("membership.json", "node.key", "member.pem", "root.pem")
# Rebuilt from the site, or a cache (ports.json; workloads.json, read only while rebuilding).
# (mesh/log-*: the document log of the replica's epoch, crdt.epoch; the test compacts into one.)
REBUILT = ("ports.json", "workloads.json", "raft/journal", "raft/journal.meta", "raft/snapshot", "mesh/log-*", "mesh/snapshot")
# A case that ends with the state rebuilt must get there within this (the bound).
REBUILD_WITHIN = 30.0


def damage(path, mode: str) -> bool:
    """Damage `path` as `mode` says; False when there is nothing to damage that way (the
    file does not exist, and only garbage can be written where there was none)."""
    if not path.exists():
        if mode != "garbage":
            return False
        path.write_bytes(os.urandom(4096))
        return True
    data = path.read_bytes()
    if mode == "empty":
        path.write_bytes(b"")
    elif mode == "half":
        path.write_bytes(data[: len(data) // 2])
    elif mode == "garbage":
        path.write_bytes(os.urandom(max(len(data), 64)))
    elif mode == "flip":
        out = bytearray(data)
        out[len(out) // 2] ^= 0xFF
        path.write_bytes(bytes(out))
    else:
        path.unlink()
    return True


def view(node) -> tuple | None:
    """What a member says the site's state is: allocations, apps, its document's state vector."""
    allocs, apps = node.try_call("allocs"), node.try_call("apps")
    document = node.try_call("document", brief=True)
    if allocs is None or apps is None or document is None:
        return None
    return (sorted((a["alloc_id"], a["node"], a["desired"], a["state"]) for a in allocs),
            sorted((a["app"], a["version"], a["running"]) for a in apps),
            # as clocks per client: the encoding's order of clients is not the same on every replica
            decode_state_vector(bytes.fromhex(document["state_vector"])))


def test_every_file_of_a_members_data_dir_damaged_every_way(make_site):
    three = make_site()
    three.start(3)
    leader = three.leader()
    leader.call("deploy", spec_toml=sleeper_app("svc", 6), wait=True, timeout=30)
    victim = next(n for n in three.nodes if n is not leader)
    victim.call("document", compact=True)  # so that mesh/snapshot exists
    leader.call("deploy", spec_toml=sleeper_app("more", 2), wait=True, timeout=30)  # and mesh/log holds updates
    wait_for(lambda: view(victim) == view(leader), 20, what="the member in step before the cases")
    address = victim.call("status")["address"]
    victim.terminate()
    kept = victim.data_dir.parent / "kept"
    shutil.copytree(victim.data_dir, kept, ignore=shutil.ignore_patterns("*.sock", "allocs"))
    outcomes: dict[tuple[str, str], str] = {}
    for name in IDENTITY + REBUILT:
        for mode in MODES:
            shutil.rmtree(victim.data_dir)
            shutil.copytree(kept, victim.data_dir)
            path = victim.data_dir / name
            if "*" in name:
                path, = victim.data_dir.glob(name)
                assert path.stat().st_size > 0
            if not damage(path, mode):
                continue
            said_before = len(victim.log_text())
            started = time.monotonic()
            victim.start()
            if name in IDENTITY:
                wait_for(lambda: not victim.alive, 20, what=f"{victim.name} refusing to start ({name}, {mode})")
                said = victim.log_text()[said_before:]
                errors = [line for line in said.splitlines() if line.startswith("error: ")]
                assert victim.proc.returncode == EXIT_ERROR, (name, mode, said[-2000:])
                assert len(errors) == 1 and f"{path} is" in errors[0] and "meshctl node remove" in errors[0], \
                    (name, mode, errors)
                assert "Traceback" not in said, (name, mode)
                if name == "node.key":  # nothing made up in its place: the identity is not silently new
                    assert path.exists() == (mode != "delete")
                outcomes[(name, mode)] = "error"
                continue
            try:
                # Never an answer from a state that is not the site's: until it is rebuilt, refused.
                def rebuilt():
                    mine = view(victim)
                    if mine is None:
                        return False
                    theirs = view(leader)
                    return mine == theirs
                wait_for(rebuilt, REBUILD_WITHIN, what=f"{victim.name} holding the site's state ({name}, {mode})")
            except Exception:
                print(victim.log_text()[said_before:][-4000:])
                raise
            said = victim.log_text()[said_before:]
            assert "Traceback" not in said, (name, mode, said[-3000:])
            status = victim.call("status")
            assert status["address"] == address and not status.get("recovering"), (name, mode)
            aside = (victim.data_dir / "raft.damaged").exists()
            if name.startswith("raft/") and not (mode == "flip" and name == "raft/journal"):
                assert aside, (name, mode)  # (a journal's middle byte may be past its last record)
            outcomes[(name, mode)] = f"in step after {time.monotonic() - started:.1f}s" + (
                " (Raft data set aside, state rebuilt from the leader)" if aside else "")
            victim.terminate()
    for (name, mode), outcome in sorted(outcomes.items()):
        print(f"{name:20} {mode:8} {outcome}")
    assert len(outcomes) >= 45


def rewrite_one_entry(journal) -> int:
    """Give the member another history than the site's, one that every check of its files
    passes: the command of one of its journal's heartbeats replaced by another command, sealed
    with a right checksum, at the same index and term (as a bug, or a hand, could). The index."""
    from pysyncobj import pickle as raft_pickle
    from pysyncobj.journal import FileJournal

    from meshd import commands as cmds
    from meshd.io.raftdata import seal, unseal

    file = FileJournal(str(journal))
    entries = [file[i] for i in range(len(file))]
    for n, (command, idx, term) in enumerate(entries):
        if command[:1] != b"\x00":
            continue
        decoded = raft_pickle.loads(command[1:])
        wire = unseal(decoded[1][0]) if isinstance(decoded, tuple) and len(decoded) >= 2 and decoded[1] else None
        if isinstance(wire, dict) and wire.get("op") == "heartbeat":
            other = cmds.encode(cmds.CreateToken(token_id="not-the-sites", site="lab", secret="ab" * 32,
                                                 expires_at=wire["ts"] + 60), cmds.Envelope(ts=wire["ts"]))
            entries[n] = (b"\x00" + raft_pickle.dumps((decoded[0], (seal(other),))), idx, term)
            break
    else:
        raise AssertionError("no heartbeat in the journal")
    file.clear()
    for entry in entries:
        file.add(*entry)
    file._destroy()
    return idx


def test_a_member_whose_history_is_not_the_sites_is_found_by_a_checkpoint_and_rebuilt(make_site):
    from meshd.io.raftdata import check_raft_dir
    from meshd.node.leading import CHECKPOINT_PERIOD

    three = make_site()
    three.start(3)
    leader = three.leader()
    leader.call("deploy", spec_toml=sleeper_app("svc", 3), wait=True, timeout=30)
    victim = next(n for n in three.nodes if n is not leader)
    victim.terminate()
    rewrite_one_entry(victim.data_dir / "raft" / "journal")
    check_raft_dir(victim.data_dir / "raft")  # every check of its files passes
    said_before = len(victim.log_text())
    victim.start()
    wait_for(lambda: view(victim) is not None, 30, what=f"{victim.name} answering")
    forged = lambda node: any(t["token_id"] == "not-the-sites" for t in node.call("token_ls", all=True))  # noqa: E731
    # The other history takes until a checkpoint finds it; one may have already (the leader's
    # checkpoints run while the site moves, and the member's return moves it).
    assert not forged(leader)
    leader.call("deploy", spec_toml=sleeper_app("more", 1), wait=True, timeout=30)  # the site moves: a checkpoint
    said = wait_for(lambda: (lambda text: text if "is not the site's" in text else None)(
        victim.log_text()[said_before:]), 2 * CHECKPOINT_PERIOD + 10, what="the checkpoint finding it")
    assert "Traceback" not in said
    wait_for(lambda: view(victim) is not None and view(victim) == view(leader), REBUILD_WITHIN,
             what=f"{victim.name} holding the site's state again")
    assert (victim.data_dir / "raft.damaged").exists()
    assert not forged(victim)


def workload_pids(node) -> dict[str, int]:
    """alloc id -> pid of the workloads the member's daemon runs now (its child processes)."""
    import psutil

    found = {}
    for child in psutil.Process(node.proc.pid).children():
        try:
            alloc_id = child.environ().get("MESHD_ALLOC_ID")
        except psutil.Error:
            continue
        if alloc_id:
            found[alloc_id] = child.pid
    return found


def test_a_member_rebuilding_while_its_site_is_away_runs_what_it_last_ran(make_site):
    three = make_site()
    three.start(3)
    leader = three.leader()
    leader.call("deploy", spec_toml=sleeper_app("svc", 6), wait=True, timeout=30)
    victim = next(n for n in three.nodes if n is not leader)
    ran = {a["alloc_id"] for a in leader.call("allocs") if a["node"] == victim.name and a["state"] == "running"}
    assert ran
    wait_for(lambda: set(workload_pids(victim)) == ran, 10, what="its workloads running")
    others = [n for n in three.nodes if n is not victim]
    for node in others:  # the site goes away first, so nothing moves off the victim
        node.terminate()
    victim.terminate()
    damage(victim.data_dir / "raft" / "journal", "garbage")
    said_before = len(victim.log_text())
    victim.start()
    # No leader to rebuild from: it answers as recovering and runs its own record meanwhile.
    wait_for(lambda: set(workload_pids(victim)) == ran, 20, what="the last record's workloads running")
    status = victim.call("status")
    assert status.get("recovering"), status
    assert victim.try_call("allocs") is None  # no state queries from a state not the site's
    pids = workload_pids(victim)
    for node in others:
        node.start()
    try:
        wait_for(lambda: view(victim) is not None and view(victim) == view(three.leader() or victim), REBUILD_WITHIN,
                 what=f"{victim.name} holding the site's state")
    except TimeoutError:
        print("victim:", view(victim), "\nleader:", view(three.leader() or victim))
        raise
    assert not victim.call("status").get("recovering")
    # Still its allocations in the site's state: the same processes, never restarted.
    still = {a["alloc_id"] for a in victim.call("allocs") if a["node"] == victim.name and a["desired"] == "run"}
    assert still == ran
    assert {k: v for k, v in workload_pids(victim).items() if k in ran} == pids
    assert "Traceback" not in victim.log_text()[said_before:]
