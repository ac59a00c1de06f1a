"""The site's Raft commands as typed values, their wire form, and the results they get.

Every command the Raft log carries is one frozen dataclass here; `encode()` gives its wire
form (the plain dict pysyncobj pickles into the log, with the envelope `op`, `request_id`,
`ts`) and `decode()` turns a wire dict back into the dataclass, checking every field. The
state machine (meshd.sitestate) only ever sees decoded commands.

A command's outcome is a `Result`: `Ok(fields)` or `Refused(code, text)`. A caller reads an
outcome's fields only from an `Ok` (`Refused` has none), so code that uses what a command
returned cannot mistake a refusal for success; a caller that needs nothing from the outcome
still has to look at it (tests/unit/test_commands.py fails on any commit whose result is
dropped).

Invariants:
- `decode()` never raises: an unknown op or a malformed field is a `Refused` with a code
  and the field's name, so a crafted or damaged log entry refuses instead of wedging Raft.
- `decode(encode(envelope, command))` gives the same command back.
- The wire form is the one earlier versions wrote: journals and snapshots keep loading.
- Results travel as plain dicts where they are stored (the request-dedupe table in the
  replicated state): `Result.to_wire()` / `result_from_wire()`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Mapping, Union

from crdt.schema import AppEdit, SchemaError
from meshd import spec as specmod
from meshd.placement.plan import Placement
from meshd.state import ALLOC_STATES, HEALTH_NONE, HEALTH_STATES, AppSpec, NodeRecord, NodeResources

# Ints in commands are bounded so that a crafted command cannot blow up snapshots or the
# CRDT document later (which cannot hold ints of 2**63 and above).
MAX_INT = 2**53

# --- refusal codes: what kind of "no" it is (the text says the particulars) -------------
MALFORMED = "malformed"  # a field is missing, of the wrong type or out of range
UNKNOWN_COMMAND = "unknown-command"  # an op this version does not know
NOT_FOUND = "not-found"  # no such member, app or allocation
NOT_MEMBER = "not-member"  # the node is not (or no longer) a member: left or revoked
REVOKED = "revoked"  # the node was revoked and may never come back
CONFLICT = "conflict"  # clashes with what the state holds (already founded, name taken, newer edit)
STALE = "stale"  # not newer than what is in force (policy serial, revocation list number)
TOKEN = "token"  # the join token is unknown, used, expired or for another site
UNTRUSTED = "untrusted"  # a signed document does not verify with the mesh root
INTERNAL = "internal"  # a bug in the state machine, reported instead of raised
# A clock skew is recorded up to a year either way (a board that booted at 1970 is clamped).
MAX_CLOCK_SKEW_SHOWN = 365 * 86400.0
FENCED = "fenced"  # a leader's decision committed in a later term than it was made in
REFUSAL_CODES = frozenset({MALFORMED, UNKNOWN_COMMAND, NOT_FOUND, NOT_MEMBER, REVOKED, CONFLICT, STALE, TOKEN,
                           UNTRUSTED, INTERNAL, FENCED})


@dataclass(frozen=True)
class Ok:
    """The command was applied (or had been: a retry of the same request id)."""

    fields: Mapping[str, Any] = field(default_factory=dict)
    ok: ClassVar[bool] = True

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def to_wire(self) -> dict:
        return {"ok": True, **self.fields}


@dataclass(frozen=True)
class Refused:
    """The command changed nothing; `code` says what kind of refusal, `text` why."""

    code: str
    text: str
    ok: ClassVar[bool] = False

    def to_wire(self) -> dict:
        return {"ok": False, "code": self.code, "error": self.text}

    def __str__(self) -> str:
        return self.text


Result = Union[Ok, Refused]


def result_from_wire(raw: Any) -> Result:
    if isinstance(raw, dict) and raw.get("ok") is True:
        return Ok({k: v for k, v in raw.items() if k != "ok"})
    if isinstance(raw, dict) and raw.get("ok") is False:
        code = raw.get("code") if raw.get("code") in REFUSAL_CODES else INTERNAL
        return Refused(code, str(raw.get("error", "refused")))
    return Refused(INTERNAL, f"not a command result: {type(raw).__name__}")


class Invalid(Exception):
    """A field of a command does not hold; turned into Refused(code, text) by decode/apply."""

    def __init__(self, text: str, code: str = MALFORMED) -> None:
        super().__init__(text)
        self.code = code

    def refused(self) -> Refused:
        return Refused(self.code, str(self))


# --- field readers: each refuses with the name of the field -----------------------------


def read_str(raw: Mapping, key: str, *, max_len: int = 256, empty: bool = False) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or len(value) > max_len or (not empty and not value):
        raise Invalid(f"{key} must be a {'' if empty else 'non-empty '}string of at most {max_len} characters")
    return value


def read_int(raw: Mapping, key: str, lo: int = 0, hi: int = MAX_INT) -> int:
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise Invalid(f"{key} must be an integer from {lo} to {hi}")
    return value


def read_num(raw: Mapping, key: str, lo: float = 0.0, hi: float = float(MAX_INT)) -> float:
    value = raw.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        raise Invalid(f"{key} must be a number from {lo} to {hi}")
    return float(value)


def read_text(raw: Mapping, key: str, max_len: int) -> str:
    """Free text that may be absent or junk (shown, never decided on): cut to `max_len`."""
    value = raw.get(key, "")
    return value[:max_len] if isinstance(value, str) else ""


def read_digest(raw: Mapping, key: str) -> str:
    """A sha256 package digest (64 lowercase hex digits), or "" for none."""
    value = raw.get(key)
    if not isinstance(value, str) or (value and (len(value) != 64 or value.strip("0123456789abcdef"))):
        raise Invalid(f"{key} must be a sha256 digest (64 lowercase hex digits)")
    return value


# Artifacts a node reports it holds: its store's quota bounds them long before this.
MAX_HELD_ARTIFACTS = 4096
_ARTIFACT_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def read_artifact_digests(raw: Mapping, key: str) -> tuple[str, ...]:
    value = raw.get(key)
    if not isinstance(value, list) or len(value) > MAX_HELD_ARTIFACTS or not all(
            isinstance(d, str) and _ARTIFACT_DIGEST.fullmatch(d) for d in value):
        raise Invalid(f"{key} must be a list of at most {MAX_HELD_ARTIFACTS} sha256:<hex> digests")
    return tuple(sorted(set(value)))


def read_actor(raw: Mapping) -> str:
    actor = raw.get("actor", "")
    return actor if isinstance(actor, str) and len(actor) <= 256 else ""


def read_mapping(raw: Mapping, key: str) -> dict:
    value = raw.get(key)
    if not isinstance(value, dict):
        raise Invalid(f"{key} must be a mapping")
    return value


def node_from_wire(raw: Any) -> NodeRecord:
    if not isinstance(raw, dict):
        raise Invalid("node must be a mapping")
    labels = raw.get("labels", {})
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise Invalid("node.labels must map strings to strings")
    return NodeRecord(
        node_id=read_str(raw, "node_id", max_len=64),
        name=read_str(raw, "name", max_len=63),
        site=read_str(raw, "site", max_len=63),
        address=read_str(raw, "address", max_len=64),
        raft_address=read_str(raw, "raft_address", max_len=64),
        public_key=read_str(raw, "public_key", max_len=128),
        arch=read_str(raw, "arch", max_len=32, empty=True),
        labels=dict(labels),
        version=read_str(raw, "version", max_len=32, empty=True) if "version" in raw else "",
        boot_id=read_str(raw, "boot_id", max_len=64, empty=True) if "boot_id" in raw else "",
        # An RSA 4096 attestation key's public area is under 700 bytes.
        tpm_ak=read_str(raw, "tpm_ak", max_len=2048, empty=True) if "tpm_ak" in raw else "",
        software=read_digest(raw, "software") if "software" in raw else "",
    )


def node_to_wire(node: NodeRecord) -> dict:
    """The fields of a node record a join or bootstrap command carries."""
    return {"node_id": node.node_id, "name": node.name, "site": node.site, "address": node.address,
            "raft_address": node.raft_address, "public_key": node.public_key, "arch": node.arch,
            "labels": dict(node.labels), "version": node.version, "boot_id": node.boot_id, "tpm_ak": node.tpm_ak,
            **({"software": node.software} if node.software else {})}


def resources_from_wire(raw: Any) -> NodeResources:
    if not isinstance(raw, dict):
        raise Invalid("resources must be a mapping")
    return NodeResources(
        cpu_total=read_num(raw, "cpu_total", 0, 4096),
        cpu_free=read_num(raw, "cpu_free", 0, 4096),
        mem_total_mb=read_int(raw, "mem_total_mb", 0, 2**40),
        mem_free_mb=read_int(raw, "mem_free_mb", 0, 2**40),
        enforces=_controllers(raw.get("enforces", [])),
        cgroup=read_int(raw, "cgroup", 0, 2) if "cgroup" in raw else 0,
        reserved_cpu=read_num(raw, "reserved_cpu", 0, 4096) if "reserved_cpu" in raw else 0.0,
        reserved_mem_mb=read_int(raw, "reserved_mem_mb", 0, 2**40) if "reserved_mem_mb" in raw else 0,
        devices=_device_counts(raw.get("devices", {})),
        oom_kills=read_int(raw, "oom_kills", 0, MAX_INT) if "oom_kills" in raw else 0,
    )


MAX_DEVICE_KINDS = 32  # kinds one node reports; more is not a device list
MAX_DEVICES_OF_A_KIND = 1024


def _device_counts(raw: Any) -> tuple[tuple[str, int], ...]:
    if isinstance(raw, (list, tuple)):  # (kind, count) pairs, as a NodeResources holds them
        try:
            raw = dict(raw)
        except (TypeError, ValueError):
            raise Invalid("resources.devices must map kinds to counts") from None
    if not (isinstance(raw, dict) and len(raw) <= MAX_DEVICE_KINDS
            and all(isinstance(k, str) and 0 < len(k) <= 32 for k in raw)):
        raise Invalid("resources.devices must map kinds to counts")
    return tuple(sorted((kind, read_int(raw, kind, 0, MAX_DEVICES_OF_A_KIND)) for kind in raw))


LIMIT_CONTROLLERS = ("cpu", "memory", "pids")  # what `[app.resources]` limits (meshd.io.cgroups)


def _controllers(raw: Any) -> tuple[str, ...]:
    if not (isinstance(raw, (list, tuple)) and all(isinstance(c, str) and c in LIMIT_CONTROLLERS for c in raw)):
        raise Invalid(f"resources.enforces must be a list of {', '.join(LIMIT_CONTROLLERS)}")
    return tuple(sorted(set(raw)))


@dataclass(frozen=True)
class AllocReport:
    """What a node says about one allocation it runs."""

    alloc_id: str
    state: str
    restarts: int = 0
    pid: int | None = None
    exit_code: int | None = None
    reason: str = ""
    # True when this node's meshd ended it (told to stop, or shutting down), not the
    # workload by its own exit: such a stop never counts as the replica having run its course.
    stopped_by_meshd: bool = False
    health: str = HEALTH_NONE  # its health checks' verdict (meshd.health); none unless running

    @classmethod
    def from_wire(cls, raw: Any) -> "AllocReport":
        if not isinstance(raw, dict):
            raise Invalid("each report must be a mapping")
        state = read_str(raw, "state", max_len=16)
        if state not in ALLOC_STATES:
            raise Invalid(f"unknown allocation state {state!r}")
        optional = {}
        for key in ("pid", "exit_code"):
            value = raw.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or abs(value) > MAX_INT):
                raise Invalid(f"{key} must be an integer or null")
            optional[key] = value
        health = raw.get("health") or HEALTH_NONE
        if health not in HEALTH_STATES:
            raise Invalid(f"unknown health {str(health)[:20]!r}")
        optional["health"] = health
        return cls(alloc_id=read_str(raw, "alloc_id", max_len=64), state=state, restarts=read_int(raw, "restarts", 0),
                   reason=read_text(raw, "reason", 512), stopped_by_meshd=raw.get("stopped_by_meshd") is True,
                   **optional)

    def to_wire(self) -> dict:
        wire = {"alloc_id": self.alloc_id, "state": self.state, "restarts": self.restarts, "pid": self.pid,
                "exit_code": self.exit_code, "reason": self.reason}
        if self.stopped_by_meshd:
            wire["stopped_by_meshd"] = True
        if self.health != HEALTH_NONE:  # omitted when none: the journal of a site without checks is unchanged
            wire["health"] = self.health
        return wire


# --- the commands --------------------------------------------------------------------------


class Command:
    """Base of every Raft command; `op` names it on the wire. A command of plain fields
    writes them as they are; one with records in it (a node, a spec, an edit) says how."""

    op: ClassVar[str]

    @classmethod
    def from_wire(cls, raw: dict) -> "Command":
        raise NotImplementedError

    def to_wire(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True)
class Bootstrap(Command):
    """The founder's first command: names the site, admits the founder as its first voter,
    and brings the mesh trust documents (root, root_cert, policy, revocations)."""
    op: ClassVar[str] = "bootstrap"
    site: str
    mesh_id: str
    node: NodeRecord
    trust: dict | None = None
    actor: str = ""

    @classmethod
    def from_wire(cls, raw: dict) -> "Bootstrap":
        trust = raw.get("trust")
        if "trust" in raw and not isinstance(trust, dict):
            raise Invalid("trust must be a mapping")
        return cls(site=read_str(raw, "site", max_len=63), mesh_id=read_str(raw, "mesh_id", max_len=64),
                   node=node_from_wire(raw.get("node")), trust=trust, actor=read_actor(raw))

    def to_wire(self) -> dict:
        wire = {"site": self.site, "mesh_id": self.mesh_id, "node": node_to_wire(self.node), "actor": self.actor}
        if self.trust is not None:
            wire["trust"] = self.trust
        return wire


@dataclass(frozen=True)
class SetPolicy(Command):
    """A new policy bundle signed by the mesh root, made in this site."""
    op: ClassVar[str] = "set_policy"
    policy: dict
    actor: str = ""

    @classmethod
    def from_wire(cls, raw: dict) -> "SetPolicy":
        return cls(policy=read_mapping(raw, "policy"), actor=read_actor(raw))


@dataclass(frozen=True)
class AdoptPolicy(Command):
    """A policy bundle made in another site (through the mesh document)."""
    op: ClassVar[str] = "adopt_policy"
    policy: dict
    site: str
    actor: str = ""

    @classmethod
    def from_wire(cls, raw: dict) -> "AdoptPolicy":
        site = raw.get("site")
        if not isinstance(site, str) or not 0 < len(site) <= 63:
            raise Invalid("site must name the site the policy comes from")
        return cls(policy=read_mapping(raw, "policy"), site=site, actor=read_actor(raw))


@dataclass(frozen=True)
class RevokeNode(Command):
    """Expel a member for good, with the root-signed revocation list that names it."""
    op: ClassVar[str] = "revoke_node"
    node_id: str
    revocations: dict
    reason: str = ""
    number: int = 0  # the list's number (informative; the list itself is authoritative)
    actor: str = ""

    @classmethod
    def from_wire(cls, raw: dict) -> "RevokeNode":
        number = raw.get("number", 0)
        return cls(node_id=read_str(raw, "node_id", max_len=64), revocations=read_mapping(raw, "revocations"),
                   reason=read_str(raw, "reason", max_len=200, empty=True) if "reason" in raw else "",
                   number=number if isinstance(number, int) and not isinstance(number, bool) else 0,
                   actor=read_actor(raw))


@dataclass(frozen=True)
class AdoptRevocations(Command):
    """A root-signed list that adds revocations made elsewhere in the mesh."""
    op: ClassVar[str] = "adopt_revocations"
    revocations: dict
    sites: tuple[str, ...] = ()
    actor: str = ""

    @classmethod
    def from_wire(cls, raw: dict) -> "AdoptRevocations":
        sites = raw.get("sites", [])
        if not isinstance(sites, list) or not all(isinstance(site, str) and len(site) <= 63 for site in sites):
            raise Invalid("sites must be a list of site names")
        return cls(revocations=read_mapping(raw, "revocations"), sites=tuple(sites), actor=read_actor(raw))

    def to_wire(self) -> dict:
        return {"revocations": self.revocations, "sites": list(self.sites), "actor": self.actor}


@dataclass(frozen=True)
class Attested(Command):
    """A member's fresh evidence verified (re-attestation); it releases a quarantined one."""
    op: ClassVar[str] = "attested"
    node_id: str
    boot_id: str
    software: str = ""  # the package digest the evidence carried ("" from an older leader)
    actor: str = ""
    # The member's clock less the leader's when the evidence came (seconds; 0 from an older
    # leader): shown, never held against it (attestation.verifier judges by the nonce).
    clock_skew: float = 0.0

    @classmethod
    def from_wire(cls, raw: dict) -> "Attested":
        return cls(node_id=read_str(raw, "node_id", max_len=64), boot_id=read_str(raw, "boot_id", max_len=64),
                   software=read_digest(raw, "software") if "software" in raw else "", actor=read_actor(raw),
                   clock_skew=read_num(raw, "clock_skew", -MAX_CLOCK_SKEW_SHOWN, MAX_CLOCK_SKEW_SHOWN)
                   if "clock_skew" in raw else 0.0)

    def to_wire(self) -> dict:
        wire: dict = {"node_id": self.node_id, "boot_id": self.boot_id}
        if self.clock_skew:
            wire["clock_skew"] = self.clock_skew
        if self.software:
            wire["software"] = self.software
        if self.actor:
            wire["actor"] = self.actor
        return wire


