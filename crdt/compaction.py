"""What a compacted mesh document keeps, how two replicas' records merge, and when to compact.

A pycrdt Doc never forgets: every overwrite leaves its deleted item and every record stays in
the history. Compaction rebuilds the document from the records this module keeps into a fresh
Doc of a new epoch (crdt.epoch); a replica of another epoch merges by the same rules at record
level (crdt.sync, meshd.io.docsync). The rules, per kind:

- app edits (keyed by edit_id): a grow-only set, compacted. Each app's winner (crdt.document.
  resolve) is always kept, so every replica picks the same winner before and after. Every
  other edit is kept while it is younger than the retention: losers keep their conflict
  reported (`conflict` events) for that long, and superseded edits still link a late peer's
  edits to the winner's chain (without them, an edit a peer saw as the winner before it was
  cut off would look like a lost conflict). An edit older than the retention that is not its
  app's winner is dropped; one that comes back from a peer that was away is dropped again.
- a stopped app is forgotten: once its winner is a stop older than FORGET_AFTER_RETENTIONS
  retentions, every edit of the app and every status of it go. Until then the stop itself
  stands for the app's past: any older edit a peer brings back ranks below it and is dropped
  again (the edit older than the retention rule). A peer away for longer than that may bring
  back an app it still ran (its site publishes the edit it runs again); the app then shows
  as running, as it does on that site, until an operator stops it again. The same holds in
  Cassandra for tombstones past gc_grace; forgetting is what keeps a churning mesh's
  document bounded.
- app statuses, site and node summaries (keyed): only the live value is kept (history goes
  with the rebuild); between two replicas the newest `ts` wins, ties broken by the record's
  canonical text. Site and node summaries are not dropped for age: a site's summary carries
  the addresses other sites dial it at, so forgetting a quiet site would cut it off for good.
  A status goes with its forgotten app (and only then: a status is published after its edit,
  so one whose app no edit names is one a replica holds before that edit reached it).
- rollout controls (an operator's pause, resume or cancel of one edit's rollout, keyed by edit,
  site and hold/cancel): the newest `ts` wins; one goes when its edit is dropped.
- signed records (revocations, policy bundles): grow-only, never dropped; two different
  records under one key (forged or a bug): the higher (serial, ts, text).
- audit records (keyed "<site>/<seq>"): a grow-only set, dropped once older than the
  retention, oldest first per site (a prefix by seq, so what is gone is "seq <= upto_seq"),
  but never a site's newest record: a site's leader publishes its audit from the newest back
  to the first one the document holds (meshd.meshstate.audit_to_publish), and would publish
  its whole backlog again. What went is summed up per site in a DroppedAudit record (count,
  time range, upto_seq), merged by the highest upto_seq; a record at or below a site's
  upto_seq that comes back from a peer is dropped without being counted twice.

Invariants:
- Pure: no I/O, no clock (`now` is passed in), no randomness.
- `merge(a, b) == merge(b, a)`, and both equal `compact(a + b)`: merging is the union of the
  records under the rules above, then compaction; any order of merges ends with the same
  records.
- `compact` is idempotent at one `now`, and keeps every signed record and every app's winner
  but a stop older than FORGET_AFTER_RETENTIONS retentions.
- Records are taken as crdt.document returns them (validated); nothing here makes a record
  that would not pass validation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Iterable

from crdt.document import MeshDocument, resolve
from crdt.epoch import Epoch
from crdt.schema import (NAME_RE, AppEdit, AppSiteStatus, AuditRecord, DroppedAudit, Record, RolloutControl, SignedRecord,
                         winning_order)

# How long audit records and superseded or losing app edits are kept unless the operator says
# otherwise (meshd.config.DEFAULT_DOCUMENT_RETENTION repeats it with the operator's reason).
DEFAULT_RETENTION = 30 * 86400.0
# Expired records may linger this share of the retention beyond it before they alone make a
# compaction due: each compaction is a full state transfer to every peer (a few MB), so a
# 30-day retention compacts for expiry about every 3 days, not every few minutes.
EXPIRY_SLACK_SHARE = 0.1
# ... but at least this long, or the retention itself when that is shorter: an hour's slack
# keeps a retention of hours from rebuilding every few minutes, and an operator who keeps only
# minutes of history (a small board, a lab) gets a document of minutes, not of an hour more.
MIN_EXPIRY_SLACK = 3600.0
# History (update bytes taken since the epoch began) that makes a compaction due, at least
# this much and at least the size the epoch began with: the document stays within about twice
# its live size plus this, and the cost of compacting is amortised over as many bytes written
# as it rewrites. 4 MiB: a few days of a busy site's overwrites; opening it is ~0.1 s.
HISTORY_MIN_BYTES = 4 * 1024 * 1024
# A stopped app is forgotten this many retentions after its stop: one retention for its other
# edits to go (they rank below the stop, so they never come back while it stands), one more
# in which a peer away for longer than the retention still finds the stop and drops what it
# brings back instead of running it again.
FORGET_AFTER_RETENTIONS = 2
# An audit seq is the site's Raft audit counter (meshd.meshstate.audit_key): digits, bounded
# like every int of the document.
_MAX_SEQ_DIGITS = 15


@dataclass(frozen=True)
class Compaction:
    """What a compacted document holds, and what was dropped to get there."""
    records: tuple[Record, ...]  # in (root, key) order
    dropped_edits: int
    dropped_audit: int  # newly dropped (not counting records at or below a summary's upto_seq)
    summaries: dict[str, DroppedAudit] = field(default_factory=dict)  # by site, those that changed
    forgotten_apps: tuple[str, ...] = ()  # apps whose stop was old enough: every edit and status gone
    dropped_statuses: int = 0

    def by_key(self) -> dict[tuple[str, str], Record]:
        return {(r.ROOT, r.key): r for r in self.records}


def record_text(record: Record) -> str:
    """A record's canonical text: the deterministic last word between two records of one key."""
    return json.dumps(record.to_plain(), separators=(",", ":"), sort_keys=True, allow_nan=False)


