"""What an `events --follow` stream sends next: pure, given the site's replicated events, this
daemon's local ones and `now`.

The replicated history is numbered (Event.seq, per site, never reused) and this daemon's
local events are counted as they are appended (NodeContext.local_event_count); both are
capped lists. A follower keeps a Cursor of the last of each it sent, so it keeps delivering
past any history length, and costs the new events, not the history.

Invariants:
- Every event is sent at most once, in time order within a step.
- Nothing is lost without saying so: events that were numbered (or counted) but dropped from
  the capped history before a slow follower got to them are announced by one `skipped`
  marker naming how many, before the events that follow them.
- `since` (seconds since the epoch) keeps only events newer than it, in the backlog and
  after, so a stream resumed with the last `ts` it printed repeats nothing.
- A Filter (kinds, app, node) only leaves events out: what passes comes in the same order,
  and a `skipped` marker always passes.
- Every replicated event a client gets carries its `seq`; a stream resumed with
  `after_seq` (the last `seq` it printed) gets exactly the replicated events numbered after
  it, or a `skipped` marker for those the capped history no longer holds. A number the site
  has not reached is refused (it belongs to another site's history, or a site started over).
  This daemon's local events carry no site number: on a resumed stream they are the ones
  appended from then on (and those after `since`, when given).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Sequence

from meshd.state import Event, events_after

# Events a follower without `since` gets from before it started: a screenful of context.
BACKLOG = 50
# Kinds a filter may name at once (`--kind`, repeatable): more than there are kinds.
MAX_FILTER_KINDS = 16
# A name in a filter is an app or node name: at most as long as those may be (meshd.spec).
MAX_FILTER_NAME = 64


@dataclass(frozen=True)
class Filter:
    """Which events a client wants: of these kinds (any when empty), about this app, about
    this node (an event names the node it is about, or the node that wrote it). A `skipped`
    marker always passes: a filtered stream still says that events were dropped."""

    kinds: frozenset[str] = frozenset()
    app: str | None = None
    node: str | None = None

    def matches(self, event: dict) -> bool:
        if event.get("kind") == "skipped":
            return True
        return ((not self.kinds or event.get("kind") in self.kinds)
                and (self.app is None or event.get("app") == self.app)
                and (self.node is None or event.get("node") == self.node))


def check_filter(kinds: object, app: object, node: object) -> Filter:
    """A Filter from a client's arguments; SinceError (its reason) for anything malformed."""
    if kinds is None:
        kinds = []
    if not (isinstance(kinds, list) and len(kinds) <= MAX_FILTER_KINDS
            and all(isinstance(k, str) and 0 < len(k) <= MAX_FILTER_NAME for k in kinds)):
        raise SinceError(f"--kind must name event kinds (at most {MAX_FILTER_KINDS})")
    for name, value in (("--app", app), ("--node", node)):
        if value is not None and not (isinstance(value, str) and 0 < len(value) <= MAX_FILTER_NAME):
            raise SinceError(f"{name} must be a name of at most {MAX_FILTER_NAME} characters")
    return Filter(frozenset(kinds), app, node)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Cursor:
    replicated: int  # the last replicated Event.seq sent (or seen at the start)
    local: int  # local events counted when last looked at
    since: float | None = None


class SinceError(ValueError):
    """A `since` that is not a time, with the reason the CLI shows."""


def check_since(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise SinceError(f"--since must be a time (seconds since the epoch), not {str(value)[:40]}")
    return float(value)


def check_after_seq(value: object, event_seq: int) -> int | None:
    """The replicated event number a stream resumes after, checked against the newest the
    site has numbered (`event_seq`)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SinceError(f"--after-seq must be an event number (0 or more), not {str(value)[:40]}")
    if value > event_seq:
        raise SinceError(f"no event numbered {value} on this site yet (the newest is {event_seq}): "
                         "it is from another site's history")
    return value


def plain(event: Event) -> dict:
    """A replicated event as a client gets it: with its number, to resume from."""
    out = event.to_plain()
    if event.seq:
        out["seq"] = event.seq
    return out


def backlog(history: list[dict], since: float | None) -> list[dict]:
    """The events a new follower gets first, from the merged history (oldest first)."""
    if since is None:
        return history[-BACKLOG:]
    return [e for e in history if e["ts"] > since]


def step(cursor: Cursor, events: Sequence[Event], event_seq: int, local: Sequence[dict], local_count: int,
         now: float) -> tuple[list[dict], Cursor]:
    """What to send now, and the cursor after it. `events`: the replicated history (capped,
    oldest first) numbered up to `event_seq`; `local`: the local history (capped) of
    `local_count` ever appended."""
    new = [plain(e) for e in events_after(events, cursor.replicated)]
    missed = max(0, event_seq - cursor.replicated - len(new))
    fresh = max(0, local_count - cursor.local)
    kept = min(fresh, len(local))
    new += reversed(list(itertools.islice(reversed(local), kept)))  # the newest `kept`, walked from the end
    missed += fresh - kept
    if cursor.since is not None:
        new = [e for e in new if e["ts"] > cursor.since]
    out = sorted(new, key=lambda e: e["ts"])
    if missed:
        out.insert(0, {"ts": now, "kind": "skipped", "missed": missed,
                       "message": f"{missed} events were dropped from the kept history before this stream "
                                  "could send them"})
    after = replace(cursor, replicated=max(cursor.replicated, event_seq), local=max(cursor.local, local_count))
    return out, after