# Reasons stored with a quarantine or a refusal: a line that names a version and a full
# digest (64 hex) with room for the verifier's words, not an essay.
MAX_AUDIT_REASON = 512


@dataclass(frozen=True)
class RevokeToken(Command):
    """Withdraw a join token before it is used: no member admits anyone with it any more."""
    op: ClassVar[str] = "revoke_token"
    token_id: str
    actor: str = ""

    @classmethod
    def from_wire(cls, raw: dict) -> "RevokeToken":
        return cls(token_id=read_str(raw, "token_id", max_len=64), actor=read_actor(raw))


@dataclass(frozen=True)
class Quarantine(Command):
    """A member's re-attestation showed software the policy does not know: its workloads
    move and it gets no secrets until fresh evidence the policy accepts (`Attested`)."""
    op: ClassVar[str] = "quarantine"
    node_id: str
    reason: str  # names the version and the full package digest the evidence showed
    software: str = ""  # that digest
    actor: str = ""

    @classmethod
    def from_wire(cls, raw: dict) -> "Quarantine":
        return cls(node_id=read_str(raw, "node_id", max_len=64),
                   reason=read_str(raw, "reason", max_len=MAX_AUDIT_REASON),
                   software=read_digest(raw, "software") if "software" in raw else "", actor=read_actor(raw))