def _rank(record: Record) -> tuple:
    if isinstance(record, AppEdit):
        return (*winning_order(record), record_text(record))
    if isinstance(record, SignedRecord):
        return (record.serial, record.ts, record_text(record))
    if isinstance(record, DroppedAudit):
        return (record.upto_seq, record.count, record.last_ts, record_text(record))
    return (record.ts, record_text(record))  # statuses, summaries, audit: newest wins


def newer(a: Record, b: Record) -> Record:
    """Of two records of one kind and key, the one every replica keeps."""
    if a == b:
        return a
    return a if _rank(a) >= _rank(b) else b


def union(*sides: Iterable[Record]) -> dict[tuple[str, str], Record]:
    """The records of all sides, one per (root, key), by the rules above."""
    out: dict[tuple[str, str], Record] = {}
    for side in sides:
        for record in side:
            at = (record.ROOT, record.key)
            held = out.get(at)
            out[at] = record if held is None else newer(held, record)
    return out


def audit_seq(record: AuditRecord) -> tuple[str, int] | None:
    """(site, seq) of an audit record meshd numbered ("<site>/<seq>"), else None."""
    site, _, number = record.audit_id.rpartition("/")
    if not number.isascii() or not number.isdigit() or len(number) > _MAX_SEQ_DIGITS or not NAME_RE.match(site):
        return None
    return site, int(number)


def compact(records: Iterable[Record], now: float, retention: float) -> Compaction:
    """The records a compacted document keeps at `now` (see the module header)."""
    if not (math.isfinite(now) and math.isfinite(retention) and retention >= 0):
        raise ValueError("now and retention must be finite, retention not negative")
    held = union(records)
    horizon = now - retention
    forget_horizon = now - FORGET_AFTER_RETENTIONS * retention
    kept: dict[tuple[str, str], Record] = {}
    edits: dict[str, list[AppEdit]] = {}
    statuses: list[AppSiteStatus] = []
    controls: list[RolloutControl] = []
    audit: dict[str, list[tuple[int, AuditRecord]]] = {}
    summaries: dict[str, DroppedAudit] = {}
    dropped_edits = dropped_audit = 0
    for at, record in held.items():
        if isinstance(record, AppEdit):
            edits.setdefault(record.app, []).append(record)
        elif isinstance(record, AuditRecord):
            numbered = audit_seq(record)
            if numbered is None:  # not written by meshd: kept or dropped by age alone
                if record.ts < horizon:
                    dropped_audit += 1
                else:
                    kept[at] = record
            else:
                audit.setdefault(numbered[0], []).append((numbered[1], record))
        elif isinstance(record, DroppedAudit):
            summaries[record.site] = record
        elif isinstance(record, AppSiteStatus):
            statuses.append(record)
        elif isinstance(record, RolloutControl):
            controls.append(record)
        else:
            kept[at] = record
    forgotten = []
    for app, app_edits in edits.items():
        winner = resolve(app_edits).winner
        if winner.stopped and winner.ts < forget_horizon:
            forgotten.append(app)
            dropped_edits += len(app_edits)
            continue
        for edit in app_edits:
            if edit is winner or edit.ts >= horizon:
                kept[(edit.ROOT, edit.key)] = edit
            else:
                dropped_edits += 1
    dropped_statuses = 0
    for status in statuses:
        if status.app not in forgotten:
            kept[(status.ROOT, status.key)] = status
        else:
            dropped_statuses += 1
    for control in controls:
        if (AppEdit.ROOT, control.edit_id) in kept:
            kept[(control.ROOT, control.key)] = control
    changed: dict[str, DroppedAudit] = {}
    for site, numbered in audit.items():
        summary = summaries.get(site)
        cut = summary.upto_seq if summary else -1
        live = sorted((n for n in numbered if n[0] > cut), key=lambda n: n[0])
        gone = 0
        while gone < len(live) - 1 and live[gone][1].ts < horizon:  # never the newest
            gone += 1
        for _, record in live[gone:]:
            kept[(record.ROOT, record.key)] = record
        if gone:
            dropped = [record for _, record in live[:gone]]
            first = min(r.ts for r in dropped)
            last = max(r.ts for r in dropped)
            if summary is not None:
                first, last = min(first, summary.first_ts), max(last, summary.last_ts)
            summaries[site] = changed[site] = DroppedAudit(
                site=site, upto_seq=live[gone - 1][0], count=(summary.count if summary else 0) + gone,
                first_ts=first, last_ts=last)
            dropped_audit += gone
    for summary in summaries.values():
        kept[(summary.ROOT, summary.key)] = summary
    return Compaction(tuple(kept[at] for at in sorted(kept)), dropped_edits, dropped_audit, changed,
                      tuple(sorted(forgotten)), dropped_statuses)


