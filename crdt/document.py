"""The mesh document: one pycrdt Doc per replica, one map per record kind, typed reads and
validated writes, delta sync, and the deterministic choice of each app's winning edit.

Layout: a root map per kind (crdt.schema.ROOTS), keyed by the record's own key; each value is
the record's compact JSON text. One string per record, not a map of its fields: a record is
then one item to encode, check, apply and observe (a 10,000-change catch-up takes half the
time), and numbers keep their type (pycrdt stores every int of a map as a float). App edits
are never overwritten (each has its own key), so pycrdt's rule for concurrent writes to one
key (the higher client id wins) never decides an app; the rule below does, the same everywhere.

Invariants:
- Every local write validates first (crdt.schema) and changes nothing when it is refused; a
  write returns the update it made (the minimal delta: that transaction's own structs and
  deletions, however many overwrites the document holds), for the durable log and peers.
- A remote update is first walked by crdt.updatecheck (pycrdt reserves memory for whatever
  counts an update declares: 4 bytes can cost it 500 MB); one that fails is refused whole.
- Remote updates are applied as they come (a CRDT cannot refuse half of one); what they hold
  is validated when read: an entry that is not a well-formed record of its kind, or sits under
  a key that is not its own, is left out of every answer and listed by `invalid()` with its
  reason. So a malformed or hostile update can add junk, never a record that is not one.
- The winner of an app is a pure function of the set of its edits: the edit with the highest
  (version, ts, edit_id). Every replica that has the same edits picks the same winner, in any
  order of arrival. Edits not on the winner's chain of `base` links lost a conflict, and
  every replica names the same losers.
- A document belongs to one epoch (crdt.epoch; `epoch`, not part of the Doc's content): a
  compaction builds a fresh one of the next epoch from records only (`built`), and a replica
  takes another's epoch only as that replica's whole document, refused whole when it holds
  anything that is not a well-formed record under its own key (`adopted`).
- Pure: no I/O, no clock (callers pass `ts`), no randomness (callers pass ids).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable

from pycrdt import Doc, Map

from crdt.epoch import ZERO_EPOCH, Epoch
from crdt.schema import RECORD_KINDS, ROOTS, AppEdit, Record, SchemaError, winning_order
from crdt.updatecheck import UpdateRejected, check_update_reach, decode_state_vector

# The update of a transaction that changed nothing (no structs, an empty delete set).
EMPTY_UPDATE = b"\x00\x00"
# A sync frame beyond this is refused before pycrdt parses it: two sites' worth of 10,000
# changes each is about 2 MiB of update, a whole large mesh's state well under this.
MAX_UPDATE_BYTES = 32 * 1024 * 1024
# A state vector names one clock per writer (a writer is one daemon start): far below this.
MAX_STATE_VECTOR_BYTES = 1024 * 1024


class SyncError(ValueError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_KIND_OF_ROOT = {kind.ROOT: kind for kind in RECORD_KINDS}


@dataclass(frozen=True)
class AppResolution:
    """An app as every replica with the same edits sees it: the winning edit and the edits
    that lost a conflict to it."""
    app: str
    winner: AppEdit
    losers: tuple[AppEdit, ...]


def resolve(edits: Iterable[AppEdit]) -> AppResolution:
    """The winner among one app's edits and the losers of conflicts (edits not on the
    winner's chain of bases). Order-independent."""
    by_id = {e.edit_id: e for e in edits}
    if not by_id:
        raise ValueError("no edits")
    winner = max(by_id.values(), key=winning_order)
    chain = set()
    at: AppEdit | None = winner
    while at is not None and at.edit_id not in chain:  # `not in chain`: a forged cycle ends the walk
        chain.add(at.edit_id)
        at = by_id.get(at.base) if at.base else None
    losers = tuple(sorted((e for e in by_id.values() if e.edit_id not in chain), key=winning_order))
    return AppResolution(winner.app, winner, losers)