# What a refusal recorded in the audit was: a join refused by a verdict, or a member's
# failed re-attestation that did not lead to a quarantine or revocation of its own.
REFUSED_ACTIONS = frozenset({"join-refused", "attestation-failed"})


@dataclass(frozen=True)
class RecordRefusal(Command):
    """A member refused a join (or evidence): into the site's audit, so every member of the
    mesh sees who tried, from where and why (meshd.node.refusals decides what is recorded)."""
    op: ClassVar[str] = "record_refusal"
    action: str  # one of REFUSED_ACTIONS
    target: str  # who tried: the name and node id it claimed (unverified), or its address
    source: str  # from where: the peer address it came from
    reason: str
    count: int = 1  # refusals of this kind from this source that this record stands for
    actor: str = ""  # the member that refused

    @classmethod
    def from_wire(cls, raw: dict) -> "RecordRefusal":
        action = read_str(raw, "action", max_len=32)
        if action not in REFUSED_ACTIONS:
            raise Invalid(f"action must be one of {', '.join(sorted(REFUSED_ACTIONS))}")
        return cls(action=action, target=read_str(raw, "target", max_len=256),
                   source=read_str(raw, "source", max_len=64, empty=True),
                   reason=read_str(raw, "reason", max_len=MAX_AUDIT_REASON),
                   count=read_int(raw, "count", 1, MAX_INT), actor=read_actor(raw))


