"""Human renderings of admin results: aligned tables and `key: value` blocks.

Invariants:
- Pure text in, text out: no I/O, no clock (local time conversion uses the timestamp given).
- Every cell is one line of printable text: control characters that reached us from other
  nodes (names, messages, labels) are shown escaped, never sent to the terminal raw.
- A missing or null value shows as "-", so columns never collapse.
"""

from __future__ import annotations

import datetime as _dt
import json
from typing import Any, Callable, Iterable, Mapping, Sequence

Column = tuple[str, "str | Callable[[Mapping[str, Any]], Any]"]

MISSING = "-"
# Two spaces between columns: the convention of ps, kubectl and nomad alike.
COLUMN_GAP = "  "
# Node ids are long hex digests; this many characters are unique in any real mesh and are
# accepted back as a prefix by the daemon.
SHORT_ID_CHARS = 12


def _printable(text: str) -> str:
    """Escape control characters (C0, DEL, C1) so one cell stays one harmless line."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable() or ch == " ":
            out.append(ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def cell(value: Any) -> str:
    """Format one value for a table cell or a `key: value` line."""
    if value is None or value == "":
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}".rstrip("0").rstrip(".") if value == value else "nan"
    if isinstance(value, Mapping):
        if not value:
            return MISSING
        return ",".join(f"{cell(k)}={cell(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        if not value:
            return MISSING
        if all(not isinstance(v, (Mapping, list, tuple)) for v in value):
            return ",".join(cell(v) for v in value)
        return _printable(json.dumps(value, separators=(",", ":")))
    return _printable(str(value))


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """Rows as aligned columns under upper-case headers; no trailing spaces or newline.

    A column is (header, key) or (header, callable(row) -> value).
    """
    grid = [[header for header, _ in columns]]
    for row in rows:
        grid.append([cell(_value(row, source)) for _, source in columns])
    widths = [max(len(line[i]) for line in grid) for i in range(len(columns))]
    lines = []
    for line in grid:
        padded = [text.ljust(width) for text, width in zip(line, widths)]
        lines.append(COLUMN_GAP.join(padded).rstrip())
    return "\n".join(lines)


def _value(row: Mapping[str, Any], source: Any) -> Any:
    if callable(source):
        return source(row)
    return row.get(source)


def key_values(obj: Mapping[str, Any], order: Iterable[str] = ()) -> str:
    """`key: value` lines, keys in `order` first, then the rest as the daemon sent them."""
    ordered = [k for k in order if k in obj]
    ordered += [k for k in obj if k not in ordered]
    if not ordered:
        return ""
    width = max(len(_printable(str(k))) for k in ordered) + 1
    return "\n".join(f"{(_printable(str(k)) + ':').ljust(width)} {cell(obj[k])}" for k in ordered)


def local_time(ts: Any) -> str:
    """Epoch seconds as local ISO time to the second; anything else is shown as given."""
    if isinstance(ts, bool) or not isinstance(ts, (int, float)):
        return cell(ts)
    try:
        moment = _dt.datetime.fromtimestamp(ts).astimezone()
    except (OverflowError, OSError, ValueError):
        return cell(ts)
    return moment.isoformat(timespec="seconds")


def short_id(value: Any) -> str:
    text = cell(value)
    return text[:SHORT_ID_CHARS]


def ratio(numerator_key: str, denominator_key: str) -> Callable[[Mapping[str, Any]], str]:
    def show(row: Mapping[str, Any]) -> str:
        return f"{cell(row.get(numerator_key))}/{cell(row.get(denominator_key))}"

    return show


def with_unit(key: str, unit: str) -> Callable[[Mapping[str, Any]], str | None]:
    def show(row: Mapping[str, Any]) -> str | None:
        value = row.get(key)
        return None if value is None else f"{cell(value)} {unit}"

    return show


# --- the columns of each listing ---------------------------------------------------

NODE_COLUMNS: list[Column] = [
    ("NAME", "name"),
    ("ID", lambda r: short_id(r.get("node_id"))),
    ("SITE", "site"),
    ("STATE", "state"),
    ("ROLE", "role"),
    ("ADDRESS", "address"),
    ("ARCH", "arch"),
    ("CPU FREE", "cpu_free"),
    ("MEM FREE", with_unit("mem_free_mb", "MiB")),
    ("ALLOCS", "allocs"),
    ("EVIDENCE", lambda r: str(r.get("evidence", "")).split(" ")[0]),
    # another site's members (`--site`): their health over its last minute (meshd.fleethealth)
    ("CPU P50/95", lambda r: f"{r['cpu_p50']}/{r['cpu_p95']}%" if r.get("cpu_p50") is not None else None),
    ("MEM P50/95", lambda r: f"{r['mem_p50']}/{r['mem_p95']}%" if r.get("mem_p50") is not None else None),
    ("CGROUP", "cgroup"),
    ("ENFORCES", lambda r: ",".join(r.get("enforces") or ()) or None),
    ("DEVICES", lambda r: ",".join(f"{k}={v}" for k, v in sorted((r.get("devices") or {}).items())) or None),
    ("LABELS", "labels"),
]

def _per_site(row: Mapping[str, Any]) -> str | None:
    """`a 2/2, b 0/2*`: running/desired in each site the app names (* = still on an older version)."""
    sites = row.get("per_site")
    if not isinstance(sites, list):
        return None
    return ", ".join(f"{cell(p.get('site'))} {cell(p.get('running'))}/{cell(p.get('desired'))}"
                     + ("" if p.get("current") else "*") for p in sites if isinstance(p, Mapping))


APP_COLUMNS: list[Column] = [
    ("APP", "app"),
    ("VERSION", "version"),
    ("STATUS", "status"),
    ("RUNNING/REPLICAS", ratio("running", "replicas")),
    ("SITES", "sites"),
    ("PER SITE", _per_site),
    ("CONFLICTS", "conflicts"),
]

TOP_COLUMNS: list[Column] = [
    ("NODE", "node"),
    ("ALLOC", lambda r: r.get("alloc_id") or "-"),
    ("APP", "app"),
    ("STATE", lambda r: r.get("state") or (f"not answering: {r['unreachable']}" if r.get("unreachable") else None)),
    ("CPU %", "cpu_percent"),
    ("CPU LIMIT", "cpu_limit"),
    ("MEMORY", with_unit("memory_mb", "MiB")),
    ("LIMIT", with_unit("memory_limit_mb", "MiB")),
    ("PIDS LIMIT", "pids_limit"),
    ("RESTARTS", "restarts"),
]

ALLOC_COLUMNS: list[Column] = [
    ("ALLOC", "alloc_id"),
    ("APP", "app"),
    ("VERSION", "version"),
    ("NODE", "node"),
    ("STATE", "state"),
    ("HEALTH", lambda r: r.get("health") or "none"),
    ("CANARY", lambda r: "yes" if r.get("canary") else ""),
    ("PID", "pid"),
    ("RESTARTS", "restarts"),
    ("REASON", "reason"),
]


def _last_sync(row: Mapping[str, Any]) -> str | None:
    age = row.get("last_sync_s")
    if isinstance(age, bool) or not isinstance(age, (int, float)):
        return None
    return f"{age:.0f}s ago"


SITE_COLUMNS: list[Column] = [
    ("SITE", "site"),
    ("NODES", "nodes"),
    ("READY", "ready"),
    ("LEADER", "leader"),
    ("LAST SYNC", _last_sync),
    ("REACHABLE", "reachable"),
]

EVENT_COLUMNS: list[Column] = [
    ("TIME", lambda r: local_time(r.get("ts"))),
    ("KIND", "kind"),
    ("MESSAGE", "message"),
]

AUDIT_COLUMNS: list[Column] = [
    ("TIME", lambda r: local_time(r.get("ts"))),
    ("ACTOR", "actor"),
    ("ACTION", "action"),
    ("TARGET", "target"),
    ("SITE", "site"),
    ("REASON", lambda r: r.get("reason") or ""),
]

TOKEN_COLUMNS: list[Column] = [
    ("ID", "token_id"),
    ("SITE", lambda r: f"{r.get('site')} (new)" if r.get("founds_site") else r.get("site")),
    ("STATE", "state"),
    ("CREATED", lambda r: local_time(r.get("created_at")) if r.get("created_at") else "-"),
    ("BY", lambda r: r.get("created_by") or "-"),
    ("EXPIRES", lambda r: local_time(r.get("expires_at"))),
    ("USED BY", lambda r: r.get("used_by") or r.get("revoked_by") and f"revoked by {r['revoked_by']}" or "-"),
]

ARTIFACT_COLUMNS: list[Column] = [
    ("NAME", "name"),
    ("DIGEST", lambda r: str(r.get("digest", ""))[:19]),
    ("SIZE", lambda r: human_bytes(r.get("size"))),
    ("HOLDERS", "holders"),
    ("PINNED BY", "pinned_by"),
    ("PUSHED", lambda r: local_time(r.get("pushed_at")) if r.get("pushed_at") else "-"),
]


def human_bytes(size: Any) -> str:
    if not isinstance(size, (int, float)) or isinstance(size, bool):
        return MISSING
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{int(size)} B"


def push_progress(item: Mapping[str, Any]) -> str:
    """`pushing model.onnx 37 % (12.0 MB of 32.4 MB)`"""
    done, total = item.get("done", 0), item.get("total", 0)
    percent = 100 * done // total if isinstance(total, int) and total > 0 and isinstance(done, int) else 100
    return f"pushing {_printable(str(item.get('pushing', '')))} {percent} % ({human_bytes(done)} of {human_bytes(total)})"


REVOCATION_COLUMNS: list[Column] = [
    ("TIME", lambda r: local_time(r.get("at"))),
    ("NODE", lambda r: r.get("name") or r.get("node_id", "")[:SHORT_ID_CHARS]),
    ("ISSUED IN", "site"),
    ("BY", "by"),
    ("LIST", lambda r: "taking in" if r.get("pending") else "listed"),
    ("REASON", "reason"),
]

def _deployment_sites(row: Mapping[str, Any]) -> str:
    """`lab: running 2/3 healthy, 1 canary` for each site of a deployment row."""
    parts = []
    for site, part in sorted((row.get("sites") or {}).items()):
        if not isinstance(part, Mapping):
            continue
        text = f"{site}: {cell(part.get('state'))}"
        if part.get("healthy") is not None:
            text += f" {cell(part.get('healthy'))}/{cell(part.get('desired'))} healthy"
        if part.get("canaries"):
            text += f", {cell(part.get('canaries'))} canary"
        if part.get("wave") is not None:
            text += f" (wave {cell(part.get('wave'))})"
        parts.append(text)
    return "; ".join(parts)


DEPLOYMENT_COLUMNS: list[Column] = [
    ("APP", "app"),
    ("VERSION", lambda r: f"v{cell(r.get('version'))}" + (" (revert)" if r.get("revert") else "")),
    ("FROM", lambda r: f"v{r['from_version']}" if r.get("from_version") else "-"),
    ("STATE", "state"),
    ("SITES", _deployment_sites),
    ("STARTED", lambda r: local_time(r.get("started_at"))),
    ("REASON", lambda r: r.get("reason") or ""),
]

HISTORY_COLUMNS: list[Column] = [
    ("VERSION", lambda r: f"v{cell(r.get('version'))}" + (" *" if r.get("current") else "")),
    ("STATE", "state"),
    ("SUBMITTED", lambda r: local_time(r.get("submitted_at"))),
    ("BY", "by"),
    ("SITE", "site"),
    ("SPEC", lambda r: cell(r.get("spec_digest")).removeprefix("sha256:")[:12]),
    ("PINNED", lambda r: "yes" if r.get("pinned") else ""),
    ("REASON", lambda r: r.get("reason") or ""),
]

PLACEMENT_COLUMNS: list[Column] = [("NODE", "node"), ("REPLICA", "replica")]
FILTERED_COLUMNS: list[Column] = [("NODE", "node"), ("REASON", "reason")]
UNPLACED_COLUMNS: list[Column] = [("REPLICA", "replica"), ("REASON", "reason")]

STATUS_ORDER = ("node_id", "name", "site", "role", "leader", "term", "members", "partitioned")
DEPLOY_ORDER = ("app", "version", "accepted", "running", "replicas")


def event_line(event: Mapping[str, Any]) -> str:
    """One event as a single line, for `events --follow`."""
    return COLUMN_GAP.join(
        [local_time(event.get("ts")), cell(event.get("kind")), cell(event.get("message"))]
    )


def plan(result: Mapping[str, Any]) -> str:
    """A dry run: where replicas would go, then which nodes were ruled out and why."""
    placements = result.get("placements") or []
    filtered = result.get("filtered") or []
    unplaced = result.get("unplaced") or []
    others = {k: v for k, v in result.items() if k not in ("placements", "filtered", "unplaced", "stops", "moves",
                                                            "notes")}
    parts = []
    if others:
        parts.append(key_values(others, order=("app", "version")))
    parts.append("Placements:\n" + table(placements, PLACEMENT_COLUMNS))
    parts.append("Filtered:\n" + table(filtered, FILTERED_COLUMNS))
    if unplaced:
        parts.append("Cannot place:\n" + table(unplaced, UNPLACED_COLUMNS))
    if "moves" in result:
        parts.append("What would move (the site's replicas, after the what-if):\n" + table(
            result.get("moves") or [], [("APP", "app"), ("REPLICA", "replica"), ("TO", "to"), ("REASON", "reason")]))
    for note in result.get("notes") or []:
        parts.append(f"note: {_printable(str(note))}")
    return "\n\n".join(parts)


def deploy_progress(item: Mapping[str, Any]) -> str:
    """`vibration-monitor v2: 4/6 running, 3 healthy, 2 old still serving (deployment running)`
    from one --wait progress item."""
    if "waves_open" in item:  # a rollout across sites, wave by wave
        return (f"{cell(item.get('app'))} v{cell(item.get('version'))}: rollout {cell(item.get('state'))}, "
                f"{cell(item.get('waves_open'))} wave(s) open; {_deployment_sites(item)}")
    text = (f"{cell(item.get('app'))} v{cell(item.get('version'))}: "
            f"{cell(item.get('running'))}/{cell(item.get('replicas'))} running")
    deployment = item.get("deployment")
    if isinstance(deployment, Mapping):
        if deployment.get("healthy") is not None:
            text += f", {cell(deployment.get('healthy'))} healthy"
        if deployment.get("canaries"):
            text += f", {cell(deployment.get('canaries'))} canary"
        if deployment.get("old"):
            text += f", {cell(deployment.get('old'))} old still serving"
        text += f" (deployment {cell(deployment.get('state'))})"
    return text
