"""Liveness: the leader's heartbeat lease watcher, with flap damping.

A node shows it is alive in two ways, and the leader feeds both to `LivenessTracker.observe`,
then commits the transitions it returns:
- contacts: when the leader last heard a node answer its Raft heartbeat (the append-entries
  round trip, every heartbeat interval; free, no extra message). Only Raft voters have them.
- beats: non-voters, which the leader cannot tell apart in Raft, send it a beat several
  times a lease on one long-lived connection of the peer port (no Raft commit); the leader
  counts them as contacts.
- reports: each report command a node commits bumps NodeRecord.heartbeat_seq.

Invariants:
- Pure: no clock, no I/O; every call takes `now` and contact times on one monotonic clock.
- A report is "seen" at the first observation where the seq differs from the last one seen;
  a contact counts from the time it happened. A node is only marked down when neither moved
  for more than `lease` seconds before an observation, and a gap is only known from such an
  observation.
- A joining node becomes ready on its first report (it carries the node's resources, which
  placement needs), even if that report was applied before the leader first looked; a
  contact alone keeps its lease but does not make it ready. Its lease is the join grace
  (never shorter than the lease): it is marked down only when neither moved for that long.
- `reset` (on becoming leader) restarts every lease at `now` and forgets every partial
  recovery, so a leader change never marks anybody down, nor up, by itself.
- A down node is ready again only after heartbeating without a gap longer than `lease` for
  its hold-down time: base_hold_down doubled for each earlier down of that node within
  flap_window, capped at max_hold_down.
- Transitions that the state already reflects are never returned; left/revoked nodes are
  ignored; nodes gone from the state are forgotten. Output is sorted by node_id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from meshd.state import (
    ADMIN_LEFT,
    ADMIN_REVOKED,
    LIVENESS_DOWN,
    LIVENESS_JOINING,
    LIVENESS_READY,
    NodeRecord,
    SiteState,
)

# A joining node's lease. Its first report follows its Raft connection to the leader and its
# catch-up of the log (a snapshot, on a big site), which a busy or flooded leader port can
# hold up for seconds; nothing runs on a joining node, so a longer wait only delays noticing
# a joiner that died half-way, while a down mark would hold its readiness back by a hold-down.
JOIN_GRACE = 10.0
# Nodes that are no longer members: nothing to watch.
UNWATCHED_ADMIN = frozenset({ADMIN_LEFT, ADMIN_REVOKED})


@dataclass(frozen=True)
class Transition:
    node_id: str
    to: str  # LIVENESS_DOWN | LIVENESS_READY
    reason: str


@dataclass
class _Watch:
    seq: int  # last heartbeat_seq seen
    last_move: float  # when the seq was last seen to change, or the lease was restarted
    heard: float  # the newest contact time already counted (contacts up to it are old news)
    streak_start: float | None = None  # first heartbeat of the current gap-free run
    downs: list[float] = field(default_factory=list)  # when this tracker marked it down
    down_counted: bool = False  # the current down episode is already in `downs`


def _baseline(node: NodeRecord) -> int:
    """The report seq a fresh lease starts from. A joining node has made no report until its
    seq moves off 0 (admission sets 0), so one that already reported counts at once, even
    when the leader first looks after that report (or a new leader takes over)."""
    return 0 if node.liveness == LIVENESS_JOINING else node.heartbeat_seq


class LivenessTracker:
    def __init__(
        self,
        lease: float,
        base_hold_down: float = 1.0,
        max_hold_down: float = 60.0,
        flap_window: float = 300.0,
        join_grace: float = JOIN_GRACE,
    ) -> None:
        if lease <= 0:
            raise ValueError(f"lease must be positive, got {lease}")
        if not 0 <= base_hold_down <= max_hold_down:
            raise ValueError(f"need 0 <= base_hold_down <= max_hold_down, got {base_hold_down}, {max_hold_down}")
        if flap_window < 0:
            raise ValueError(f"flap_window must not be negative, got {flap_window}")
        self.lease = lease
        self.join_grace = max(join_grace, lease)
        self.base_hold_down = base_hold_down
        self.max_hold_down = max_hold_down
        self.flap_window = flap_window
        self._watch: dict[str, _Watch] = {}

    # --- queries -------------------------------------------------------------------
    def recent_downs(self, node_id: str, now: float) -> int:
        """How many times this tracker marked the node down within flap_window before now."""
        watch = self._watch.get(node_id)
        if watch is None:
            return 0
        return sum(1 for t in watch.downs if now - t <= self.flap_window)

    def hold_down(self, node_id: str, now: float) -> float:
        """How long a down node must heartbeat steadily before it is ready again."""
        earlier = max(self.recent_downs(node_id, now) - 1, 0)  # the first down costs the base
        # 2**earlier is capped first so a long-flapping node cannot overflow the float.
        return min(self.max_hold_down, self.base_hold_down * 2 ** min(earlier, 64))

    def next_check(self, state: SiteState) -> float | None:
        """The earliest time at which observing, with no news at all, could return a
        transition (a lease running out, a hold-down ending); None when nothing is pending.

        A down node with no current run of heartbeats recovers only through news (contacts),
        which nobody announces: callers that want to see it come back must also observe
        on their own period while any node is down."""
        times = []
        for node in self._watched(state):
            watch = self._watch.get(node.node_id)
            if watch is None:
                continue
            if node.liveness in (LIVENESS_READY, LIVENESS_JOINING):
                times.append(watch.last_move + self._lease_of(node))
            elif node.liveness == LIVENESS_DOWN and watch.streak_start is not None:
                times.append(watch.streak_start + self.hold_down(node.node_id, watch.streak_start))
        return min(times) if times else None

    def _lease_of(self, node: NodeRecord) -> float:
        return self.join_grace if node.liveness == LIVENESS_JOINING else self.lease

    # --- updates -------------------------------------------------------------------
    def reset(self, state: SiteState, now: float) -> None:
        """This node became leader: every watched node's lease starts fresh at `now`."""
        self._forget_absent(state)
        for node in self._watched(state):
            watch = self._watch.get(node.node_id)
            if watch is None:
                self._watch[node.node_id] = _Watch(seq=_baseline(node), last_move=now, heard=now)
                continue
            watch.seq = _baseline(node)
            watch.last_move = now
            watch.heard = now
            watch.streak_start = None
            watch.down_counted = False

    def resumed(self, at: float) -> None:
        """The leader was frozen until `at` (it could hear nobody): no lease runs out for the
        silence before it. Nothing counts as heard, so a down node stays down."""
        for watch in self._watch.values():
            watch.last_move = max(watch.last_move, at)

    def observe(self, state: SiteState, now: float, contacts: Mapping[str, float] | None = None) -> list[Transition]:
        """`contacts`: node_id -> when the leader last heard that node (same clock as `now`)."""
        contacts = contacts or {}
        self._forget_absent(state)
        transitions: list[Transition] = []
        for node in self._watched(state):
            watch = self._watch.get(node.node_id)
            if watch is None:  # first sight: its lease starts now
                watch = self._watch[node.node_id] = _Watch(seq=_baseline(node), last_move=now, heard=now)
            transition = self._step(node, watch, now, contacts.get(node.node_id))
            if transition is not None:
                transitions.append(transition)
        return transitions

    def _step(self, node: NodeRecord, watch: _Watch, now: float, contact: float | None) -> Transition | None:
        reported = node.heartbeat_seq != watch.seq
        heard = None
        if contact is not None and contact > watch.heard:
            watch.heard = contact
            heard = min(contact, now)  # a clock mix-up must not extend a lease into the future
        moved_at = now if reported else heard
        if moved_at is not None:
            # A stall is only known from an observation that saw none for more than the
            # lease (below), so a caller that observes less often than the lease still
            # lets a steadily heartbeating node recover.
            if watch.streak_start is None:
                watch.streak_start = moved_at
            watch.seq = node.heartbeat_seq
            watch.last_move = max(watch.last_move, moved_at)
        stalled = now - watch.last_move > self._lease_of(node)
        if stalled:
            watch.streak_start = None
        watch.downs = [t for t in watch.downs if now - t <= self.flap_window]

        if node.liveness in (LIVENESS_READY, LIVENESS_JOINING):
            if stalled:
                if not watch.down_counted:
                    watch.downs.append(now)
                    watch.down_counted = True
                if node.liveness == LIVENESS_JOINING:
                    return Transition(node.node_id, LIVENESS_DOWN, f"no first report within {self.join_grace:g}s")
                return Transition(node.node_id, LIVENESS_DOWN, f"missed heartbeat lease of {self.lease:g}s")
            watch.down_counted = False
            if node.liveness == LIVENESS_JOINING and reported:
                return Transition(node.node_id, LIVENESS_READY, "first report")
            return None

        if node.liveness == LIVENESS_DOWN and watch.streak_start is not None:
            steady = now - watch.streak_start
            hold = self.hold_down(node.node_id, now)
            if steady >= hold:
                watch.down_counted = False
                downs = self.recent_downs(node.node_id, now)
                return Transition(
                    node.node_id, LIVENESS_READY,
                    f"heartbeating again for {steady:g}s (hold-down {hold:g}s, {downs} down(s)"
                    f" in the last {self.flap_window:g}s)",
                )
        return None

    # --- internals -------------------------------------------------------------------
    @staticmethod
    def _watched(state: SiteState) -> list[NodeRecord]:
        return [state.nodes[node_id] for node_id in sorted(state.nodes)
                if state.nodes[node_id].admin not in UNWATCHED_ADMIN]

    def _forget_absent(self, state: SiteState) -> None:
        for node_id in list(self._watch):
            node = state.nodes.get(node_id)
            if node is None or node.admin in UNWATCHED_ADMIN:
                del self._watch[node_id]