@dataclass(frozen=True)
class RotateSecret(Command):
    """Reserve the next Raft secret epoch."""
    op: ClassVar[str] = "rotate_secret"
    actor: str = ""

    @classmethod
    def from_wire(cls, raw: dict) -> "RotateSecret":
        return cls(actor=read_actor(raw))


@dataclass(frozen=True)
class Checkpoint(Command):
    """The leader's digest of the log it had applied (SiteState.chain after `applied`
    entries): a member whose own digest at that point differs holds another history than the
    site's, and stops serving it (sitestate._checkpoint)."""
    op: ClassVar[str] = "checkpoint"
    applied: int
    chain: str  # hex

    @classmethod
    def from_wire(cls, raw: dict) -> "Checkpoint":
        chain = read_str(raw, "chain", max_len=64)
        if len(chain) != 2 * CHAIN_BYTES or any(c not in "0123456789abcdef" for c in chain):
            raise Invalid(f"chain must be {2 * CHAIN_BYTES} hex digits")
        return cls(applied=read_int(raw, "applied"), chain=chain)


# A history digest's length (SiteState.chain): 128 bits, a collision is out of reach of chance.
CHAIN_BYTES = 16


@dataclass(frozen=True)
class CreateToken(Command):
    op: ClassVar[str] = "create_token"
    token_id: str
    site: str
    secret: str
    expires_at: float
    actor: str = ""

    @classmethod
    def from_wire(cls, raw: dict) -> "CreateToken":
        return cls(token_id=read_str(raw, "token_id", max_len=64), site=read_str(raw, "site", max_len=63),
                   secret=read_str(raw, "secret", max_len=128), expires_at=read_num(raw, "expires_at"),
                   actor=read_actor(raw))