class MeshDocument:
    def __init__(self, client_id: int | None = None, epoch: Epoch = ZERO_EPOCH) -> None:
        self.doc = Doc() if client_id is None else Doc(client_id=client_id)
        # Which Doc this is (crdt.epoch): a replica syncs deltas only with replicas of its epoch.
        self.epoch = epoch
        self._maps: dict[str, Map] = {root: self.doc.get(root, type=Map) for root in ROOTS}
        # Parsed entries per root, kept in step with the maps by their observers: a change
        # leaves the new value (as the event already carries it) to be parsed when the entry
        # is next read (pycrdt drops an observer whose subscription is not referenced, hence
        # `_subscriptions`).
        self._parsed: dict[str, dict[str, Record | SchemaError]] = {root: {} for root in ROOTS}
        self._dirty: dict[str, dict[str, Any]] = {root: {} for root in ROOTS}
        # App edits by app, and each app's resolution, recomputed only for apps whose edits
        # changed: the leader asks for every app's winner after every change it hears of.
        self._edits_by_app: dict[str, dict[str, AppEdit]] = {}
        self._resolutions: dict[str, AppResolution] = {}
        self._unresolved: set[str] = set()
        self._subscriptions = [self._maps[root].observe(self._observer(root)) for root in ROOTS]
        # (state vector, the document's delete set encoded as an update since it), as the last
        # `apply` left it; None once anything changed since. A site hears most updates twice or
        # more (relayed by several sites), and each such echo would encode the delete set twice.
        self._deletions: tuple[bytes, bytes] | None = None

    def _observer(self, root: str):
        # The callback holds the root's dirty entries, never the document: pycrdt keeps it in
        # Rust, out of sight of Python's garbage collector, so a callback that reached back to
        # `self` would keep every document alive for good (each compaction's replaced one,
        # whole history and all).
        dirty = self._dirty[root]

        def changed(event) -> None:
            for key, change in event.keys.items():
                dirty[key] = _GONE if change.get("action") == "delete" else change.get("newValue")
        return changed

    # --- writing -------------------------------------------------------------------------

    def put(self, record: Record) -> bytes:
        """Validate and write one record; returns the update it made. Raises SchemaError and
        then writes nothing."""
        return self.put_many([record])

    def put_many(self, records: list[Record], deletes: Iterable[tuple[str, str]] = ()) -> bytes:
        """Validate and write records in one transaction, and delete the (root, key) entries
        of `deletes` (compaction's merge, crdt.compaction); returns that transaction's own
        update: what it inserted and what it deleted, nothing else. (An update taken as
        `get_update(state before)` carries the document's whole delete set: 111 KB for one
        small write after 30,000 overwrites, growing with every overwrite forever.)"""
        plains = [(r.ROOT, r.key, _record_text(r.to_plain())) for r in records]  # all validated before any write
        deletes = list(deletes)
        for root, _ in deletes:
            if root not in self._maps:
                raise SchemaError(f"no record kind lives in {root[:80]!r}")
        if not plains and not deletes:
            return EMPTY_UPDATE
        made: list[bytes] = []
        self._deletions = None
        subscription = self.doc.observe(lambda event: made.append(event.update))
        try:
            with self.doc.transaction():
                for root, key, plain in plains:
                    self._maps[root][key] = plain
                for root, key in deletes:
                    if key in self._maps[root]:
                        del self._maps[root][key]
        finally:
            self.doc.unobserve(subscription)
        return made[0] if made else EMPTY_UPDATE

    @classmethod
    def built(cls, records: Iterable[Record], *, client_id: int, epoch: Epoch) -> "MeshDocument":
        """A fresh document of `epoch` holding `records` and no history (compaction)."""
        document = cls(client_id=client_id, epoch=epoch)
        document.put_many(list(records))
        return document

    @classmethod
    def adopted(cls, full_update: bytes, *, client_id: int, epoch: Epoch) -> "MeshDocument":
        """The document of another replica's epoch, from its full update. Refused whole (a
        SyncError, and nothing made) when the update is malformed or any entry in it is not a
        well-formed record: a replica of a new epoch is built from validated records only, so
        junk in one is hostile and is not taken in wholesale."""
        document = cls(client_id=client_id, epoch=epoch)
        document.apply(full_update)
        bad = document.invalid()
        if bad:
            root, key, reason = bad[0]
            raise SyncError(f"the document of epoch {epoch} holds {len(bad)} malformed entries, "
                            f"first {root}/{key[:80]}: {reason}")
        return document

    def new_app_edit(self, *, edit_id: str, app: str, site: str, actor: str, ts: float, spec: str,
                     targets: tuple[str, ...], replicas: int, stopped: bool = False) -> AppEdit:
        """The edit that changes `app` on top of what this replica has: its version is one
        more than any edit of the app seen here, its base the current winner. Validated when
        it is put."""
        edits = self.app_edits(app)
        return AppEdit(edit_id=edit_id, app=app, version=max((e.version for e in edits), default=0) + 1,
                       base=resolve(edits).winner.edit_id if edits else "", site=site, actor=actor, ts=ts,
                       spec=spec, targets=tuple(targets), replicas=replicas, stopped=stopped)

    # --- reading -------------------------------------------------------------------------

    def _parse(self, root: str, key: str, value: Any) -> None:
        parsed, kind = self._parsed[root], _KIND_OF_ROOT[root]
        if root == AppEdit.ROOT:
            self._forget_edit(parsed.get(key))
        if value is _GONE:
            parsed.pop(key, None)
            return
        try:
            record = kind.from_plain(_record_value(kind, value))
            if record.key != key:
                raise SchemaError(f"{kind.KIND}: stored under {key[:80]!r}, not under its own key")
            parsed[key] = record
        except SchemaError as e:
            parsed[key] = e
            return
        if root == AppEdit.ROOT:
            self._edits_by_app.setdefault(record.app, {})[key] = record
            self._unresolved.add(record.app)

    def _forget_edit(self, old: Record | SchemaError | None) -> None:
        if isinstance(old, AppEdit):
            edits = self._edits_by_app.get(old.app, {})
            edits.pop(old.edit_id, None)
            if not edits:
                self._edits_by_app.pop(old.app, None)
            self._unresolved.add(old.app)

    def parse_pending(self, budget: int) -> int:
        """Parse up to `budget` changed entries ahead of the next read; returns how many are
        left. Lets an event loop take a large catch-up's parsing in slices, answering other
        work in between, instead of in one pass at the next read."""
        for root in ROOTS:
            dirty = self._dirty[root]
            while dirty and budget > 0:
                key = next(iter(dirty))
                self._parse(root, key, dirty.pop(key))
                budget -= 1
        return sum(len(dirty) for dirty in self._dirty.values())

    def _entries(self, root: str) -> dict[str, Record | SchemaError]:
        dirty = self._dirty[root]
        if dirty:
            for key, value in dirty.items():
                self._parse(root, key, value)
            dirty.clear()
        return self._parsed[root]

    def records(self, kind: type[Record]) -> list[Any]:
        """Every well-formed record of `kind`, in key order."""
        entries = self._entries(kind.ROOT)
        return [entries[k] for k in sorted(entries) if not isinstance(entries[k], SchemaError)]

    def get(self, kind: type[Record], key: str) -> Any:
        dirty = self._dirty[kind.ROOT]
        if key in dirty:  # only this entry: a look-up does not parse a whole catch-up
            self._parse(kind.ROOT, key, dirty.pop(key))
        entry = self._parsed[kind.ROOT].get(key)
        return None if entry is None or isinstance(entry, SchemaError) else entry

    def all_records(self) -> list[Record]:
        """Every well-formed record of every kind."""
        return [record for kind in RECORD_KINDS for record in self.records(kind)]

    def invalid(self) -> list[tuple[str, str, str]]:
        """(root, key, reason) of every entry that is not a well-formed record."""
        out = []
        for root in ROOTS:
            for key, entry in sorted(self._entries(root).items()):
                if isinstance(entry, SchemaError):
                    out.append((root, key, entry.reason))
        return out

    def app_edits(self, app: str | None = None) -> list[AppEdit]:
        if app is None:
            return self.records(AppEdit)
        self._entries(AppEdit.ROOT)
        edits = self._edits_by_app.get(app, {})
        return [edits[k] for k in sorted(edits)]

    def _resolve_changed(self) -> dict[str, AppResolution]:
        self._entries(AppEdit.ROOT)
        for app in self._unresolved:
            edits = self._edits_by_app.get(app)
            if edits:
                self._resolutions[app] = resolve(edits.values())
            else:
                self._resolutions.pop(app, None)
        self._unresolved.clear()
        return self._resolutions

    def apps(self) -> dict[str, AppResolution]:
        """Every app's resolution, stopped ones included, by app name."""
        resolutions = self._resolve_changed()
        return {app: resolutions[app] for app in sorted(resolutions)}

    def app(self, app: str) -> AppResolution | None:
        return self._resolve_changed().get(app)

    # --- sync ----------------------------------------------------------------------------

    def state_vector(self) -> bytes:
        return self.doc.get_state()

    def delta_since(self, state_vector: bytes) -> bytes:
        """What a replica at `state_vector` is missing (everything, for b"")."""
        if not _their_clocks(state_vector):
            return self.doc.get_update()
        try:
            return self.doc.get_update(state_vector)
        except ValueError as e:
            raise SyncError(f"malformed state vector: {e}") from None

    def lacking(self, state_vector: bytes) -> int:
        """How many items of this replica a replica at `state_vector` lacks (0: it holds
        everything this one does), from the two state vectors alone: no delta is made."""
        theirs = _their_clocks(state_vector)
        ours = decode_state_vector(self.doc.get_state())
        return sum(max(0, clock - theirs.get(client, 0)) for client, clock in ours.items())

    def apply(self, update: bytes) -> bool:
        """Merge an update from any replica; applying one twice, or out of order, is harmless.
        Returns whether it changed anything (new items, or deletions this replica did not
        have): an update that brings nothing need not be stored or passed on.

        Every delta carries the sender's whole delete set (pycrdt encodes it in each one), so
        "it names deletions" is not "it changed something": a site's periodic anti-entropy
        exchange would be stored (and fsync'd) and passed on every round, forever. A
        deletion alone moves no state vector; it shows in the delete set, which is compared
        (as the update encoding it) before and after. Were two encodings of one delete set
        ever to differ, the update would count as a change: stored once more, never lost."""
        if len(update) > MAX_UPDATE_BYTES:
            raise SyncError(f"update of {len(update)} bytes is over the {MAX_UPDATE_BYTES} limit")
        try:
            # before pycrdt: it trusts the counts an update declares
            _, deleted, reach = check_update_reach(update)
            before = self.doc.get_state()
            deletions_before = b""
            ours = decode_state_vector(before) if deleted and reach else {}
            brings = bool(deleted) and any(clock > ours.get(client, 0) for client, clock in reach.items())
            if deleted and not brings:  # (one that surely brings items moves the state vector: no compare)
                cached = self._deletions
                deletions_before = cached[1] if cached is not None and cached[0] == before \
                    else self.doc.get_update(before)
            self.doc.apply_update(update)
            after = self.doc.get_state()
            if after != before or brings:  # brings, yet the vector stayed: items held back for a
                self._deletions = None    # missing parent; a change for all we know (stored once more)
                return True
            if not deleted:
                return False
            deletions_after = self.doc.get_update(after)
            self._deletions = (after, deletions_after)
            return deletions_after != deletions_before
        except UpdateRejected as e:
            self._deletions = None
            raise SyncError(f"malformed update: {e.reason}") from None
        except ValueError as e:
            self._deletions = None
            raise SyncError(f"malformed update: {e}") from None

    def full_update(self) -> bytes:
        """The whole document as one update (a snapshot)."""
        return self.doc.get_update()


