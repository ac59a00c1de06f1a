"""The records of the mesh document and their validation: what may be written, and how what was
read is turned back into typed values.

Every record is a frozen dataclass with a fixed set of typed fields. `to_plain` validates and
gives the value written into pycrdt; `from_plain` parses what was read back, and refuses
anything that is not a well-formed record of its kind.

Invariants:
- Nothing reaches pycrdt without passing `validate` first: pycrdt stores every number as a
  float64 (so an int beyond 2**53 would come back changed) and panics, with a BaseException
  that takes the process down, on an int >= 2**63. Ints are therefore held to
  |x| <= MAX_SAFE_INT, and NaN/Infinity are refused (they are not JSON, and compare unequal).
- `from_plain(to_plain(r)) == r` for every valid record r (ints read back as floats are
  turned back into ints; lists back into tuples).
- A field added after a record kind was first written has a default and is written only
  when it differs from it (`rule(..., added=True)`): a record that does not use it reads
  the same on a member that predates it, and a record written before it reads back with
  the default.
- Every refusal is a `SchemaError` whose `reason` names the record kind, the field and what is
  wrong, for the CLI and the event log.
- Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

# Largest int a float64 holds exactly: pycrdt keeps numbers as float64.
MAX_SAFE_INT = 2**53
# Names of sites, apps and nodes: DNS labels, as app names and site names are elsewhere in meshd.
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# Node ids are 32 hex digits (meshd.io.identity); record ids are made by their writer, bounded.
NODE_ID_RE = re.compile(r"^[0-9a-f]{32}$")
RECORD_ID_RE = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")
ENDPOINT_RE = re.compile(r"^[0-9a-fA-F.:\[\]]{3,60}:[0-9]{1,5}$")  # "ip:port", IPv4 or [IPv6]
# An app spec is TOML text as the operator wrote it; meshd's admin socket refuses more than
# 1 MiB per request and real specs are a few hundred bytes. 64 KiB bounds one record.
MAX_SPEC_BYTES = 64 * 1024
# Free text (reasons, actors, audit details, addresses): enough for any message, bounded so
# a record stays small next to a sync frame.
MAX_TEXT = 4096
# Lists (target sites, addresses): a mesh of more than this many sites names them by label,
# not one by one.
MAX_LIST = 256
# Signed documents (policy bundles, revocation entries) are small JSON/PEM texts.
MAX_SIGNED_BYTES = 256 * 1024


class SchemaError(ValueError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _check_number(kind: str, name: str, value: Any, want: type) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SchemaError(f"{kind}.{name}: expected {want.__name__}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise SchemaError(f"{kind}.{name}: {value} is not a finite number")
    if abs(value) > MAX_SAFE_INT:
        raise SchemaError(f"{kind}.{name}: {value} is beyond +/-2**53, which the document cannot hold exactly")
    if want is int and value != int(value):
        raise SchemaError(f"{kind}.{name}: expected an integer, got {value}")


def _check_text(kind: str, name: str, value: Any, limit: int, pattern: re.Pattern | None = None) -> None:
    if not isinstance(value, str):
        raise SchemaError(f"{kind}.{name}: expected text, got {type(value).__name__}")
    if value.isascii():  # nearly all text: its size without encoding it
        size = len(value)
    else:
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise SchemaError(f"{kind}.{name}: not valid Unicode text") from None
    if size > limit:
        raise SchemaError(f"{kind}.{name}: longer than {limit} bytes")
    if "\x00" in value:
        raise SchemaError(f"{kind}.{name}: contains a NUL character")
    if pattern is not None and not pattern.match(value):
        raise SchemaError(f"{kind}.{name}: {value[:80]!r} is not a valid {name}")


@dataclass(frozen=True)
class Field:
    """How one field is checked: its Python type and, for text, its length limit and pattern."""
    type: type
    limit: int = MAX_TEXT
    pattern: re.Pattern | None = None
    optional: bool = False  # may be None


def _check(kind: str, name: str, rule: Field, value: Any) -> Any:
    """Validate one field; returns the value as it should be written (tuples as lists)."""
    if value is None and rule.optional:
        return None
    if rule.type in (int, float):
        _check_number(kind, name, value, rule.type)
        return int(value) if rule.type is int else float(value)
    if rule.type is bool:
        if not isinstance(value, bool):
            raise SchemaError(f"{kind}.{name}: expected true or false, got {type(value).__name__}")
        return value
    if rule.type is str:
        _check_text(kind, name, value, rule.limit, rule.pattern)
        return value
    if rule.type is tuple:  # a list of names
        if not isinstance(value, (list, tuple)):
            raise SchemaError(f"{kind}.{name}: expected a list, got {type(value).__name__}")
        if len(value) > MAX_LIST:
            raise SchemaError(f"{kind}.{name}: more than {MAX_LIST} entries")
        for i, item in enumerate(value):
            _check_text(kind, f"{name}[{i}]", item, rule.limit, rule.pattern)
        return list(value)
    raise AssertionError(f"no rule for {rule.type}")  # a schema bug, not input


def rule(check: Field, default: Any = MISSING, added: bool = False) -> Any:
    """A record's dataclass field, carrying the check its values must pass. `added`: a field
    newer than its record kind (see the invariants); it needs a default."""
    assert not added or default is not MISSING, "an added field needs a default"
    return field(default=default, metadata={"rule": check, "added": added})


_ADDED: dict[type, dict[str, Any]] = {}  # per record kind: its added fields and their defaults


_RULES: dict[type, dict[str, Field]] = {}  # per record kind, from its dataclass fields


class Record:
    """A record kind: a frozen dataclass whose fields are declared with `rule(...)`, with
    `KIND`, `ROOT` (the document map it lives in) and `key` (where in that map it lives)."""
    KIND: ClassVar[str]
    ROOT: ClassVar[str]

    @classmethod
    def rules(cls) -> dict[str, Field]:
        found = _RULES.get(cls)
        if found is None:
            found = _RULES[cls] = {f.name: f.metadata["rule"] for f in fields(cls)}
        return found

    @classmethod
    def added_fields(cls) -> dict[str, Any]:
        found = _ADDED.get(cls)
        if found is None:
            found = _ADDED[cls] = {f.name: f.default for f in fields(cls) if f.metadata.get("added")}
        return found

    def to_plain(self) -> dict[str, Any]:
        """The validated value to write; raises SchemaError."""
        added = self.added_fields()
        return {name: _check(self.KIND, name, check, getattr(self, name)) for name, check in self.rules().items()
                if name not in added or getattr(self, name) != added[name]}

    @classmethod
    def from_plain(cls, value: Any):
        """The record a value read from the document holds; raises SchemaError."""
        if not isinstance(value, dict):
            raise SchemaError(f"{cls.KIND}: expected a record, got {type(value).__name__}")
        rules = cls.rules()
        if not value.keys() <= rules.keys():
            unknown = sorted(set(value) - set(rules))[0]
            raise SchemaError(f"{cls.KIND}: unknown field {unknown!r}")
        args = {}
        kind = cls.KIND
        added = cls.added_fields()
        for name, check in rules.items():
            if name not in value:
                if name in added:
                    continue  # written without it: the default
                raise SchemaError(f"{kind}.{name}: missing")
            field_value = value[name]
            if check.type is str and field_value is not None:  # most fields: skip the dispatch
                _check_text(kind, name, field_value, check.limit, check.pattern)
                args[name] = field_value
            elif check.type is tuple:
                args[name] = tuple(_check(kind, name, check, field_value))
            else:
                args[name] = _check(kind, name, check, field_value)
        return cls(**args)


_NAME = Field(str, 63, NAME_RE)
_NODE_ID = Field(str, 32, NODE_ID_RE)
_RECORD_ID = Field(str, 128, RECORD_ID_RE)
_TEXT = Field(str)
_TS = Field(float)


@dataclass(frozen=True)
class AppEdit(Record):
    """One change to an app's desired state, never overwritten: a deploy, an update or a stop.

    `version` is a Lamport counter (1 + the highest version of the app the writer had seen);
    `base` is the edit it was made on top of ("" for the first). The edit that wins is the one
    with the highest (version, ts, edit_id); edits off the winner's chain of bases lost a
    conflict (see crdt.document)."""
    KIND: ClassVar[str] = "app edit"
    ROOT: ClassVar[str] = "app_edits"
    edit_id: str = rule(_RECORD_ID)
    app: str = rule(_NAME)
    version: int = rule(Field(int))
    base: str = rule(Field(str, 128))
    site: str = rule(_NAME)  # where the change was made
    actor: str = rule(_TEXT)
    ts: float = rule(_TS)
    spec: str = rule(Field(str, MAX_SPEC_BYTES))  # the app's TOML as submitted ("" for a stop)
    targets: tuple[str, ...] = rule(Field(tuple, 63, NAME_RE))  # the sites the app runs in (data residency)
    replicas: int = rule(Field(int))
    stopped: bool = rule(Field(bool), default=False)

    @property
    def key(self) -> str:
        return self.edit_id

    def to_plain(self) -> dict[str, Any]:
        plain = super().to_plain()
        if self.version < 1:
            raise SchemaError(f"{self.KIND}.version: must be 1 or more, got {self.version}")
        if self.replicas < 0:
            raise SchemaError(f"{self.KIND}.replicas: must not be negative, got {self.replicas}")
        if not self.targets and not self.stopped:
            raise SchemaError(f"{self.KIND}.targets: an app must run in at least one site")
        if self.base and not RECORD_ID_RE.match(self.base):
            raise SchemaError(f"{self.KIND}.base: {self.base[:80]!r} is not a valid edit id")
        return plain


def winning_order(edit: AppEdit) -> tuple:
    """How edits of one app rank: the highest wins (crdt.document.resolve)."""
    return (edit.version, edit.ts, edit.edit_id)


def app_status_key(app: str, site: str) -> str:
    """Where an app's progress in a site lives (AppSiteStatus.key)."""
    return f"{app}@{site}"