@dataclass(frozen=True)
class _TokenHolder(Command):
    """A verified joiner and the token it holds."""
    token_id: str
    node: NodeRecord
    actor: str = ""

    @classmethod
    def from_wire(cls, raw: dict) -> "_TokenHolder":
        return cls(token_id=read_str(raw, "token_id", max_len=64), node=node_from_wire(raw.get("node")),
                   actor=read_actor(raw))

    def to_wire(self) -> dict:
        return {"token_id": self.token_id, "node": node_to_wire(self.node), "actor": self.actor}


@dataclass(frozen=True)
class AdmitNode(_TokenHolder):
    """A verified joiner becomes a member (the token is consumed)."""
    op: ClassVar[str] = "admit_node"


@dataclass(frozen=True)
class FoundSite(_TokenHolder):
    """A verified joiner founds a new site of this mesh with a founder token of this site."""
    op: ClassVar[str] = "found_site"


@dataclass(frozen=True)
class Heartbeat(Command):
    """A member's report: its lease, resources when they moved, and allocation news."""
    op: ClassVar[str] = "heartbeat"
    node_id: str
    seq: int
    reports: tuple[AllocReport, ...] = ()
    resources: NodeResources | None = None
    boot_id: str | None = None
    software: str | None = None  # the package digest of the meshd it runs (sent with boot_id)
    artifacts: tuple[str, ...] | None = None  # the artifacts it holds, when that changed

    @classmethod
    def from_wire(cls, raw: dict) -> "Heartbeat":
        reports = raw.get("reports", [])
        if not isinstance(reports, list):
            raise Invalid("reports must be a list")
        return cls(node_id=read_str(raw, "node_id", max_len=64), seq=read_int(raw, "seq", 0),
                   reports=tuple(AllocReport.from_wire(r) for r in reports),
                   resources=resources_from_wire(raw["resources"]) if "resources" in raw else None,
                   boot_id=read_str(raw, "boot_id", max_len=64) if "boot_id" in raw else None,
                   software=read_digest(raw, "software") if "software" in raw else None,
                   artifacts=read_artifact_digests(raw, "artifacts") if "artifacts" in raw else None)

    def to_wire(self) -> dict:
        wire: dict = {"node_id": self.node_id, "seq": self.seq, "reports": [r.to_wire() for r in self.reports]}
        if self.resources is not None:
            wire["resources"] = asdict(self.resources)
        if self.boot_id is not None:
            wire["boot_id"] = self.boot_id
        if self.software is not None:
            wire["software"] = self.software
        if self.artifacts is not None:
            wire["artifacts"] = list(self.artifacts)
        return wire


