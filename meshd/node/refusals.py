"""Which refused joins a member records in its site's replicated audit, so that `meshctl
audit` on any member of the mesh shows who tried, from where and why, without letting a
flood of hostile joins flood the Raft log.

A refusal that is a verdict (a bad or spent token, a revoked node, evidence that does not
verify, TPM keys unfit, a malformed request) is recorded; "ask another member" answers are
not (they are no verdict, and the member asked next decides). Failed re-attestations reach
the audit through the quarantine or revocation they lead to (meshd.node.attesting).

Invariants:
- Pure: `mono` is the monotonic clock; nothing here reads one.
- The first refusal of a source host for an action is recorded at once; further ones from
  that host within RECORD_WINDOW are counted and recorded together, once, when the window
  ends (`count` says how many, the newest reason stands for them). So one host costs the log
  at most one entry per action per window, however fast it tries.
- At most MAX_SOURCES hosts are tracked at a time; refusals from further hosts within a
  window are counted under one "other sources" entry (spoofing many addresses buys nothing).
- Nothing refused is dropped silently: every refusal is in some record's count, once its
  window is flushed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshd.commands import MAX_AUDIT_REASON, RecordRefusal, Result
from meshd.node.effects import Commit, Effect, Emit

# A minute: an operator sees a single attempt at once, and an attacker retrying all day
# costs the site 1,440 audit entries per host, not millions.
RECORD_WINDOW = 60.0
# Hosts whose counts are held apart; the rest share one entry. A site is joined by a few
# devices at a time; 256 is far beyond a legitimate burst and a few KiB of memory.
MAX_SOURCES = 256
OTHER_SOURCES = "other sources"
# How much of what the joiner claims (its name, its node id) goes into the record: enough
# to tell who it said it was, never an unbounded string from the network.
MAX_CLAIM = 63

JOIN_REFUSED = "join-refused"


def _host(source: str) -> str:
    """The host part of "ip:port" or "[v6]:port": one device retrying from new ports is one source."""
    host, sep, _port = source.rpartition(":")
    return host if sep else source


@dataclass
class _Window:
    opened_at: float
    source: str  # the latest address it came from
    target: str
    reason: str
    unrecorded: int = 0  # refusals since the last record


@dataclass
class Refusals:
    actor: str  # this member's name: who refused
    windows: dict[tuple[str, str], _Window] = field(default_factory=dict)  # (action, host) -> window

    def refused(self, target: str, source: str, reason: str, mono: float, action: str = JOIN_REFUSED) -> list[Effect]:
        """A join was refused: what to record now (nothing while its source's window is open)."""
        target, reason = _clean(target)[:MAX_CLAIM * 2] or "?", _clean(reason)[:MAX_AUDIT_REASON] or "refused"
        host = _host(source)
        key = (action, host)
        effects = self.flush_due(mono)
        window = self.windows.get(key)
        if window is None and len(self.windows) >= MAX_SOURCES:
            key, host, source = (action, OTHER_SOURCES), OTHER_SOURCES, OTHER_SOURCES
            window = self.windows.get(key)
        if window is None:
            self.windows[key] = _Window(opened_at=mono, source=source, target=target, reason=reason)
            effects.append(self._record(action, target, source, reason, 1))
            return effects
        window.source, window.target, window.reason = source, target, reason
        window.unrecorded += 1
        return effects

    def flush_due(self, mono: float) -> list[Effect]:
        """Close the windows that ended: one record for each that counted refusals."""
        effects: list[Effect] = []
        for key, window in list(self.windows.items()):
            if mono - window.opened_at >= RECORD_WINDOW:
                del self.windows[key]
                if window.unrecorded:
                    effects.append(self._record(key[0], window.target, window.source, window.reason,
                                                window.unrecorded))
        return effects

    def next_flush(self) -> float | None:
        """When (monotonic) the next window with unrecorded refusals ends, or None."""
        ends = [w.opened_at + RECORD_WINDOW for w in self.windows.values() if w.unrecorded]
        return min(ends) if ends else None

    def _record(self, action: str, target: str, source: str, reason: str, count: int) -> Commit:
        command = RecordRefusal(action=action, target=target, source=source, reason=reason, count=count,
                                actor=self.actor)
        return Commit(command, then=lambda result, _state: _after_record(command, result))


def claimed(node: object) -> str:
    """Who a joiner says it is, from its (unverified) node record: name and node id."""
    if not isinstance(node, dict):
        return "?"
    name, node_id = node.get("name"), node.get("node_id")
    name = _clean(name)[:MAX_CLAIM] if isinstance(name, str) else "?"
    return f"{name or '?'} (node {_clean(node_id)[:32]})" if isinstance(node_id, str) and node_id else name or "?"


def _clean(text: str) -> str:
    """Printable, one line: what a joiner sends is shown in tables."""
    return "".join(c if c.isprintable() else "?" for c in text)


def _after_record(command: RecordRefusal, result: Result) -> list[Effect]:
    if result.ok:
        return []
    return [Emit("membership", f"refused join of {command.target} not recorded in the audit: {result}",
                 {"code": getattr(result, "code", "")})]