@dataclass(frozen=True)
class AppSiteStatus(Record):
    """How far one site has got with one app, as that site's leader last published it."""
    KIND: ClassVar[str] = "app status"
    ROOT: ClassVar[str] = "app_status"
    app: str = rule(_NAME)
    site: str = rule(_NAME)
    edit_id: str = rule(Field(str, 128))  # the edit the site is running
    version: int = rule(Field(int))
    desired: int = rule(Field(int))
    running: int = rule(Field(int))
    ts: float = rule(_TS)
    # The site's part of the edit's rollout (meshd.waves): its deployment's state ("" before
    # any), new replicas healthy, canaries running, and when it reached an outcome.
    deployment: str = rule(Field(str, 32), default="", added=True)
    healthy: int = rule(Field(int), default=0, added=True)
    canaries: int = rule(Field(int), default=0, added=True)
    ended_ts: float = rule(_TS, default=0.0, added=True)

    @property
    def key(self) -> str:
        return app_status_key(self.app, self.site)


def rollout_control_key(edit_id: str, site: str, action: str) -> str:
    """Where one site's pause/resume (one record, the latest) or cancel of an edit's rollout lives."""
    return f"{edit_id}/{site}/{'cancel' if action == 'cancel' else 'hold'}"


@dataclass(frozen=True)
class RolloutControl(Record):
    """An operator's pause, resume or cancel of one edit's rollout across sites, made in `site`
    (meshd.waves reads them; a cancel is final)."""
    KIND: ClassVar[str] = "rollout control"
    ROOT: ClassVar[str] = "rollout_control"
    app: str = rule(_NAME)
    edit_id: str = rule(_RECORD_ID)
    site: str = rule(_NAME)
    action: str = rule(Field(str, 16))
    ts: float = rule(_TS)
    actor: str = rule(_TEXT)
    reason: str = rule(_TEXT, default="")

    @property
    def key(self) -> str:
        return rollout_control_key(self.edit_id, self.site, self.action)

    def to_plain(self) -> dict[str, Any]:
        plain = super().to_plain()
        if self.action not in ("pause", "resume", "cancel"):
            raise SchemaError(f"{self.KIND}.action: must be pause, resume or cancel, got {self.action[:32]!r}")
        if len(self.key) > 200:
            raise SchemaError(f"{self.KIND}: edit id too long for a key")
        return plain