@dataclass(frozen=True)
class SetLiveness(Command):
    """The leader's verdict on a member's lease: ready or down."""
    op: ClassVar[str] = "set_liveness"
    node_id: str
    liveness: str
    reason: str = ""

    @classmethod
    def from_wire(cls, raw: dict) -> "SetLiveness":
        liveness = read_str(raw, "liveness", max_len=16)
        if liveness not in ("ready", "down"):
            raise Invalid("liveness must be ready or down")
        return cls(node_id=read_str(raw, "node_id", max_len=64), liveness=liveness,
                   reason=read_text(raw, "reason", 256))


@dataclass(frozen=True)
class SubmitApp(Command):
    """Deploy or update an app (with the mesh-document edit it carries, if any). `hold`: the
    site takes the edit in but does not run it yet (its wave of the app's rollout has not
    opened, meshd.waves); the same command without `hold` opens it later."""
    op: ClassVar[str] = "submit_app"
    spec: AppSpec
    edit: AppEdit | None = None
    actor: str = ""
    hold: bool = False

    @classmethod
    def from_wire(cls, raw: dict) -> "SubmitApp":
        spec_raw = raw.get("spec")
        if not isinstance(spec_raw, dict):
            raise Invalid("spec must be a mapping")
        try:
            app_spec = specmod.parse_app_dict(spec_raw)
        except specmod.SpecError as e:
            raise Invalid(str(e)) from None
        hold = raw.get("hold", False)
        if not isinstance(hold, bool):
            raise Invalid("hold must be true or false")
        edit = _edit_from_wire(raw)
        if hold and edit is None:
            raise Invalid("hold needs the mesh edit it holds")
        return cls(spec=app_spec, edit=edit, actor=read_actor(raw), hold=hold)

    def to_wire(self) -> dict:
        wire: dict = {"spec": specmod.spec_to_dict(self.spec), "actor": self.actor}
        if self.edit is not None:
            wire["edit"] = self.edit.to_plain()
        if self.hold:
            wire["hold"] = True
        return wire


@dataclass(frozen=True)
class StopApp(Command):
    op: ClassVar[str] = "stop_app"
    app: str
    edit: AppEdit | None = None
    actor: str = ""

    @classmethod
    def from_wire(cls, raw: dict) -> "StopApp":
        return cls(app=read_str(raw, "app", max_len=63), edit=_edit_from_wire(raw), actor=read_actor(raw))

    def to_wire(self) -> dict:
        wire: dict = {"app": self.app, "actor": self.actor}
        if self.edit is not None:
            wire["edit"] = self.edit.to_plain()
        return wire


def _edit_from_wire(raw: dict) -> AppEdit | None:
    edit = raw.get("edit")
    if edit is None:
        return None
    try:
        return AppEdit.from_plain(edit)
    except SchemaError as e:
        raise Invalid(f"edit: {e.reason}") from None


@dataclass(frozen=True)
class ApplyPlan(Command):
    """The leader's placement plan for one app: new allocations and stops."""
    op: ClassVar[str] = "apply_plan"
    app: str
    version: int
    placements: tuple[Placement, ...] = ()  # each of this app and version
    stops: tuple[tuple[str, str], ...] = ()  # (alloc_id, reason)

    @classmethod
    def from_wire(cls, raw: dict) -> "ApplyPlan":
        plan = read_mapping(raw, "plan")
        placements = []
        raw_placements = plan.get("placements", [])
        for p in raw_placements if isinstance(raw_placements, list) else []:
            if not isinstance(p, dict):
                raise Invalid("each placement must be a mapping")
            placements.append((read_str(p, "alloc_id", max_len=64), read_int(p, "replica", 0, 100_000),
                               read_str(p, "node_id", max_len=64)))
        stops = plan.get("stops", [])
        if not isinstance(stops, list) or not all(
                isinstance(s, list) and len(s) == 2 and all(isinstance(x, str) for x in s) for s in stops):
            raise Invalid("stops must be a list of [alloc_id, reason]")
        app, version = read_str(plan, "app", max_len=63), read_int(plan, "version", 1)
        return cls(app=app, version=version,
                   placements=tuple(Placement(alloc_id=alloc_id, app=app, version=version, replica=replica,
                                              node_id=node_id) for alloc_id, replica, node_id in placements),
                   stops=tuple((s[0], s[1]) for s in stops))

    def to_wire(self) -> dict:
        return {"plan": {"app": self.app, "version": self.version,
                         "placements": [{"alloc_id": p.alloc_id, "replica": p.replica, "node_id": p.node_id}
                                        for p in self.placements],
                         "stops": [list(s) for s in self.stops]}}


