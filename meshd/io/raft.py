"""The bridge between pysyncobj and the trio daemon.

pysyncobj runs its Raft loop on a thread of ours (autoTick is off, so we decide when the
thread starts: only after the replicated state exists). Commands go in through
`submit()` (any thread); their results come back on the trio loop through
`trio.lowlevel.TrioToken.run_sync_soon`.

Invariants:
- The replicated object holds plain data only (a SiteState); it is what pysyncobj pickles
  into snapshots. Callbacks, locks and the thread are set before SyncObj.__init__, which
  keeps them out of snapshots.
- The replicated method never raises (sitestate.apply returns errors as values): a raising
  method would wedge every member.
- Raft traffic is always encrypted with the site secret: without a password pysyncobj
  unpickles whatever any TCP client sends.
- Readers get a consistent copy of the state under a lock; the records in it are frozen.
- On the leader, `status.contacts` says when each voter last answered a Raft heartbeat, on
  `time.monotonic()`'s clock (pysyncobj keeps CLOCK_MONOTONIC_RAW; ages are converted). This
  is how the leader knows its voters are alive without any message of ours.
- A follower never deletes a log entry that the leader's append-entries message carries
  again with the same term (Raft's rule: only a conflicting entry goes, with those after
  it). pysyncobj deletes everything after the message's previous entry and appends the
  message's entries again, so a leader that re-sends from an earlier index (two rejections
  of one gap in flight, common under CPU load) empties the follower's log back to that
  index; when the re-send comes in several messages and the leader stalls between them, the
  follower holds fewer entries than it acknowledged, and an election in that window can
  elect a member that lacks committed, applied commands: they are lost on it, and the
  commands it commits at those indices are never applied on the members that had applied
  the lost ones (raftLastApplied never goes back). `SiteRaft._keep_matching_entries`
  rewrites each such message into the Raft form before pysyncobj reads it;
  tests/unit/test_raft_log.py provokes that election.
- A snapshot the leader sends is loaded off the Raft thread (`SiteRaft._install`): the Raft
  thread only opens it (a few ms), and keeps answering heartbeats and taking entries while
  a thread of its own unpickles and indexes the state (about a second for 100,000
  allocations here, several on a small board: long enough for the leader to count the
  member as silent). Commands committed meanwhile are queued in order and applied to the
  loaded state before it replaces the live one; readers see the state from before the
  snapshot until then, and a command's result (`submit`) comes once it is applied. While a
  load is under way no snapshot of the state is written (it would be the old state under
  the new index). A snapshot loaded at start-up is loaded on the Raft thread: nothing waits
  for this member's answers before its first tick.
- The time a voter spends loading a snapshot is not silence from the leader: its election
  timer restarts when the load is handed over, or a load longer than the election timeout
  would make it stand against a live leader.
- What this node acknowledges is on disk. pysyncobj writes its journal through an mmap it
  never syncs and its vote record (journal.meta) without an fsync, so a power cut would
  lose entries this node answered for and the vote it cast, both of which Raft's safety
  rests on. Here the journal is synced before any answer that counts its entries and, on
  the leader, after each tick (before the next tick counts its own log toward a commit);
  the vote record is written atomically (temp, fsync, rename, directory fsync).
- A command is applied with the term of the log entry that holds it, so the state machine
  refuses a leader's decision committed in a later term than it was made in
  (sitestate.apply): a paused leader's stale decisions, forwarded to the new leader once it
  resumed as a follower, change nothing.
- A full disk never kills the Raft thread nor the process: the journal's file grows by
  blocks reserved first (posix_fallocate; pysyncobj's mmap would take SIGBUS on a full
  filesystem), an entry that cannot be written leaves the in-memory log as it was, and a
  message whose entries cannot be stored gets no answer (the leader sends them again). A
  node whose disk is full (`disk_full`) leads nothing (a leader steps down, as it could
  commit nothing) and stands for no election, until a look once a second finds room again.
- Every command goes into the journal sealed with a checksum (meshd.io.raftdata.seal), so
  a damaged entry is found at start instead of replayed as another command.
- A recovering node (its Raft data was damaged and set aside, meshd.io.raftdata) starts
  with no Raft state and takes the site's from its leader. Until it has applied all the
  leader has committed, an entry of the leader's own term included, it neither votes nor stands for election (it
  no longer knows which entries it acknowledged nor whom it voted for: its vote could elect
  a member lacking committed entries, or be cast twice in a term), and `replayed` stays
  false, so nothing acts on, or answers from, its empty state.
- The leader's heartbeats to non-voters are thinned (`SiteTransport`): an append-entries
  message that carries nothing new for a non-voter (no entry, the term, commit index and
  previous entry it was last sent) goes at most once per NONVOTER_HEARTBEAT_PERIOD. Every
  message with an entry, a snapshot part or a new commit index goes at once, as do all
  messages to voters (their elections run on heartbeats). A non-voter needs the leader's
  messages only for what they carry: it never starts an election, and its liveness travels
  in beats (meshd.io.services.beats).
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import trio
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated
from pysyncobj.monotonic import monotonic as raft_clock
from pysyncobj.node import TCPNode
from pysyncobj.tcp_connection import CONNECTION_STATE
from pysyncobj import transport as pysyncobj_transport
from pysyncobj import pickle as raft_pickle
from pysyncobj.journal import FileJournal
from pysyncobj.syncobj import _RAFT_STATE
from pysyncobj.transport import TCPTransport

from meshd import sitestate
from meshd.commands import Result
from meshd.io import raftport
from meshd.io.diskspace import full_problem, is_full
from meshd.io.identity import write_atomic
from meshd.io.raftdata import MAX_TERM, RaftDataError, seal, unseal
from meshd.io.snapshots import SnapshotStore
from meshd.state import SiteState

log = logging.getLogger("meshd.raft")

FAIL_REASONS = {
    FAIL_REASON.QUEUE_FULL: "the site is overloaded (command queue full)",
    FAIL_REASON.MISSING_LEADER: "the site has no leader (no quorum reachable)",
    FAIL_REASON.DISCARDED: "the command was discarded by a leader change; retry",
    FAIL_REASON.NOT_LEADER: "the command reached a node that is no longer leader; retry",
    FAIL_REASON.LEADER_CHANGED: "the leader changed while the command was in flight; retry",
    FAIL_REASON.REQUEST_DENIED: "the leader refused the request",
}


# Wake this long after our election deadline, so the tick surely sees it passed.
ELECTION_WAKE_SLACK = 0.001
# The longest a connected non-voter goes without a message from the leader while nothing
# happens. Heartbeats to voters keep elections away (every heartbeat interval); a non-voter
# has no election to hold off, so this only bounds how stale its view of the leader's term
# (and its `meshd_raft_leader_last_contact_seconds`) can look; it learns of a new leader from
# that leader's first message, and of a lost one from its connection. Each heartbeat costs
# the leader an encrypted message and its answer per non-voter, each waking a sleeping
# process: 7 non-voters at a 0.2 s heartbeat were most of an idle leader's Raft thread, and
# still a sixth of it at one a second.
NONVOTER_HEARTBEAT_PERIOD = 3.0

# Terms: a site holds at most about one election a second (the election timeout), so even
# a member cut off for thirty years, electing itself all along, is fewer than 10**9 terms
# ahead. A message announcing more than that, or a term beyond what the state and the mesh
# document hold exactly (2**53), is garbage or an attack; it is dropped, not adopted (one
# adopted absurd term would be every member's term forever).
MAX_TERM_JUMP = 10**9
# The Raft thread's own watchdog: ticks failing (or not happening) this long end the daemon
# like a wedged trio loop (meshd.io.watchdog), instead of a node that looks alive to the
# site's liveness while its Raft never moves. The same limit holds for a voter connected to
# another voter that neither sends nor receives a Raft message (`raft_stall`): in a working
# Raft one of them speaks every election timeout (a heartbeat, an answer, a vote request).
RAFT_STALL_LIMIT = 15.0
# Ticks failing over and over log their trace once, then a count this often: a line every
# few seconds says it goes on, without a traceback per tick (20 a second).
TICK_FAILURE_LOG_EVERY = 5.0
# Two ticks further apart than this (RaftNode's `frozen_gap`: the daemon gives its lease,
# which config keeps above two heartbeat intervals, a tick's longest wait) mean the Raft
# thread was not running: the process was frozen, or starved as badly.
FROZEN_GAP = 1.0
# A node whose disk is full looks for room again this often (a statvfs: nothing).
DISK_LOOK_PERIOD = 1.0


def raft_stall(now: float, awake_since: float, ticked_at: float, traffic_at: float | None,
               limit: float) -> tuple[float, str] | None:
    """Pure: whether the Raft thread has stopped making progress, as (for how long, why).

    `ticked_at`: the last tick that went through; `traffic_at`: the last Raft message sent
    to or received from a connected voter, or the moment one connected (None while this node
    is no voter or no voter is connected: a partitioned or lone node is silent by right);
    `awake_since`: when the process last came back from being frozen (SIGSTOP, a paused VM),
    as time frozen is nobody's stall. All on one monotonic clock."""
    ticks = now - max(ticked_at, awake_since)
    if ticks > limit:
        return ticks, "its ticks keep failing or stopped"
    if traffic_at is not None:
        silent = now - max(traffic_at, awake_since)
        if silent > limit:
            return silent, "no Raft message to or from its connected voters"
    return None