@dataclass(frozen=True)
class SiteSummary(Record):
    """A site as its leader last published it: size, readiness and how to reach it."""
    KIND: ClassVar[str] = "site summary"
    ROOT: ClassVar[str] = "sites"
    site: str = rule(_NAME)
    nodes: int = rule(Field(int))
    ready: int = rule(Field(int))
    leader: str | None = rule(Field(str, 63, optional=True))
    # "ip:port" peer endpoints of its members, for other sites to sync with
    addresses: tuple[str, ...] = rule(Field(tuple, 64, ENDPOINT_RE))
    ts: float = rule(_TS)

    @property
    def key(self) -> str:
        return self.site


@dataclass(frozen=True)
class NodeSummary(Record):
    """A member as its site's leader last published it."""
    KIND: ClassVar[str] = "node summary"
    ROOT: ClassVar[str] = "nodes"
    node_id: str = rule(_NODE_ID)
    name: str = rule(Field(str, 253))
    site: str = rule(_NAME)
    state: str = rule(Field(str, 16))  # ready | down | draining | left | revoked
    address: str = rule(Field(str, 64))
    arch: str = rule(Field(str, 32))
    role: str = rule(Field(str, 16))  # leader | follower | nonvoter
    allocs: int = rule(Field(int))  # live allocations on it
    labels: tuple[str, ...] = rule(Field(tuple, 320))  # "key=value", as placement matches them
    evidence: str = rule(Field(str, 32))  # what its admission was based on
    ts: float = rule(_TS)
    # Its health over the last minute (meshd.fleethealth): CPU busy and memory used as the
    # 50th and 95th percentiles, % of the node (None: no sample), restarts, OOM kills.
    cpu_p50: int | None = rule(Field(int, optional=True), default=None, added=True)
    cpu_p95: int | None = rule(Field(int, optional=True), default=None, added=True)
    mem_p50: int | None = rule(Field(int, optional=True), default=None, added=True)
    mem_p95: int | None = rule(Field(int, optional=True), default=None, added=True)
    restarts: int = rule(Field(int), default=0, added=True)
    oom_kills: int = rule(Field(int), default=0, added=True)

    @property
    def key(self) -> str:
        return self.node_id


