"""The mesh document: one pycrdt Doc per replica, one map per record kind, typed reads and
validated writes, delta sync, and the deterministic choice of each app's winning edit.

Layout: a root map per kind (crdt.schema.ROOTS), keyed by the record's own key. App edits are
never overwritten (each has its own key), so pycrdt's rule for concurrent writes to one key
(the higher client id wins) never decides an app; the rule below does, the same everywhere.

Invariants:
- Every local write validates first (crdt.schema) and changes nothing when it is refused; a
  write returns the update it made (the minimal delta), for the durable log and for peers.
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
- Pure: no I/O, no clock (callers pass `ts`), no randomness (callers pass ids).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from pycrdt import Doc, Map

from crdt.schema import RECORD_KINDS, ROOTS, AppEdit, Record, SchemaError, winning_order
from crdt.updatecheck import UpdateRejected, check_state_vector, check_update

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
    def __init__(self, client_id: int | None = None) -> None:
        self.doc = Doc() if client_id is None else Doc(client_id=client_id)
        self._maps: dict[str, Map] = {root: self.doc.get(root, type=Map) for root in ROOTS}
        # Parsed entries per root, kept in step with the maps by their observers (pycrdt drops
        # an observer whose subscription is not referenced, hence `_subscriptions`).
        self._parsed: dict[str, dict[str, Record | SchemaError]] = {root: {} for root in ROOTS}
        self._dirty: dict[str, set[str]] = {root: set() for root in ROOTS}
        self._subscriptions = [self._maps[root].observe(self._observer(root)) for root in ROOTS]

    def _observer(self, root: str):
        def changed(event) -> None:
            self._dirty[root].update(event.keys)
        return changed

    # --- writing -------------------------------------------------------------------------

    def put(self, record: Record) -> bytes:
        """Validate and write one record; returns the update it made. Raises SchemaError and
        then writes nothing."""
        return self.put_many([record])

    def put_many(self, records: list[Record]) -> bytes:
        plains = [(r.ROOT, r.key, r.to_plain()) for r in records]  # all validated before any write
        before = self.doc.get_state()
        with self.doc.transaction():
            for root, key, plain in plains:
                self._maps[root][key] = plain
        return self.doc.get_update(before)

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

    def _entries(self, root: str) -> dict[str, Record | SchemaError]:
        parsed, dirty, kind = self._parsed[root], self._dirty[root], _KIND_OF_ROOT[root]
        if dirty:
            shared = self._maps[root]
            for key in dirty:
                if key not in shared:
                    parsed.pop(key, None)
                    continue
                value = shared[key]
                try:
                    record = kind.from_plain(_plain(value))
                    if record.key != key:
                        raise SchemaError(f"{kind.KIND}: stored under {key[:80]!r}, not under its own key")
                    parsed[key] = record
                except SchemaError as e:
                    parsed[key] = e
            dirty.clear()
        return parsed

    def records(self, kind: type[Record]) -> list[Any]:
        """Every well-formed record of `kind`, in key order."""
        entries = self._entries(kind.ROOT)
        return [entries[k] for k in sorted(entries) if not isinstance(entries[k], SchemaError)]

    def get(self, kind: type[Record], key: str) -> Any:
        entry = self._entries(kind.ROOT).get(key)
        return None if entry is None or isinstance(entry, SchemaError) else entry

    def invalid(self) -> list[tuple[str, str, str]]:
        """(root, key, reason) of every entry that is not a well-formed record."""
        out = []
        for root in ROOTS:
            for key, entry in sorted(self._entries(root).items()):
                if isinstance(entry, SchemaError):
                    out.append((root, key, entry.reason))
        return out

    def app_edits(self, app: str | None = None) -> list[AppEdit]:
        return [e for e in self.records(AppEdit) if app is None or e.app == app]

    def apps(self) -> dict[str, AppResolution]:
        """Every app's resolution, stopped ones included."""
        by_app: dict[str, list[AppEdit]] = {}
        for edit in self.records(AppEdit):
            by_app.setdefault(edit.app, []).append(edit)
        return {app: resolve(edits) for app, edits in sorted(by_app.items())}

    def app(self, app: str) -> AppResolution | None:
        edits = self.app_edits(app)
        return resolve(edits) if edits else None

    # --- sync ----------------------------------------------------------------------------

    def state_vector(self) -> bytes:
        return self.doc.get_state()

    def delta_since(self, state_vector: bytes) -> bytes:
        """What a replica at `state_vector` is missing (everything, for b"")."""
        if len(state_vector) > MAX_STATE_VECTOR_BYTES:
            raise SyncError(f"state vector of {len(state_vector)} bytes is over the {MAX_STATE_VECTOR_BYTES} limit")
        if not state_vector:
            return self.doc.get_update()
        try:
            check_state_vector(state_vector)
            return self.doc.get_update(state_vector)
        except UpdateRejected as e:
            raise SyncError(f"malformed state vector: {e.reason}") from None
        except ValueError as e:
            raise SyncError(f"malformed state vector: {e}") from None

    def apply(self, update: bytes) -> bool:
        """Merge an update from any replica; applying one twice, or out of order, is harmless.
        Returns whether it could have changed anything (new items, or deletions): an update
        that brings nothing need not be stored or passed on."""
        if len(update) > MAX_UPDATE_BYTES:
            raise SyncError(f"update of {len(update)} bytes is over the {MAX_UPDATE_BYTES} limit")
        try:
            _, deleted = check_update(update)  # before pycrdt: it trusts the counts an update declares
            before = self.doc.get_state()
            self.doc.apply_update(update)
            return deleted > 0 or self.doc.get_state() != before
        except UpdateRejected as e:
            raise SyncError(f"malformed update: {e.reason}") from None
        except ValueError as e:
            raise SyncError(f"malformed update: {e}") from None

    def full_update(self) -> bytes:
        """The whole document as one update (a snapshot)."""
        return self.doc.get_update()


def _plain(value: Any) -> Any:
    """The value as plain data (a nested shared type where a plain record belongs is only
    made by a foreign writer; it is read as what it holds, then checked like anything else)."""
    return value.to_py() if hasattr(value, "to_py") else value