# Outgoing connections too read with the bounded, linear buffer (pysyncobj's transport makes
# them from this module-level name).
pysyncobj_transport.TcpConnection = raftport.SiteTcpConnection


class SiteTransport(TCPTransport):
    """pysyncobj's TCP transport, with the leader's idle heartbeats to non-voters thinned,
    and the port held against hostile traffic (meshd.io.raftport: bounded messages, a
    listener that survives running out of descriptors, unauthenticated connections limited
    per host and in total and cut when silent).

    pysyncobj gives a non-voter (a "readonly node") a `Node` of its own for each of its
    connections, and voters a `TCPNode`; the `Node` object is the key, so a non-voter that
    reconnects is sent its next heartbeat at once."""

    def __init__(self, syncObj, selfNode, otherNodes):
        self._unauthenticated = raftport.UnauthenticatedLimits()
        # The last message sent to or received from a member, or the last connection to a
        # voter (time.monotonic()): what the Raft thread's watchdog reads (raft_stall).
        self.traffic_at = time.monotonic()
        super().__init__(syncObj, selfNode, otherNodes)
        # non-voter node -> (what its last message said, raft_clock() when it was sent)
        self._told: dict = {}

    def voter_connected(self) -> bool:
        """This node is a voter and holds a live connection to another voter."""
        if self._selfIsReadonlyNode:
            return False
        return any(conn.state == CONNECTION_STATE.CONNECTED
                   for node, conn in list(self._connections.items()) if node in self._nodes)

    def _onNodeConnected(self, node) -> None:
        self.traffic_at = time.monotonic()
        super()._onNodeConnected(node)

    def _onMessageReceived(self, node, message) -> None:
        self.traffic_at = time.monotonic()
        super()._onMessageReceived(node, message)

    def _createServer(self) -> None:
        super()._createServer()
        plain, conf = self._server, self._syncObj.conf
        self._server = raftport.SiteTcpServer(plain._TcpServer__poller, plain._TcpServer__host,
                                              plain._TcpServer__port, onNewConnection=self._onNewIncomingConnection,
                                              sendBufferSize=conf.sendBufferSize, recvBufferSize=conf.recvBufferSize,
                                              connectionTimeout=conf.connectionTimeout)

    def _onNewIncomingConnection(self, conn) -> None:
        super()._onNewIncomingConnection(conn)
        host = conn.peer_host() if isinstance(conn, raftport.SiteTcpConnection) else "?"
        if not self._unauthenticated.admit(conn, host, raft_clock()):
            conn.disconnect()

    def _onIncomingMessageReceived(self, conn, message) -> None:
        super()._onIncomingMessageReceived(conn, message)
        if conn not in self._unknownConnections:
            self._unauthenticated.settled(conn)  # a member now (or cut): no longer limited

    def _onDisconnected(self, conn) -> None:
        self._unauthenticated.settled(conn)
        super()._onDisconnected(conn)

    def _onTick(self) -> None:
        super()._onTick()
        now = raft_clock()
        for conn in self._unauthenticated.expired(now):
            if conn in self._unknownConnections:
                conn.disconnect()
        refused = self._unauthenticated.report_due(now)
        if refused:
            log.warning("raft port: unauthenticated connections refused (too many from one host, or in all)",
                        extra={"refused": refused})

    def send(self, node, message) -> bool:
        if isinstance(node, TCPNode) or not isinstance(message, dict) or message.get("type") != "append_entries":
            sent = super().send(node, message)
            if sent:
                self.traffic_at = time.monotonic()
            return sent
        said = _heartbeat_content(message)
        now = raft_clock()
        told = self._told.get(node)
        conn = self._connections.get(node)
        if (said is not None and told is not None and told[0] == said and now - told[1] < NONVOTER_HEARTBEAT_PERIOD
                and conn is not None and conn.state == CONNECTION_STATE.CONNECTED):
            return True  # nothing new for it: skipped
        sent = super().send(node, message)
        if sent:
            self._told[node] = (said, now)
        else:
            self._told.pop(node, None)
        return sent

    def dropNode(self, node) -> None:
        self._told.pop(node, None)
        super().dropNode(node)

    def _onReadonlyNodeDisconnected(self, node) -> None:
        self._told.pop(node, None)
        super()._onReadonlyNodeDisconnected(node)