@dataclass(frozen=True)
class SignedRecord(Record):
    """A document signed by the mesh root (a policy bundle or a revocation): readers verify
    the signature before acting on it; the document only carries it."""
    KIND: ClassVar[str] = "signed record"
    ROOT: ClassVar[str] = "signed"
    key: str = rule(_RECORD_ID)  # "policy" for the policy bundle, "revocation/<node id>" for a revocation
    kind: str = rule(Field(str, 32))  # "policy" | "revocation"
    serial: int = rule(Field(int))
    body: str = rule(Field(str, MAX_SIGNED_BYTES))  # the signed document as meshd.io writes it
    site: str = rule(_NAME)  # where it was issued
    ts: float = rule(_TS)


@dataclass(frozen=True)
class AuditRecord(Record):
    """Who did what, where, when: appended once, never changed."""
    KIND: ClassVar[str] = "audit record"
    ROOT: ClassVar[str] = "audit"
    audit_id: str = rule(_RECORD_ID)
    ts: float = rule(_TS)
    actor: str = rule(_TEXT)
    action: str = rule(Field(str, 64))
    target: str = rule(_TEXT)
    site: str = rule(_NAME)
    reason: str = rule(_TEXT, default="", added=True)  # why (a refusal, a quarantine, a revocation)

    @property
    def key(self) -> str:
        return self.audit_id


@dataclass(frozen=True)
class DroppedAudit(Record):
    """What compaction dropped of one site's audit records (crdt.compaction): every record of
    `site` numbered `upto_seq` or less is gone from the document; `count` of them, made
    between `first_ts` and `last_ts`. One per site, replaced as more is dropped."""
    KIND: ClassVar[str] = "dropped audit"
    ROOT: ClassVar[str] = "audit_dropped"
    site: str = rule(_NAME)
    upto_seq: int = rule(Field(int))
    count: int = rule(Field(int))
    first_ts: float = rule(_TS)
    last_ts: float = rule(_TS)

    @property
    def key(self) -> str:
        return self.site

    def to_plain(self) -> dict[str, Any]:
        plain = super().to_plain()
        if self.upto_seq < 0 or self.count < 0:
            raise SchemaError(f"{self.KIND}: upto_seq and count must not be negative")
        if self.first_ts > self.last_ts:
            raise SchemaError(f"{self.KIND}: first_ts is after last_ts")
        return plain


ARTIFACT_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
# A holder as other sites dial it: "<node id>@<ip:port>".
HOLDER_RE = re.compile(r"^[0-9a-f]{32}@[0-9a-fA-F.:\[\]]{3,60}:[0-9]{1,5}$")
MAX_PUBLISHED_HOLDERS = 16  # other sites pull from a few; the site's own members share the rest


@dataclass(frozen=True)
class ArtifactHolding(Record):
    """An artifact as one site's leader last published it: its signed manifest (readers
    verify it before anything else), and which members of that site hold it complete, for
    other sites to pull from (meshd.artifacts.catalog). One per artifact and site."""
    KIND: ClassVar[str] = "artifact holding"
    ROOT: ClassVar[str] = "artifacts"
    digest: str = rule(Field(str, 71, ARTIFACT_DIGEST_RE))
    site: str = rule(_NAME)
    manifest: str = rule(Field(str, MAX_SIGNED_BYTES))  # the signed manifest, as JSON text
    holders: tuple[str, ...] = rule(Field(tuple, 100, HOLDER_RE))
    ts: float = rule(_TS)

    @property
    def key(self) -> str:
        return f"{self.digest}/{self.site}"

    def to_plain(self) -> dict[str, Any]:
        if len(self.holders) > MAX_PUBLISHED_HOLDERS:
            raise SchemaError(f"{self.KIND}: more than {MAX_PUBLISHED_HOLDERS} holders")
        return super().to_plain()


RECORD_KINDS: tuple[type[Record], ...] = (AppEdit, AppSiteStatus, SiteSummary, NodeSummary, SignedRecord, AuditRecord,
                                          DroppedAudit, RolloutControl, ArtifactHolding)
ROOTS = tuple(kind.ROOT for kind in RECORD_KINDS)
