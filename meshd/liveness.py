"""Liveness: the leader's heartbeat lease watcher, with flap damping.

Nodes heartbeat through Raft, which bumps NodeRecord.heartbeat_seq; the leader feeds the
replicated state to `LivenessTracker.observe` and commits the transitions it returns.

Invariants:
- Pure: no clock, no I/O; every call takes `now` (seconds, monotonic from the caller's view).
- A heartbeat is "seen" at the first observation where the seq differs from the last one
  seen, so a node is only marked down when no heartbeat was applied for more than `lease`
  seconds before that observation. Likewise a gap in heartbeats is only known from an
  observation that saw the seq stand still for more than `lease`.
- `reset` (on becoming leader) restarts every lease at `now` and forgets every partial
  recovery, so a leader change never marks anybody down, nor up, by itself.
- A down node is ready again only after heartbeating without a gap longer than `lease` for
  its hold-down time: base_hold_down doubled for each earlier down of that node within
  flap_window, capped at max_hold_down.
- Transitions that the state already reflects are never returned; left/revoked nodes are
  ignored; nodes gone from the state are forgotten. Output is sorted by node_id.
"""

from __future__ import annotations

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
    streak_start: float | None = None  # first heartbeat of the current gap-free run
    downs: list[float] = field(default_factory=list)  # when this tracker marked it down
    down_counted: bool = False  # the current down episode is already in `downs`


class LivenessTracker:
    def __init__(
        self,
        lease: float,
        base_hold_down: float = 1.0,
        max_hold_down: float = 60.0,
        flap_window: float = 300.0,
    ) -> None:
        if lease <= 0:
            raise ValueError(f"lease must be positive, got {lease}")
        if not 0 <= base_hold_down <= max_hold_down:
            raise ValueError(f"need 0 <= base_hold_down <= max_hold_down, got {base_hold_down}, {max_hold_down}")
        if flap_window < 0:
            raise ValueError(f"flap_window must not be negative, got {flap_window}")
        self.lease = lease
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

    # --- updates -------------------------------------------------------------------
    def reset(self, state: SiteState, now: float) -> None:
        """This node became leader: every watched node's lease starts fresh at `now`."""
        self._forget_absent(state)
        for node in self._watched(state):
            watch = self._watch.get(node.node_id)
            if watch is None:
                self._watch[node.node_id] = _Watch(seq=node.heartbeat_seq, last_move=now)
                continue
            watch.seq = node.heartbeat_seq
            watch.last_move = now
            watch.streak_start = None
            watch.down_counted = False

    def observe(self, state: SiteState, now: float) -> list[Transition]:
        self._forget_absent(state)
        transitions: list[Transition] = []
        for node in self._watched(state):
            watch = self._watch.get(node.node_id)
            if watch is None:  # first sight: its lease starts now
                self._watch[node.node_id] = _Watch(seq=node.heartbeat_seq, last_move=now)
                continue
            transition = self._step(node, watch, now)
            if transition is not None:
                transitions.append(transition)
        return transitions

    def _step(self, node: NodeRecord, watch: _Watch, now: float) -> Transition | None:
        moved = node.heartbeat_seq != watch.seq
        if moved:
            # A stall is only known from an observation that saw none for more than the
            # lease (below), so a caller that observes less often than the lease still
            # lets a steadily heartbeating node recover.
            if watch.streak_start is None:
                watch.streak_start = now
            watch.seq = node.heartbeat_seq
            watch.last_move = now
        stalled = now - watch.last_move > self.lease
        if stalled:
            watch.streak_start = None
        watch.downs = [t for t in watch.downs if now - t <= self.flap_window]

        if node.liveness in (LIVENESS_READY, LIVENESS_JOINING):
            if stalled:
                if not watch.down_counted:
                    watch.downs.append(now)
                    watch.down_counted = True
                return Transition(node.node_id, LIVENESS_DOWN, f"missed heartbeat lease of {self.lease:g}s")
            watch.down_counted = False
            if node.liveness == LIVENESS_JOINING and moved:
                return Transition(node.node_id, LIVENESS_READY, "first heartbeat")
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