def _heartbeat_content(message: dict) -> tuple | None:
    """What an append-entries message tells a follower when it carries no entry and no
    snapshot part (term, commit index, previous entry); None when it carries more."""
    if message.get("entries") or "serialized" in message or "transmission" in message or "prevLogIdx" not in message:
        return None
    return (message.get("term"), message.get("commit_index"), message["prevLogIdx"], message.get("prevLogTerm"))


class PendingResult:
    """The result of a command applied behind a snapshot that is still loading
    (SiteRaft._install): pysyncobj hands it to the command's callback at once, and `then`
    passes the real result on once the command is applied."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = False
        self._result: Result | None = None
        self._waiting: list[Callable[[Result], None]] = []

    def then(self, fn: Callable[[Result], None]) -> None:
        with self._lock:
            if not self._done:
                self._waiting.append(fn)
                return
        fn(self._result)

    def set(self, result: Result) -> None:
        with self._lock:
            self._done, self._result = True, result
            waiting, self._waiting = self._waiting, []
        for fn in waiting:
            fn(result)


@dataclass
class _Load:
    finish: Callable[[], SiteState]
    # committed behind it, in order: (command, the term and bytes of its entry, where its result goes)
    commands: list[tuple[dict, int | None, bytes, PendingResult]] = field(default_factory=list)


class CommandFailed(Exception):
    """A command did not commit (no leader, leader change, timeout). Its outcome may be unknown."""


@dataclass(frozen=True)
class RaftStatus:
    role: str  # leader | follower | candidate | nonvoter
    leader_address: str | None  # raft address of the leader this node follows
    term: int
    has_quorum: bool
    commit_index: int
    last_applied: int
    partners: tuple[str, ...]  # voters other than this node, per the Raft configuration
    # Leader only: (raft address, time.monotonic() when that voter last answered a heartbeat).
    contacts: tuple[tuple[str, float], ...] = ()
    # time.monotonic() when the Raft thread made this status (after a tick): a reader that
    # finds it old knows the Raft thread has not run since (the process was frozen).
    refreshed_at: float = 0.0
    # time.monotonic() when the Raft thread last came back from a gap between two ticks of
    # more than its frozen gap (the process frozen: SIGSTOP, a paused VM, swap), or started:
    # nothing could be heard meanwhile, so silence before it says nothing of the others.
    awake_since: float = 0.0
    # Rebuilding the site's state from the leader after its own was set aside (module header).
    recovering: bool = False
    # Its disk has no room for Raft's writes (module header).
    disk_full: bool = False
    # time.monotonic() when this node last took an append-entries message of its current term
    # (the leader's heartbeat or entries); 0.0 before any. A leader's own is when it made this.
    leader_heard_at: float = 0.0


# SiteRaft overrides these two private methods of pysyncobj (by their mangled names); a
# pysyncobj that renamed them would silently lose the guard, so fail at import instead.
assert hasattr(SyncObj, "_SyncObj__onMessageReceived") and hasattr(SyncObj, "_SyncObj__sendNextNodeIdx"), \
    "pysyncobj changed its append-entries internals: review SiteRaft._keep_matching_entries"
assert hasattr(SyncObj, "_SyncObj__generateRaftTimeout"), \
    "pysyncobj changed its election timer: review SiteRaft._install"


class SiteRaft(SyncObj):
    def __init__(self, self_address: str | None, partners: list[str], conf: SyncObjConf,
                 on_applied: Callable[[dict, dict], None], on_role_change: Callable[[], None],
                 snapshots: SnapshotStore, frozen_gap: float = FROZEN_GAP, recovering: bool = False):
        self._lock = threading.Lock()
        snapshots.state = lambda: self.site_state
        snapshots.install = self._install
        self._on_applied = on_applied
        self._on_role_change = on_role_change
        self._status_cache: RaftStatus | None = None
        self._connected_before: frozenset = frozenset()
        self._persist_commit_index = False
        # While pysyncobj handles a rewritten append-entries (_keep_matching_entries): the
        # highest next index its answer may claim, None otherwise.
        self._answer_cap: int | None = None
        self._receiving = False  # pysyncobj is handling a message from another member
        self._leader_heard_at = 0.0  # RaftStatus.leader_heard_at
        self._loads: list[_Load] = []  # snapshots being loaded off the Raft thread, oldest first
        self._loader: threading.Thread | None = None
        self._absurd_logged_at = float("-inf")
        self.frozen_gap = frozen_gap
        self.recovering = recovering  # module header; `check_recovered` ends it
        self.disk_full = False  # module header; `after_tick` looks for room again
        self._disk_checked = 0.0
        self._raft_dir = Path(conf.journalFile).parent if conf.journalFile else Path(".")
        self._journal_dirty = False
        super().__init__(self_address, partners, conf, transportClass=SiteTransport)
        if self.raftCurrentTerm > MAX_TERM:
            # A term no site reaches (see MAX_TERM): a damaged journal. Adopting it would make
            # it every member's term through this node's first vote request.
            self._doDestroy()
            raise RaftDataError(f"the Raft journal {conf.journalFile} holds term {self.raftCurrentTerm}, beyond "
                                f"any real site's ({MAX_TERM}): it is damaged")
        self._write_commit_index_only_when_it_moves()
        self._make_journal_durable()
        # The replicated state: what snapshots hold (meshd.io.snapshots), nothing else.
        self.site_state = SiteState()

    def _install(self, finish: Callable[[], SiteState]) -> None:
        """Raft thread: a snapshot was opened (at start, or sent by the leader); `finish()`
        loads its state. See the module header: off this thread unless at start-up."""
        if self._receiving:
            with self._lock:
                self._loads.append(_Load(finish))
                if self._loader is None:
                    self._loader = threading.Thread(target=self._load_deferred, name="meshd-snapshot-load",
                                                    daemon=True)
                    self._loader.start()
        else:
            state = finish()
            with self._lock:
                self.site_state = state
        # pysyncobj set the election deadline from the leader's last message before the load
        if getattr(self, "_SyncObj__selfNode", None) is not None:  # a voter (pysyncobj set up)
            self._SyncObj__raftElectionDeadline = raft_clock() + self._SyncObj__generateRaftTimeout()

    def _load_deferred(self) -> None:
        """The loader thread: each snapshot handed over in turn, loaded, the commands queued
        behind it applied, then made the live state (unless a newer snapshot came after it)."""
        while True:
            with self._lock:
                if not self._loads:
                    self._loader = None
                    return
                load = self._loads[0]
            started = time.monotonic()
            try:
                state = load.finish()
            except Exception as e:  # a damaged file (its checksum failed): as when a load on
                # the Raft thread fails, pysyncobj has already moved on; keep the state before it
                log.error("raft snapshot load failed; the state before it is kept",
                          extra={"reason": str(e) or type(e).__name__})
                with self._lock:
                    state = self.site_state.snapshot_copy()
            applied: list[tuple[dict, Result, PendingResult]] = []
            while True:
                with self._lock:
                    batch = load.commands[len(applied):]
                    if not batch:
                        self._loads.pop(0)
                        if not self._loads:
                            self.site_state = state
                        break
                for command, term, entry, pending in batch:
                    applied.append((command, sitestate.apply(state, command, term, entry), pending))
            log.info("raft snapshot loaded", extra={"allocs": len(state.allocs), "queued_commands": len(applied),
                                                    "seconds": round(time.monotonic() - started, 3)})
            for command, result, pending in applied:
                self._applied(command, result)
                pending.set(result)

    def _write_commit_index_only_when_it_moves(self) -> None:
        """pysyncobj marks its journal metadata dirty on every append-entries a follower
        receives, even when the commit index did not move, and so rewrites the file every
        second forever: pointless wear on an edge device's flash. Skip unchanged values."""
        journal = self._SyncObj__raftLog
        store, current = journal.setRaftCommitIndex, journal.getRaftCommitIndex

        def set_commit_index(index: int) -> None:
            if index != current():
                store(index)

        journal.setRaftCommitIndex = set_commit_index

    def _make_journal_durable(self) -> None:
        """See the module header: every change to the journal marks it for a sync
        (`sync_journal`); the vote record goes to disk atomically."""
        journal = self._SyncObj__raftLog
        if not isinstance(journal, FileJournal):
            return
        for name in ("clear", "deleteEntriesFrom"):
            change = getattr(journal, name)

            def changed(*args, _change=change):
                self._journal_dirty = True
                return _change(*args)

            setattr(journal, name, changed)
        add, entries = journal.add, journal._FileJournal__journal

        def add_entry(command, idx, term):
            self._journal_dirty = True
            try:
                add(command, idx, term)
            except OSError:  # pysyncobj listed it before writing it: not in the log, then
                if entries and entries[-1][1] == idx:
                    entries.pop()
                raise

        journal.add = add_entry
        file = journal._FileJournal__journalFile
        write = file.write

        def write_reserved(offset, values):
            # pysyncobj grows the file by a factor of 2 (ResizableFile.write); the blocks are
            # reserved first, so a full disk is an OSError here, not a SIGBUS later
            mapped = file._ResizableFile__mm
            if offset + len(values) > len(mapped):
                grown = max(int(len(mapped) * 2.0), offset + len(values))
                os.posix_fallocate(file._ResizableFile__f.fileno(), 0, grown)
                mapped.resize(grown)  # (mmap.size() is the file's size: pysyncobj would not grow the map)
            write(offset, values)

        file.write = write_reserved
        meta = journal._FileJournal__metaStorer
        path = Path(meta.getPath())
        meta.storeMeta = lambda record: write_atomic(path, raft_pickle.dumps(record))
        timer = journal.onOneSecondTimer

        def save_commit_index():  # pysyncobj's once-a-second save: tried again next second
            try:
                timer()
            except OSError as e:
                if not is_full(e):
                    raise
                self.disk_is_full(e)

        journal.onOneSecondTimer = save_commit_index

    def disk_is_full(self, error: OSError) -> None:
        """Raft thread: a write to the journal or the vote record failed for want of space
        (module header)."""
        if not self.disk_full:
            log.warning("raft: the data dir's disk is full; this member takes no entries, leads nothing and stands "
                        "for no election until there is room again", extra={"reason": str(error)})
        self.disk_full, self._disk_checked = True, raft_clock()
        if self._isLeader():
            self._SyncObj__setState(_RAFT_STATE.FOLLOWER)
            self._SyncObj__raftLeader = None

    def after_tick(self) -> None:
        """Raft thread, after each tick: the journal synced, recovery and room looked at."""
        self.sync_journal()  # the leader's own entries, before its next tick counts them
        self.check_recovered()
        if self.disk_full and raft_clock() - self._disk_checked >= DISK_LOOK_PERIOD:
            self._disk_checked = raft_clock()
            if full_problem(self._raft_dir) is None:
                self.disk_full = False
                log.warning("raft: the data dir's disk has room again")
        if self.disk_full and self.selfNode is not None:  # no candidacy meanwhile
            self._SyncObj__raftElectionDeadline = raft_clock() + self._SyncObj__generateRaftTimeout()

    def _checkCommandsToApply(self):
        try:
            super()._checkCommandsToApply()
        except OSError as e:  # the leader could not append: it steps down (disk_is_full)
            if not is_full(e):
                raise
            self.disk_is_full(e)

    def sync_journal(self) -> None:
        """Make what the journal took since the last sync durable (Raft thread)."""
        if self._journal_dirty:
            self._journal_dirty = False
            self._SyncObj__raftLog.flush()

    def check_recovered(self) -> None:
        """Raft thread, after a tick: end recovery once the state holds what the site had
        committed (module header). The leader's commit index says so only once it covers an
        entry of the leader's own term: a leader just elected may not yet know how far its
        predecessor committed (Raft commits older entries only through one of its term)."""
        if not self.recovering:
            return
        commit = self._SyncObj__leaderCommitIndex
        if commit is not None and self.raftLastApplied >= commit and not self._loads:
            entries = self._SyncObj__getEntries(commit, 1)
            if entries and entries[0][2] == self.raftCurrentTerm:
                self.recovering = False
                log.warning("raft state rebuilt from the site's leader", extra={"applied": self.raftLastApplied})
                return
        if self.selfNode is not None:  # no candidacy meanwhile
            self._SyncObj__raftElectionDeadline = raft_clock() + self._SyncObj__generateRaftTimeout()

    def _SyncObj__onMessageReceived(self, node, message):
        if self.recovering and isinstance(message, dict) and message.get("type") in ("request_vote", "timeout_now"):
            return  # no vote, no leadership, while recovering (module header)
        term = message.get("term") if isinstance(message, dict) else None
        if isinstance(term, int) and (term > MAX_TERM or term > self.raftCurrentTerm + MAX_TERM_JUMP):
            now = raft_clock()
            if now - self._absurd_logged_at >= 10.0:  # a flood of them: a line per 10 s
                self._absurd_logged_at = now
                log.warning("raft message with an absurd term dropped",
                            extra={"term": term, "current_term": self.raftCurrentTerm,
                                   "type": str(message.get("type"))[:32]})
            return
        if message.get("type") == "append_entries":
            message, self._answer_cap = self._keep_matching_entries(message)
        self._receiving = True  # a snapshot loaded now comes from the leader (_install)
        try:
            super()._SyncObj__onMessageReceived(node, message)
            if message.get("type") == "append_entries" and message.get("term") == self.raftCurrentTerm:
                self._leader_heard_at = time.monotonic()
        except OSError as e:  # no room for its entries or for the vote: no answer, nothing taken
            if not is_full(e):
                raise
            self.disk_is_full(e)
        finally:
            self._answer_cap = None
            self._receiving = False

    def _SyncObj__sendNextNodeIdx(self, node, reset=False, nextNodeIdx=None, success=False):
        self.sync_journal()  # the answer counts what the journal holds (module header)
        if success and self._answer_cap is not None:
            if nextNodeIdx is None:
                nextNodeIdx = self._SyncObj__getCurrentLogIndex() + 1
            nextNodeIdx = min(nextNodeIdx, self._answer_cap)
        super()._SyncObj__sendNextNodeIdx(node, reset=reset, nextNodeIdx=nextNodeIdx, success=success)

    def _keep_matching_entries(self, message: dict) -> tuple[dict, int | None]:
        """An append-entries message in the form pysyncobj handles the Raft way, and the cap
        on the next index its answer may claim (None: no cap).

        pysyncobj (syncobj.py, `__onMessageReceived`) checks the message's previous entry,
        then deletes every entry after it and appends the message's entries. Here the
        entries this log already holds with the same term are dropped from the message, so
        pysyncobj deletes only from the first conflicting entry (which, being the leader's
        conflict, was never committed) or appends only what is new. When the log holds all
        of the message's entries and more, the message is made to start at the end of the
        log (nothing to delete, nothing to append) and two things keep it truthful: the
        commit index it carries goes no further than the message's last entry (the extra
        entries are not yet known to be the leader's), and the answer claims no further than
        that entry either, so the leader counts only entries it has matched."""
        if message.get("term", -1) < self.raftCurrentTerm or "prevLogIdx" not in message:
            return message, None  # ignored by pysyncobj, or a snapshot chunk
        transmission = message.get("transmission")
        if transmission in ("start", "process"):
            return message, None  # a part of one large entry: pysyncobj only stores it
        if transmission == "finish":
            entries = [pickle.loads(self._SyncObj__recvTransmission + message["data"])]
        elif transmission is None:
            entries = list(message.get("entries", ()))
        else:
            return message, None  # pysyncobj raises on it
        log = self._SyncObj__raftLog
        first, last = log[0][1], self._SyncObj__getCurrentLogIndex()
        prev = message["prevLogIdx"]
        if not first <= prev <= last or log[prev - first][2] != message["prevLogTerm"]:
            return message, None  # pysyncobj refuses it and deletes nothing
        held = 0
        while held < len(entries) and entries[held][1] <= last and log[entries[held][1] - first][2] == entries[held][2]:
            held += 1
        rewritten = {k: v for k, v in message.items() if k not in ("transmission", "data")}
        if transmission == "finish":
            self._SyncObj__recvTransmission = ""  # what pysyncobj does with an entry it took whole
        if held < len(entries):
            rewritten["prevLogIdx"] = entries[held][1] - 1
            rewritten["prevLogTerm"] = entries[held - 1][2] if held else message["prevLogTerm"]
            rewritten["entries"] = entries[held:]
            return rewritten, None
        matched = entries[-1][1] if entries else prev
        rewritten["prevLogIdx"], rewritten["prevLogTerm"], rewritten["entries"] = last, log[last - first][2], []
        rewritten["commit_index"] = min(message["commit_index"], matched)
        return rewritten, matched + 1

    @replicated
    def apply_command(self, command):
        # what the history digest chains (SiteState.chain): the entry's command as the log holds it
        entry = command if isinstance(command, bytes) else pickle.dumps(command, protocol=4)
        command = unseal(command)  # a checksum that fails: None, which the state machine refuses
        # pysyncobj applies entry raftLastApplied + 1 (and counts it applied after this returns)
        held = self._SyncObj__getEntries(self.raftLastApplied + 1, 1)
        term = held[0][2] if held else None
        with self._lock:
            if self._loads:  # a snapshot is loading: this command follows it (module header)
                pending = PendingResult()
                self._loads[-1].commands.append((command, term, entry, pending))
                return pending
            result = sitestate.apply(self.site_state, command, term, entry)
        self._applied(command, result)
        return result

    def _applied(self, command: dict, result: Result) -> None:
        if not sitestate.is_plain_heartbeat(command):
            self._persist_commit_index = True
        try:
            self._on_applied(command, result)
        except Exception:  # the notification is best-effort; never let it reach pysyncobj
            log.exception("on_applied hook failed")

    def _SyncObj__tryLogCompaction(self):
        if self._loads:
            return  # the state is not the one the log's index says (module header)
        super()._SyncObj__tryLogCompaction()

    def snapshot(self) -> SiteState:
        """A copy of the state for the trio side to read (SiteState.reader_copy)."""
        with self._lock:
            return self.site_state.reader_copy()

    def refresh_status(self) -> None:
        """Runs on the Raft thread after each tick: copy what the trio side may read.

        Reads pysyncobj's cheap accessors only (getStatus() builds a large dict every call)."""
        leader = self._getLeader()
        if self.selfNode is None:
            role = "nonvoter"
        elif self._isLeader():
            role = "leader"
        else:
            role = "follower" if leader is not None else "candidate"
        contacts: tuple[tuple[str, float], ...] = ()
        if role == "leader":
            connected = frozenset(self._SyncObj__connectedNodes)
            if connected - self._connected_before:
                # A member just connected (a joiner, a restarted node): send it the leader's
                # heartbeat now, so it learns who leads without waiting for the next period.
                self._SyncObj__newAppendEntriesTime = 0
            self._connected_before = connected
            raft_now, now = raft_clock(), time.monotonic()
            contacts = tuple((node.address, now - (raft_now - heard))
                             for node, heard in self._SyncObj__lastResponseTime.items()
                             if getattr(node, "address", None))
        previous = self._status_cache
        refreshed_at = time.monotonic()
        awake_since = refreshed_at if previous is None or refreshed_at - previous.refreshed_at > self.frozen_gap \
            else previous.awake_since
        self._status_cache = RaftStatus(
            role=role,
            leader_address=leader.address if leader is not None else None,
            term=self.raftCurrentTerm,
            has_quorum=self.hasQuorum,
            commit_index=self.raftCommitIndex,
            last_applied=self.raftLastApplied,
            partners=tuple(sorted(n.address for n in self.otherNodes)),
            contacts=contacts,
            refreshed_at=refreshed_at,
            awake_since=awake_since,
            recovering=self.recovering,
            disk_full=self.disk_full,
            leader_heard_at=refreshed_at if role == "leader" else self._leader_heard_at,
        )
        if previous is None or previous.role != role or previous.leader_address != self._status_cache.leader_address:
            try:
                self._on_role_change()
            except Exception:  # best-effort, like on_applied
                log.exception("on_role_change hook failed")

    @property
    def status(self) -> RaftStatus:
        return self._status_cache or RaftStatus("follower", None, 0, False, 0, 0, ())