def merge(ours: Iterable[Record], theirs: Iterable[Record], now: float, retention: float) -> Compaction:
    """The records two replicas end with (the same whichever side computes it)."""
    return compact([*ours, *theirs], now, retention)


def changes_against(result: Compaction, held: Iterable[Record]) -> tuple[list[Record], list[tuple[str, str]]]:
    """What turns a document holding `held` into one holding `result`: (records to write,
    (root, key) entries to delete)."""
    wanted = result.by_key()
    have = {(r.ROOT, r.key): r for r in held}
    puts = [record for at, record in wanted.items() if have.get(at) != record]
    deletes = sorted(at for at in have if at not in wanted)
    return puts, deletes


def rebuild(records: Iterable[Record], *, now: float, retention: float, client_id: int,
            epoch: Epoch) -> tuple[MeshDocument, Compaction]:
    """A fresh document of `epoch` holding what compaction keeps of `records`."""
    kept = compact(records, now, retention)
    return MeshDocument.built(kept.records, client_id=client_id, epoch=epoch), kept


@dataclass(frozen=True)
class Adoption:
    document: MeshDocument  # the other epoch's document, our records merged in
    update: bytes | None  # what merging ours in wrote (for the replica we adopted from), or None
    merged: Compaction
    written: int  # records of ours written into it
    removed: int  # entries of theirs the merge dropped (audit under our higher upto_seq, expired edits)


def adopt(ours: Iterable[Record], full_update: bytes, *, epoch: Epoch, now: float, retention: float,
          client_id: int) -> Adoption:
    """Take another replica's document of `epoch` (its full update) and merge our records into
    it. Raises SyncError, having made nothing, when that document is malformed or holds junk
    (crdt.document.MeshDocument.adopted)."""
    theirs = MeshDocument.adopted(full_update, client_id=client_id, epoch=epoch)
    held = theirs.all_records()
    merged = merge(ours, held, now, retention)
    puts, deletes = changes_against(merged, held)
    update = theirs.put_many(puts, deletes) if puts or deletes else None
    return Adoption(theirs, update, merged, len(puts), len(deletes))


def expiry_slack(retention: float) -> float:
    return max(min(MIN_EXPIRY_SLACK, retention), retention * EXPIRY_SLACK_SHARE)


def oldest_expiring(records: Iterable[Record], *, retention: float) -> float | None:
    """The oldest time stamp among records that age can drop (audit records and app edits
    that are not their app's winner; a site's newest audit record aside), or None. A stopped
    winner counts as `FORGET_AFTER_RETENTIONS - 1` retentions younger than it is (it goes
    that much later)."""
    edits: dict[str, list[AppEdit]] = {}
    audit: dict[str, list[tuple[int, float]]] = {}
    times: list[float] = []
    for record in records:
        if isinstance(record, AppEdit):
            edits.setdefault(record.app, []).append(record)
        elif isinstance(record, AuditRecord):
            numbered = audit_seq(record)
            if numbered is None:
                times.append(record.ts)
            else:
                audit.setdefault(numbered[0], []).append((numbered[1], record.ts))
    later = (FORGET_AFTER_RETENTIONS - 1) * retention
    for app_edits in edits.values():
        winner = resolve(app_edits).winner
        times += [e.ts for e in app_edits if e is not winner]
        if winner.stopped:
            times.append(winner.ts + later)
    for numbered in audit.values():
        newest = max(seq for seq, _ in numbered)
        times += [ts for seq, ts in numbered if seq != newest]
    return min(times) if times else None


def compaction_due(*, now: float, retention: float, grown: int, base: int, oldest: float | None) -> str | None:
    """Why a replica should compact now, or None: `grown` update bytes taken since its epoch
    began at `base` bytes; `oldest` from `oldest_expiring`."""
    if grown >= max(HISTORY_MIN_BYTES, base):
        return f"history of {grown} bytes since the epoch began at {base} bytes"
    if oldest is not None and oldest < now - retention - expiry_slack(retention):
        return f"records older than the retention by {now - retention - oldest:.0f} s"
    return None