def _their_clocks(state_vector: bytes) -> dict[int, int]:
    """Another replica's state vector, checked (b"": an empty replica); SyncError otherwise."""
    if len(state_vector) > MAX_STATE_VECTOR_BYTES:
        raise SyncError(f"state vector of {len(state_vector)} bytes is over the {MAX_STATE_VECTOR_BYTES} limit")
    try:
        return decode_state_vector(state_vector) if state_vector else {}
    except UpdateRejected as e:
        raise SyncError(f"malformed state vector: {e.reason}") from None


_GONE = object()  # a deleted entry, in `MeshDocument._dirty`


def _record_text(plain: dict) -> str:
    return json.dumps(plain, separators=(",", ":"), sort_keys=True, allow_nan=False)


def _record_value(kind: type[Record], value: Any) -> Any:
    """What an entry holds, as plain data for `from_plain` to check: the JSON text a replica
    wrote. Anything else (a number, a nested shared type) was put there by a foreign writer."""
    if not isinstance(value, str):
        raise SchemaError(f"{kind.KIND}: expected the record's JSON text, got {type(value).__name__}")
    try:
        return json.loads(value)
    except ValueError as e:  # also a number too large to be anything (Python refuses it)
        raise SchemaError(f"{kind.KIND}: not JSON ({e})") from None