BIND_TRIES = 3


def make_conf(*, data_dir: Path, password: str, bind_address: str, min_timeout: float, max_timeout: float,
              append_period: float, snapshots: SnapshotStore) -> SyncObjConf:
    raft_dir = data_dir / "raft"
    raft_dir.mkdir(parents=True, exist_ok=True)
    return SyncObjConf(
        password=password,
        autoTick=False,
        dynamicMembershipChange=True,
        journalFile=str(raft_dir / "journal"),
        fullDumpFile=str(raft_dir / "snapshot"),
        useFork=False,  # forking a trio process is unsafe
        # Snapshots are written by a thread of ours, not on the Raft thread (meshd.io.snapshots).
        serializer=snapshots.write,
        deserializer=snapshots.read,
        serializeChecker=snapshots.check,
        raftMinTimeout=min_timeout,
        raftMaxTimeout=max_timeout,
        appendEntriesPeriod=append_period,
        # Send each entry at once instead of batching for one period: a deploy is several
        # commits in a row (submit, plan, reports), and batching would add a period to each.
        appendEntriesUseBatch=False,
        # An isolated leader must step down soon so that `status` says partitioned and no
        # stale leader takes commands that can never commit.
        leaderFallbackTimeout=max(max_timeout, 3 * append_period + 0.01),
        # pysyncobj checks this timeout only when a connection is used, against the last time
        # it read from it. Followers never talk to each other until an election, so any finite
        # value cut the follower-to-follower link at the moment a candidate asked for a vote,
        # losing the vote and costing a whole extra election (measured: leader failover
        # 0.4-3.1 s with 1.6 s). A dead peer is still noticed: a crashed process closes its
        # sockets, a rebooted host answers with a reset, and liveness comes from the Raft
        # heartbeat answers, not from this.
        connectionTimeout=float("inf"),
        # Reconnect quickly to a restarted or newly added member: a joiner binds its Raft
        # port a moment after the leader first tries it, and the default 5 s (or even 0.25 s)
        # is most of a one-second join. An attempt is one non-blocking connect per absent
        # member: cheap at this rate.
        connectionRetryTime=0.1,
        bindAddress=bind_address,
        # The start-up check found the port free, but it can still be taken before this bind;
        # pysyncobj's default retries the bind forever, spinning on the caller's thread (the
        # trio loop at start). Three tries a second apart, then SyncObjException('BindError').
        maxBindRetries=BIND_TRIES,
        commandsWaitLeader=False,  # fail fast without a leader; callers decide to retry
        logCompactionMinEntries=20_000,  # reports and plans add up; compact in big steps
        logCompactionMinTime=600,
    )


