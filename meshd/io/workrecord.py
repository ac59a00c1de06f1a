"""What this node last ran, kept on its own: the record a member whose Raft data was damaged
runs from while it rebuilds the site's state (meshd.node.worker), as an offline node runs
what its journal's state says.

Invariants:
- Written whole or not at all (meshd.io.identity.write_atomic) each time the worker sets its
  workloads from a state that is the site's, and sealed with a checksum of its bytes.
- Read once, at start. A record that is missing, damaged or not of this form is said in one
  warning and stands for nothing (the node then runs nothing until it holds the site's
  state): never a part of one.
- A full disk only leaves the previous record in place (a warning): it never stops a
  workload from being set.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import zlib
from pathlib import Path

from meshd.io.identity import write_atomic
from meshd.node.effects import Workload
from meshd.state import ArtifactRef, HealthCheck, ResourceRequest

log = logging.getLogger("meshd.daemon")

RECORD_FILE = "workloads.json"
# A record is the workloads of one node; a file larger than this is not one (read at start only).
MAX_RECORD_BYTES = 16 * 1024 * 1024


def _wire(workload: Workload) -> dict:
    return {"alloc_id": workload.alloc_id, "app": workload.app, "command": list(workload.command),
            "env": dict(workload.env), "restart_policy": workload.restart_policy, "site": workload.site,
            "health": dataclasses.asdict(workload.health), "limits": dataclasses.asdict(workload.limits),
            "user": workload.user,
            "artifacts": [{"name": a.name, "digest": a.digest, "unpack": a.unpack} for a in workload.artifacts]}


def _workload(raw: object) -> Workload:
    """One workload of a record; ValueError/TypeError/KeyError for anything else."""
    if not isinstance(raw, dict):
        raise ValueError("not an object")
    health = dict(raw["health"])
    health["command"] = tuple(str(part) for part in health.get("command", ()))
    command, env = raw["command"], raw["env"]
    if not (isinstance(command, list) and all(isinstance(p, str) for p in command)):
        raise ValueError("command")
    if not (isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
        raise ValueError("env")
    fields = (raw["alloc_id"], raw["app"], raw["restart_policy"], raw["site"])
    if not all(isinstance(f, str) for f in fields):
        raise ValueError("names")
    limits = dict(raw.get("limits", {}))  # (a record from before limits were enforced has none)
    wanted = limits.pop("devices", [])
    if not (all(isinstance(v, (int, float)) and v >= 0 for v in limits.values())
            and all(isinstance(k, str) and isinstance(n, int) and n > 0 for k, n in wanted)):
        raise ValueError("limits")
    limits["devices"] = tuple((k, n) for k, n in wanted)
    artifacts = tuple(ArtifactRef(name=str(a["name"]), digest=str(a["digest"]), unpack=bool(a["unpack"]))
                      for a in raw.get("artifacts", []))
    return Workload(alloc_id=raw["alloc_id"], app=raw["app"], command=tuple(command), env=env,
                    restart_policy=raw["restart_policy"], health=HealthCheck(**health), site=raw["site"],
                    limits=ResourceRequest(**limits), user=str(raw.get("user", "")), artifacts=artifacts)


def encode(workloads: tuple[Workload, ...]) -> bytes:
    body = json.dumps([_wire(w) for w in workloads], sort_keys=True, separators=(",", ":")).encode()
    return json.dumps({"crc32": zlib.crc32(body), "workloads": body.decode()}).encode()


def decode(data: bytes) -> tuple[Workload, ...]:
    """The workloads a record holds; ValueError naming what is wrong with it."""
    try:
        outer = json.loads(data)
        body = outer["workloads"].encode()
        if zlib.crc32(body) != outer["crc32"]:
            raise ValueError("its checksum does not match")
        items = json.loads(body)
        if not isinstance(items, list):
            raise ValueError("not a list of workloads")
        return tuple(_workload(item) for item in items)
    except ValueError as e:
        raise ValueError(str(e) or "not JSON") from None
    except (TypeError, KeyError, AttributeError, UnicodeError) as e:
        raise ValueError(f"not a record of workloads ({type(e).__name__}: {e})") from None


def save(data_dir: Path, workloads: tuple[Workload, ...]) -> None:
    try:
        write_atomic(data_dir / RECORD_FILE, encode(workloads))
    except OSError as e:
        log.warning("the record of this node's workloads was not written; the previous one stays",
                    extra={"reason": e.strerror or str(e)})


def load(data_dir: Path) -> tuple[Workload, ...] | None:
    """The last record, or None (missing or damaged: said in a warning)."""
    path = data_dir / RECORD_FILE
    try:
        if path.stat().st_size > MAX_RECORD_BYTES:
            raise ValueError(f"larger than {MAX_RECORD_BYTES} bytes")
        return decode(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning(f"{path} is damaged ({e}); this node runs nothing from it")
        return None