# What a Rollout command may do: the operator's moves and the leader's (meshd.rollout).
OPERATOR_ACTIONS = ("promote", "pause", "resume", "cancel")  # audited as the operator's acts
# "abort": the app's rollout across sites was cancelled or failed elsewhere (meshd.waves): the
# site returns from that rollout's version, whether its deployment still runs or succeeded.
ROLLOUT_ACTIONS = OPERATOR_ACTIONS + ("await", "succeed", "fail", "abort")


@dataclass(frozen=True)
class Rollout(Command):
    """A move of an app's deployment: an operator's (promote, pause, resume, cancel) or the
    leader's verdict (await promotion, succeed, fail). `version` is the deployment's: a
    move meant for an older one is refused, never applied to a newer one."""
    op: ClassVar[str] = "rollout"
    app: str
    version: int
    action: str
    reason: str = ""
    actor: str = ""

    @classmethod
    def from_wire(cls, raw: dict) -> "Rollout":
        action = read_str(raw, "action", max_len=16)
        if action not in ROLLOUT_ACTIONS:
            raise Invalid(f"action must be one of {', '.join(ROLLOUT_ACTIONS)}")
        return cls(app=read_str(raw, "app", max_len=63), version=read_int(raw, "version", 1), action=action,
                   reason=read_text(raw, "reason", 512), actor=read_actor(raw))


@dataclass(frozen=True)
class PinVersion(Command):
    """Keep (or stop keeping) one version of an app in its history whatever its limit."""
    op: ClassVar[str] = "pin_version"
    app: str
    version: int
    pinned: bool = True
    actor: str = ""

    @classmethod
    def from_wire(cls, raw: dict) -> "PinVersion":
        pinned = raw.get("pinned", True)
        if not isinstance(pinned, bool):
            raise Invalid("pinned must be true or false")
        return cls(app=read_str(raw, "app", max_len=63), version=read_int(raw, "version", 1), pinned=pinned,
                   actor=read_actor(raw))


@dataclass(frozen=True)
class _NodeAdmin(Command):
    """An operator's change to one member's admin state."""
    node: str  # id, name or unique id prefix
    actor: str = ""

    @classmethod
    def from_wire(cls, raw: dict) -> "_NodeAdmin":
        return cls(node=read_str(raw, "node", max_len=64), actor=read_actor(raw))


@dataclass(frozen=True)
class PurgeApps(Command):
    """The leader's: forget stopped apps whose retention ran out (their records, finished
    allocations and the mesh edit this site took in; the mesh document keeps their history)."""
    op: ClassVar[str] = "purge_apps"
    apps: tuple[str, ...]
    retention: float  # seconds an app stays after its stop, as the proposer counted them

    @classmethod
    def from_wire(cls, raw: dict) -> "PurgeApps":
        apps = raw.get("apps")
        if not isinstance(apps, list) or not 1 <= len(apps) <= MAX_PURGE or not all(
                isinstance(a, str) and 0 < len(a) <= 63 for a in apps):
            raise Invalid(f"apps must be a list of 1 to {MAX_PURGE} app names")
        return cls(apps=tuple(apps), retention=read_num(raw, "retention", 0.0, MAX_RETENTION))

    def to_wire(self) -> dict:
        return {"apps": list(self.apps), "retention": self.retention}


# A purge names at most this many apps: one command stays a small log entry; a backlog goes
# in several passes.
MAX_PURGE = 500
# A retention a leader's command carries (purge, audit trim): ten years, more than any
# operator's setting (meshd.config bounds those), so a junk value is refused, not obeyed.
MAX_RETENTION = 10 * 365 * 86400.0


@dataclass(frozen=True)
class TrimAudit(Command):
    """The leader's: forget the site's own audit records numbered `upto_seq` or less once the
    mesh document holds them (or has summed them up) and they are older than `retention`, the
    document retention as the proposer counted it. The document is the audit's durable record
    (with its own retention); the site keeps only what it has not published, and the newest
    record, from which publishing goes on."""
    op: ClassVar[str] = "trim_audit"
    upto_seq: int
    retention: float

    @classmethod
    def from_wire(cls, raw: dict) -> "TrimAudit":
        return cls(upto_seq=read_int(raw, "upto_seq", 1),
                   retention=read_num(raw, "retention", 0.0, MAX_RETENTION))

    def to_wire(self) -> dict:
        return {"upto_seq": self.upto_seq, "retention": self.retention}