class RaftNode:
    """Owns one SiteRaft and the thread that drives it."""

    def __init__(self, self_address: str | None, partners: list[str], conf: SyncObjConf,
                 on_applied: Callable[[dict, dict], None], on_role_change: Callable[[], None], tick: float,
                 snapshots: SnapshotStore, frozen_gap: float = FROZEN_GAP, recovering: bool = False):
        self.raft = SiteRaft(self_address, partners, conf, on_applied, on_role_change, snapshots,
                             frozen_gap=max(frozen_gap, 2 * tick), recovering=recovering)
        # The commit index its journal remembers: until the state machine has applied that far
        # (the snapshot loaded, the journal replayed), its state is older than the one this
        # node had before it started (`replayed`).
        self._commit_at_start = self.raft.raftCommitIndex
        self._replayed = False
        self._tick = tick
        self._stopping = threading.Event()
        self._ticked_at = time.monotonic()  # the last tick that went through (the Raft watchdog)
        self._thread = threading.Thread(target=self._run, name="meshd-raft", daemon=True)
        self._thread.start()

    def _tick_wait(self) -> float:
        """How long the next tick may wait for network events.

        pysyncobj starts an election only from a tick. Both followers of a dead leader heard
        its last heartbeat at the same moment, so with a fixed tick they would wake in the
        same slots and start elections together (a split vote: one more election). Waking
        exactly at our own election deadline keeps the randomised timeouts apart."""
        wait = self._tick
        raft = self.raft
        if raft._isLeader() and not raft.otherNodes:
            queued = len(raft._SyncObj__commandsQueue._FastQueue__queue)
            if queued or raft._SyncObj__getCurrentLogIndex() > raft.raftCommitIndex:
                # A lone voter appends a command at the end of one tick and commits it in
                # the next; no answer from anybody will cut that tick's wait short.
                return 0.0
        if not raft._isLeader() and raft.selfNode is not None:  # a non-voter holds no elections
            until_election = raft._SyncObj__raftElectionDeadline - raft_clock()
            wait = min(wait, max(until_election, 0.0) + ELECTION_WAKE_SLACK)
        return wait

    def _run(self) -> None:
        self.raft.refresh_status()  # readers see a real status before the first tick's wait
        failed_logged_at, failed_since_log = float("-inf"), 0
        while not self._stopping.is_set():
            try:
                try:
                    self.raft.doTick(self._tick_wait())
                except OSError as e:  # no room for a vote of its own (an election it started)
                    if not is_full(e):
                        raise
                    self.raft.disk_is_full(e)
                self.raft.after_tick()
                self.raft.refresh_status()
                if self.raft._persist_commit_index:
                    # pysyncobj saves the commit index once a second; a node killed within
                    # that second would restart (offline) without its latest allocations.
                    # Save it as soon as a command that matters has been applied.
                    self.raft._persist_commit_index = False
                    self.raft._SyncObj__raftLog.onOneSecondTimer()
                self._ticked_at = time.monotonic()
                failed_logged_at, failed_since_log = float("-inf"), 0
            except Exception:
                # A damaged journal fails every tick: the trace once, then a count every
                # TICK_FAILURE_LOG_EVERY until it works again or the watchdog ends the daemon.
                failed_since_log += 1
                now = time.monotonic()
                if failed_logged_at == float("-inf"):
                    log.exception("raft tick failed")
                    failed_logged_at, failed_since_log = now, 0
                elif now - failed_logged_at >= TICK_FAILURE_LOG_EVERY:
                    log.error("raft ticks still failing", extra={"failed": failed_since_log,
                                                                 "stalled_s": round(now - self._ticked_at, 1)})
                    failed_logged_at, failed_since_log = now, 0
                self._stopping.wait(self._tick)

    def stalled_for(self, now: float, awake_since: float = float("-inf")) -> tuple[float, str] | None:
        """Whether the Raft thread has stopped making progress (raft_stall), as (for how long,
        why), at monotonic `now`; None while it works, or once stopping. `awake_since`: when
        the process last came back from being frozen (meshd.io.watchdog.StallClock)."""
        if self._stopping.is_set():
            return None
        if not self._thread.is_alive():  # it died: at once
            return max(now - self._ticked_at, RAFT_STALL_LIMIT + 1.0), "its thread died"
        transport = getattr(self.raft, "_SyncObj__transport", None)
        traffic_at = None
        if isinstance(transport, SiteTransport) and transport.voter_connected():
            traffic_at = transport.traffic_at
        return raft_stall(now, awake_since, self._ticked_at, traffic_at, RAFT_STALL_LIMIT)

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        try:
            self.raft._doDestroy()  # closes sockets and the journal; the tick thread has stopped
        except Exception:
            log.exception("raft shutdown failed")

    @property
    def status(self) -> RaftStatus:
        return self.raft.status

    @property
    def applied(self) -> int:
        """Log entries the live state has applied (SiteState.applied): a reader whose copy
        has as many needs no new one."""
        return self.raft.site_state.applied

    @property
    def replayed(self) -> bool:
        """The state has caught up with what this node's journal held when Raft started: it
        is not an old state still being replayed (after a restart of Raft). Stays true."""
        if not self._replayed and not self.raft.status.recovering \
                and self.raft.status.last_applied >= self._commit_at_start:
            self._replayed = True
        return self._replayed

    def snapshot(self) -> SiteState:
        return self.raft.snapshot()

    async def submit(self, command: dict, timeout: float = 5.0) -> dict:
        """Commit one command and return its result; raise CommandFailed if it did not commit."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        outcome: list = []

        def callback(result, error):
            if isinstance(result, PendingResult):  # applied behind a loading snapshot: not yet
                result.then(lambda applied: callback(applied, error))
                return
            outcome.append((result, error))
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        self.raft.apply_command(seal(command), callback=callback)
        with trio.move_on_after(timeout):
            await done.wait()
        if not outcome:
            raise CommandFailed(f"no commit within {timeout:g}s (the site may have lost quorum)")
        result, error = outcome[0]
        if error != FAIL_REASON.SUCCESS:
            raise CommandFailed(FAIL_REASONS.get(error, f"raft error {error}"))
        return result

    async def change_membership(self, add: str | None = None, remove: str | None = None, timeout: float = 5.0) -> None:
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        outcome: list = []

        def callback(result, error):
            outcome.append(error)
            token.run_sync_soon(done.set)

        if add:
            self.raft.addNodeToCluster(add, callback=callback)
        else:
            self.raft.removeNodeFromCluster(remove, callback=callback)
        with trio.move_on_after(timeout):
            await done.wait()
        if not outcome or outcome[0] != FAIL_REASON.SUCCESS:
            reason = FAIL_REASONS.get(outcome[0], "refused") if outcome else "timed out"
            raise CommandFailed(f"membership change failed: {reason}")