@dataclass(frozen=True)
class Drain(_NodeAdmin):
    op: ClassVar[str] = "drain"


@dataclass(frozen=True)
class Undrain(_NodeAdmin):
    op: ClassVar[str] = "undrain"


@dataclass(frozen=True)
class RemoveNode(_NodeAdmin):
    """Forget a member gone for good (down, or left) without revoking it: it leaves the site
    (and, by the leader, the Raft configuration); a non-voter takes its voter place."""
    op: ClassVar[str] = "remove_node"


@dataclass(frozen=True)
class AddArtifact(Command):
    """A signed artifact manifest joins the site's catalog (meshd.artifacts.catalog)."""
    op: ClassVar[str] = "add_artifact"
    manifest: dict
    actor: str = ""

    @classmethod
    def from_wire(cls, raw: dict) -> "AddArtifact":
        return cls(manifest=read_mapping(raw, "manifest"), actor=read_actor(raw))


@dataclass(frozen=True)
class RemoveArtifact(Command):
    """An artifact no kept app version pins leaves the catalog; members drop their copies."""
    op: ClassVar[str] = "remove_artifact"
    digest: str
    actor: str = ""

    @classmethod
    def from_wire(cls, raw: dict) -> "RemoveArtifact":
        digest = raw.get("digest")
        if not isinstance(digest, str) or not _ARTIFACT_DIGEST.fullmatch(digest):
            raise Invalid("digest must be sha256:<64 hex digits>")
        return cls(digest=digest, actor=read_actor(raw))


COMMANDS: dict[str, type[Command]] = {c.op: c for c in (
    Bootstrap, SetPolicy, AdoptPolicy, RevokeNode, AdoptRevocations, Attested, RotateSecret, CreateToken, AdmitNode,
    FoundSite, Heartbeat, SetLiveness, SubmitApp, StopApp, ApplyPlan, PurgeApps, TrimAudit, Drain, Undrain, Quarantine,
    RecordRefusal, RevokeToken, RemoveNode, Rollout, PinVersion, Checkpoint, AddArtifact, RemoveArtifact)}


@dataclass(frozen=True)
class Envelope:
    """What every wire command carries besides its own fields."""

    ts: float  # the proposer's clock: the only time the state machine knows
    request_id: str | None = None  # retries of one request carry the same id and apply once
    # A leader's decision (liveness, plans, rollouts, revocations, attestation outcomes): the
    # Raft term it was made in. The state machine refuses it when it is committed in a later
    # term: it was made by a leader that has lost its leadership since (sitestate.apply).
    term: int | None = None


def encode(command: Command, envelope: Envelope) -> dict:
    wire = {"op": command.op, "ts": envelope.ts, **command.to_wire()}
    if envelope.request_id is not None:
        wire["request_id"] = envelope.request_id
    if envelope.term is not None:
        wire["term"] = envelope.term
    return wire


def decode_envelope(raw: Any) -> Envelope | Refused:
    if not isinstance(raw, dict):
        return Refused(MALFORMED, "command is not a mapping")
    op = raw.get("op")
    if not isinstance(op, str) or op not in COMMANDS:
        return Refused(UNKNOWN_COMMAND, f"unknown command {op!r}")
    request_id = raw.get("request_id")
    if request_id is not None and (not isinstance(request_id, str) or not 0 < len(request_id) <= 128):
        return Refused(MALFORMED, "request_id must be a string of 1..128 characters")
    ts = raw.get("ts")
    if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not 0 <= ts < MAX_INT:
        return Refused(MALFORMED, "ts must be a timestamp")
    term = raw.get("term")
    if term is not None and (not isinstance(term, int) or isinstance(term, bool) or not 0 <= term <= MAX_INT):
        return Refused(MALFORMED, "term must be a Raft term")
    return Envelope(ts=float(ts), request_id=request_id, term=term)


def decode_body(raw: dict) -> Command | Refused:
    """The typed command of a wire dict whose envelope decoded (`decode_envelope`), or why
    its fields do not hold. Never raises."""
    try:
        return COMMANDS[raw["op"]].from_wire(raw)
    except Invalid as e:
        return e.refused()
    except Exception as e:  # a reader bug must not wedge Raft
        return Refused(INTERNAL, f"internal error reading command: {type(e).__name__}: {e}")


def decode(raw: Any) -> tuple[Envelope, Command] | Refused:
    """The typed command of a wire dict, or why it is not one. Never raises."""
    envelope = decode_envelope(raw)
    if isinstance(envelope, Refused):
        return envelope
    body = decode_body(raw)
    return body if isinstance(body, Refused) else (envelope, body)
