"""A `meshd sim` scenario: its TOML form, checked whole before anything runs.

A scenario names the fleet (sites and their nodes, by name or by generator), the links
between sites, the apps it deploys, and what happens when (failures and operator actions).
docs/sim.md describes every key; examples/sim/ holds worked scenarios.

Invariants:
- Pure: `parse(text, base)` reads only the text, and app files named by `file =` through
  the `read` callable it is given (relative to the scenario's directory).
- All or nothing: any unknown key, wrong type, impossible value, negative or too late time,
  or name that does not exist (a node, site, app or link) is one ScenarioError naming the
  dotted key and its line; no scenario is returned, so nothing runs.
- Every node name is unique across the scenario (events name nodes without their site).
- Events are kept in time order; events at the same time keep the order of the file.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from meshd import spec as specmod
from meshd.state import AppSpec
from meshd.twin.site import Profile

# A twin's fleet is bounded by what one process simulates in useful time; a million nodes is
# a bug in a generator, not a fleet.
MAX_NODES = 200_000
MAX_SITES = 10_000
MAX_EVENTS = 100_000
MAX_APPS = 10_000
# A year of simulated time: long enough for any soak or cut, short enough to finish.
MAX_DURATION = 366 * 86400.0
MAX_TEXT = 4 * 2**20  # characters of scenario text
MAX_COUNT = 100_000  # nodes of one generator
DEFAULT_DURATION = 600.0

EVENT_KINDS = {
    # kind: (required keys, optional keys)
    "kill": (("node",), ()),
    "restart": (("node",), ()),
    "pause": (("node",), ("for",)),
    "resume": (("node",), ()),
    "reboot": (("node",), ("for", "offline")),
    "partition": (("nodes",), ("for",)),
    "heal": ((), ("nodes", "between")),
    "cut": (("between",), ("for",)),
    "deploy": (("app",), ("via",)),
    "scale": (("app", "replicas"), ("via",)),
    "stop": (("app",), ("via",)),
    "drain": (("node",), ()),
    "undrain": (("node",), ()),
    "revoke": (("node",), ("reason",)),
    "rollout": (("app", "action"), ("site",)),
}
ROLLOUT_ACTIONS = ("promote", "pause", "resume", "cancel")
_COMMON_EVENT_KEYS = ("at", "do", "note")

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|min|m|h|d)\s*$")
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit)\s*$", re.IGNORECASE)
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class ScenarioError(ValueError):
    """A scenario refused: `key` is the dotted key that is wrong, `line` its line (0: the file)."""

    def __init__(self, key: str, line: int, reason: str) -> None:
        self.key, self.line, self.reason = key, line, reason
        super().__init__(f"line {line}: {key}: {reason}" if line else f"{key}: {reason}")


@dataclass(frozen=True)
class NodeSpec:
    name: str
    site: str
    profile: Profile


@dataclass(frozen=True)
class SiteSpec:
    name: str
    nodes: tuple[NodeSpec, ...]


@dataclass(frozen=True)
class LinkSpec:
    a: str
    b: str
    delay: float = 0.02  # seconds one way
    loss: float = 0.0  # share of messages lost
    bandwidth: float | None = None  # bits per second; None: not limited

    @property
    def key(self) -> tuple[str, str]:
        return link_key(self.a, self.b)


def link_key(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


@dataclass(frozen=True)
class Event:
    at: float
    kind: str
    line: int
    index: int  # its place in the file
    node: str = ""
    nodes: tuple[str, ...] = ()
    between: tuple[str, str] | None = None
    app: str = ""
    via: str = ""
    replicas: int = 0
    action: str = ""
    site: str = ""
    duration: float | None = None  # `for`: undone this long after
    offline: bool = False
    reason: str = ""
    note: str = ""


@dataclass(frozen=True)
class Scenario:
    name: str
    duration: float
    seed: int
    tick: float
    sites: tuple[SiteSpec, ...]
    links: tuple[LinkSpec, ...]
    apps: Mapping[str, AppSpec]  # by the id events use (`id`, else the app's name)
    events: tuple[Event, ...]
    nodes: Mapping[str, NodeSpec] = field(default_factory=dict)
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # a [[site]] with count: its sites

    def site_of(self, node: str) -> str:
        return self.nodes[node].site


# --- where keys are --------------------------------------------------------------------

def key_lines(text: str) -> dict[tuple, int]:
    """The line of every table header and `key =` line, by path: array tables carry their
    index (("site", 0, "node", 2, "count")). Written for the scenario's plain layout: one
    key per line; a key inside an inline table is found at its enclosing key's line."""
    lines: dict[tuple, int] = {}
    arrays: dict[tuple, int] = {}
    current: tuple = ()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        array = line.startswith("[[")
        if line.startswith("["):
            end = line.find("]]" if array else "]")
            if end < 0:
                continue
            parts = [p.strip().strip('"\'') for p in line[2 if array else 1:end].split(".")]
            prefix: tuple = ()
            for part in parts[:-1]:
                prefix += (part,)
                if prefix in arrays:
                    prefix += (arrays[prefix],)
            path = prefix + (parts[-1],)
            if array:
                arrays[path] = arrays.get(path, -1) + 1
                path += (arrays[path],)
            current = path
            lines.setdefault(current, number)
            continue
        if "=" in line:
            key = line.split("=", 1)[0].strip()
            parts = tuple(p.strip().strip('"\'') for p in key.split("."))
            lines.setdefault(current + parts, number)
    return lines


class _Where:
    def __init__(self, lines: dict[tuple, int]) -> None:
        self.lines = lines

    def line(self, path: tuple) -> int:
        for end in range(len(path), 0, -1):
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return 0

    def error(self, path: tuple, reason: str) -> ScenarioError:
        return ScenarioError(dotted(path), self.line(path), reason)


def dotted(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# --- values ----------------------------------------------------------------------------

def seconds(value: object) -> float | None:
    """A duration: a number of seconds, or a string with a unit (40ms, 5s, 10m, 2h, 7d)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    return None


def bits_per_second(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        m = _RATE.match(value)
        if m:
            return float(m.group(1)) * _RATE_UNITS[m.group(2).lower()]
    return None


# --- the scenario ----------------------------------------------------------------------

_TOP = ("sim", "site", "link", "app", "event")
_SIM = ("name", "duration", "seed", "tick")
_SITE = ("name", "count", "node")
_NODE = ("name", "count", "arch", "cpu", "memory_mb", "devices", "labels")
_LINK = ("between", "delay", "loss", "bandwidth")
_ARCHES = ("x86_64", "aarch64", "armv7l", "riscv64")


def parse(text: str, read: Callable[[str], str] | None = None) -> Scenario:
    """The scenario of `text`, checked whole; `read(path)` gives the text of an app file."""
    if len(text) > MAX_TEXT:
        raise ScenarioError("scenario", 0, f"is {len(text)} characters, at most {MAX_TEXT} allowed")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        raise ScenarioError("toml", int(m.group(1)) if m else 0, str(e)) from None
    except (RecursionError, ValueError) as e:
        raise ScenarioError("toml", 0, f"invalid: {e}") from None
    where = _Where(key_lines(text))
    _known(doc, (), _TOP, where)
    sim = _table(doc.get("sim", {}), ("sim",), where)
    _known(sim, ("sim",), _SIM, where)
    name = _text(sim.get("name", "scenario"), ("sim", "name"), where)
    duration = _duration(sim.get("duration", DEFAULT_DURATION), ("sim", "duration"), where, positive=True)
    if duration > MAX_DURATION:
        raise where.error(("sim", "duration"), f"at most {MAX_DURATION / 86400:g} days")
    seed = sim.get("seed", 1)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise where.error(("sim", "seed"), f"must be a whole number from 0, got {specmod.show_value(seed)}")
    tick = _duration(sim.get("tick", 0.1), ("sim", "tick"), where, positive=True)
    if not 0.01 <= tick <= 1.0:
        raise where.error(("sim", "tick"), "must be from 10ms to 1s (the daemon's own loops run at 0.1 s)")

    sites, nodes, groups = _sites(doc.get("site"), where)
    links = _links(doc.get("link", []), {s.name for s in sites}, groups, where)
    apps = _apps(doc.get("app", []), {s.name for s in sites}, groups, where, read)
    events = _events(doc.get("event", []), duration, sites, nodes, links, apps, where)
    return Scenario(name=name, duration=duration, seed=seed, tick=tick, sites=sites, links=links, apps=apps,
                    events=events, nodes=nodes, groups=groups)


def _known(table: Mapping, path: tuple, allowed: tuple, where: _Where) -> None:
    for key in table:
        if key not in allowed:
            raise where.error(path + (key,), f"unknown key (known here: {', '.join(allowed)})")


def _table(value: object, path: tuple, where: _Where) -> Mapping:
    if not isinstance(value, Mapping):
        raise where.error(path, f"must be a table, got {specmod.show_value(value)}")
    return value


def _array(value: object, path: tuple, where: _Where, of: str) -> list:
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise where.error(path, f"must be an array of tables ([[{dotted(path)}]]), one per {of}")
    return value


def _text(value: object, path: tuple, where: _Where) -> str:
    if not isinstance(value, str) or not value or len(value) > 200 or any(ord(c) < 32 for c in value):
        raise where.error(path, f"must be a line of text, got {specmod.show_value(value)}")
    return value


def _name(value: object, path: tuple, where: _Where) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise where.error(path, f"must be a name of lowercase letters, digits and '-', got {specmod.show_value(value)}")
    return value


def _duration(value: object, path: tuple, where: _Where, positive: bool = False) -> float:
    found = seconds(value)
    if found is None:
        raise where.error(path, f"must be seconds or a duration like 40ms, 5s, 10m, 2h, 7d, got "
                                f"{specmod.show_value(value)}")
    if found < 0 or (positive and found == 0):
        raise where.error(path, f"must be {'more than 0' if positive else '0 or more'}, got {specmod.show_value(value)}")
    return found


def _number(value: object, path: tuple, where: _Where, low: float, high: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise where.error(path, f"must be {what} from {low:g} to {high:g}, got {specmod.show_value(value)}")
    return float(value)


def _sites(value: object, where: _Where) -> tuple[tuple[SiteSpec, ...], dict[str, NodeSpec],
                                                 dict[str, tuple[str, ...]]]:
    """The sites, their nodes, and the groups: a [[site]] with `count = N` is the sites NAME-1
    to NAME-N, each with the nodes given, named SITE-NODE (so names stay unique)."""
    if value is None:
        raise ScenarioError("site", 0, "is required: at least one [[site]] with its [[site.node]]s")
    sites: list[SiteSpec] = []
    nodes: dict[str, NodeSpec] = {}
    groups: dict[str, tuple[str, ...]] = {}
    tables = _array(value, ("site",), where, "site")
    for i, site in enumerate(tables):
        path = ("site", i)
        _known(site, path, _SITE, where)
        if "name" not in site:
            raise where.error(path + ("name",), "is required")
        name = _name(site["name"], path + ("name",), where)
        count = site.get("count")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_SITES):
            raise where.error(path + ("count",), f"must be a whole number from 1 to {MAX_SITES}, got "
                                                 f"{specmod.show_value(count)}")
        names = [name] if count is None else [f"{name}-{k}" for k in range(1, count + 1)]
        if count is not None:
            groups[name] = tuple(names)
        if "node" not in site:
            raise where.error(path + ("node",), "is required: a site has at least one [[site.node]]")
        for site_name in names:
            if any(s.name == site_name for s in sites) or site_name in groups and site_name != name:
                raise where.error(path + ("name",), f"site {site_name} is named twice")
            members: list[NodeSpec] = []
            for j, node in enumerate(_array(site["node"], path + ("node",), where, "node or generator")):
                npath = path + ("node", j)
                _known(node, npath, _NODE, where)
                for made in _generate(node, npath, site_name, where, prefix=f"{site_name}-" if count else ""):
                    if made.name in nodes:
                        raise where.error(npath + ("name",), f"node {made.name} is named twice (names are unique "
                                                             f"across the scenario)")
                    nodes[made.name] = made
                    members.append(made)
                    if len(nodes) > MAX_NODES:
                        raise where.error(npath + ("count",), f"more than {MAX_NODES} nodes in the scenario")
            sites.append(SiteSpec(name=site_name, nodes=tuple(members)))
            if len(sites) > MAX_SITES:
                raise where.error(path, f"more than {MAX_SITES} sites in the scenario")
    return tuple(sites), nodes, groups


def _generate(node: Mapping, path: tuple, site: str, where: _Where, prefix: str = "") -> list[NodeSpec]:
    if "name" not in node:
        raise where.error(path + ("name",), "is required")
    base = prefix + _name(node["name"], path + ("name",), where)
    count = node.get("count")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_COUNT):
        raise where.error(path + ("count",), f"must be a whole number from 1 to {MAX_COUNT}, got "
                                             f"{specmod.show_value(count)}")
    arch = node.get("arch", "x86_64")
    if arch not in _ARCHES:
        raise where.error(path + ("arch",), f"must be one of {', '.join(_ARCHES)}, got {specmod.show_value(arch)}")
    cpu = _number(node.get("cpu", 4), path + ("cpu",), where, 0.1, 4096, "cores")
    mem = _number(node.get("memory_mb", 4096), path + ("memory_mb",), where, 16, 2**30, "MB")
    if not float(mem).is_integer():
        raise where.error(path + ("memory_mb",), f"must be a whole number of MB, got {mem:g}")
    devices = _table(node.get("devices", {}), path + ("devices",), where)
    for kind, n in devices.items():
        if not isinstance(kind, str) or not _NAME.match(kind):
            raise where.error(path + ("devices", kind), "a device kind is a name like gpu")
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 1024:
            raise where.error(path + ("devices", kind), f"must be a count from 0 to 1024, got {specmod.show_value(n)}")
    labels = _table(node.get("labels", {}), path + ("labels",), where)
    for k, v in labels.items():
        problem = specmod.label_key_problem(k) or specmod.label_value_problem(v)
        if problem:
            raise where.error(path + ("labels", k), problem)
    profile = Profile(arch=arch, labels=tuple(sorted(labels.items())), cpu=cpu, mem_mb=int(mem),
                      devices=tuple(sorted((k, n) for k, n in devices.items() if n)))
    names = [base] if count is None else [f"{base}-{i}" for i in range(1, count + 1)]
    for made in names:
        if len(made) > 63:
            raise where.error(path + ("name",), f"{made} is longer than 63 characters")
    return [NodeSpec(name=n, site=site, profile=profile) for n in names]


def _pair(value: object, path: tuple, where: _Where, sites: set[str]) -> tuple[str, str]:
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
        raise where.error(path, f"must be two site names, got {specmod.show_value(value)}")
    for name in value:
        if name not in sites:
            raise where.error(path, f"no site {name} in the scenario")
    if value[0] == value[1]:
        raise where.error(path, "a link joins two different sites")
    return link_key(value[0], value[1])


def _links(value: object, sites: set[str], groups: Mapping[str, tuple[str, ...]], where: _Where
           ) -> tuple[LinkSpec, ...]:
    """Links; a group on one side is a link to each of its sites."""
    links: dict[tuple[str, str], LinkSpec] = {}
    for i, link in enumerate(_array(value, ("link",), where, "link")):
        path = ("link", i)
        _known(link, path, _LINK, where)
        if "between" not in link:
            raise where.error(path + ("between",), "is required: the two sites it joins")
        between = link["between"]
        pairs: list[tuple[str, str]] = []
        if isinstance(between, list) and len(between) == 2 and all(isinstance(v, str) for v in between) \
                and any(v in groups for v in between):
            if all(v in groups for v in between):
                raise where.error(path + ("between",), "at most one side may be a group of sites")
            one, group = (between[0], between[1]) if between[1] in groups else (between[1], between[0])
            pairs = [_pair([one, member], path + ("between",), where, sites) for member in groups[group]]
        else:
            pairs = [_pair(between, path + ("between",), where, sites)]
        for a, b in pairs:
            if (a, b) in links:
                raise where.error(path + ("between",), f"the link between {a} and {b} is given twice")
            links[(a, b)] = _link(link, path, where, a, b)
    return tuple(links.values())


def _link(link: Mapping, path: tuple, where: _Where, a: str, b: str) -> LinkSpec:
    delay = _duration(link.get("delay", 0.02), path + ("delay",), where)
    if delay > 60:
        raise where.error(path + ("delay",), "at most 60 s one way")
    loss = _number(link.get("loss", 0.0), path + ("loss",), where, 0.0, 0.99, "a share")
    bandwidth = None
    if "bandwidth" in link:
        bandwidth = bits_per_second(link["bandwidth"])
        if bandwidth is None or bandwidth < 1000:
            raise where.error(path + ("bandwidth",), f"must be a rate like 256kbit or 10mbit (at least 1kbit), "
                                                    f"got {specmod.show_value(link['bandwidth'])}")
    return LinkSpec(a=a, b=b, delay=delay, loss=loss, bandwidth=bandwidth)


def _expand(names: object, groups: Mapping[str, tuple[str, ...]]) -> object:
    """Site names with each group's name replaced by its sites (anything else as it is)."""
    if not isinstance(names, list):
        return names
    out: list = []
    for name in names:
        out += list(groups[name]) if isinstance(name, str) and name in groups else [name]
    return out


def _apps(value: object, sites: set[str], groups: Mapping[str, tuple[str, ...]], where: _Where,
          read: Callable[[str], str] | None) -> dict[str, AppSpec]:
    """Apps by id: `id` names one spec of an app for events (two versions of one app need
    two ids); without it the app's name. A group in `sites` or a wave's `sites` is its sites."""
    apps: dict[str, AppSpec] = {}
    tables = _array(value, ("app",), where, "app")
    if len(tables) > MAX_APPS:
        raise where.error(("app",), f"{len(tables)} apps, at most {MAX_APPS}")
    for i, table in enumerate(tables):
        path = ("app", i)
        table = dict(table)
        handle = table.pop("id", None)
        if handle is not None:
            handle = _name(handle, path + ("id",), where)
        if "sites" in table:
            table["sites"] = _expand(table["sites"], groups)
        rollout = table.get("rollout")
        if isinstance(rollout, Mapping) and isinstance(rollout.get("waves"), list):
            table["rollout"] = {**rollout, "waves": [{**w, "sites": _expand(w["sites"], groups)}
                                                     if isinstance(w, Mapping) and "sites" in w else w
                                                     for w in rollout["waves"]]}
        if "file" in table:
            if len(table) != 1:
                raise where.error(path + ("file",), "an app from a file has no other keys here")
            if read is None:
                raise where.error(path + ("file",), "app files can only be read from a scenario file")
            try:
                app = specmod.parse_app_toml(read(table["file"]))
            except specmod.SpecError as e:
                raise where.error(path + ("file",), f"{table['file']}: {e}") from None
            except (OSError, TypeError) as e:
                raise where.error(path + ("file",), f"cannot read it: {e}") from None
        else:
            try:
                app = specmod.parse_app_dict({"app": table})
            except specmod.SpecError as e:
                sub = tuple(e.key.split(".")[1:]) if e.key.startswith("app") else ()
                raise where.error(path + sub, e.reason) from None
        handle = handle or app.name
        if handle in apps:
            raise where.error(path + ("id" if "id" in table or handle != app.name else "name",),
                              f"{handle} is given twice (two specs of one app need an id each)")
        for target in app.sites:
            if target not in sites:
                raise where.error(path + ("sites",), f"no site {target} in the scenario")
        apps[handle] = app
    return apps


def _events(value: object, duration: float, sites: tuple[SiteSpec, ...], nodes: Mapping[str, NodeSpec],
            links: tuple[LinkSpec, ...], apps: Mapping[str, AppSpec], where: _Where) -> tuple[Event, ...]:
    site_names = {s.name for s in sites}
    link_keys = {link.key for link in links}
    events: list[Event] = []
    tables = _array(value, ("event",), where, "event")
    if len(tables) > MAX_EVENTS:
        raise where.error(("event",), f"{len(tables)} events, at most {MAX_EVENTS}")
    for i, table in enumerate(tables):
        path = ("event", i)
        if "do" not in table:
            raise where.error(path + ("do",), f"is required: one of {', '.join(EVENT_KINDS)}")
        kind = table["do"]
        if kind not in EVENT_KINDS:
            raise where.error(path + ("do",), f"must be one of {', '.join(EVENT_KINDS)}, got {specmod.show_value(kind)}")
        required, optional = EVENT_KINDS[kind]
        _known(table, path, _COMMON_EVENT_KEYS + required + optional, where)
        if "at" not in table:
            raise where.error(path + ("at",), "is required: when it happens (seconds from the start, or 5m)")
        at = seconds(table["at"])
        if at is None:
            raise where.error(path + ("at",), f"must be seconds or a duration like 90s or 5m, got "
                                              f"{specmod.show_value(table['at'])}")
        if at < 0:
            raise where.error(path + ("at",), f"must not be negative, got {specmod.show_value(table['at'])}")
        if at > duration:
            raise where.error(path + ("at",), f"is after the end of the run ({duration:g} s, sim.duration)")
        for key in required:
            if key not in table:
                raise where.error(path + (key,), f"is required for {kind}")
        fields: dict[str, Any] = {}
        for key, raw in table.items():
            kpath = path + (key,)
            if key in ("at", "do"):
                continue
            if key == "node":
                if raw not in nodes:
                    raise where.error(kpath, f"no node {specmod.show_value(raw)} in the scenario")
                fields["node"] = raw
            elif key == "nodes":
                if not (isinstance(raw, list) and raw and all(isinstance(n, str) for n in raw)):
                    raise where.error(kpath, f"must be a list of node names, got {specmod.show_value(raw)}")
                for n in raw:
                    if n not in nodes:
                        raise where.error(kpath, f"no node {specmod.show_value(n)} in the scenario")
                if len({nodes[n].site for n in raw}) > 1:
                    raise where.error(kpath, "nodes cut off together are of one site (a site cut off is `cut`)")
                fields["nodes"] = tuple(raw)
            elif key == "between":
                pair = _pair(raw, kpath, where, site_names)
                if pair not in link_keys:
                    raise where.error(kpath, f"no link between {pair[0]} and {pair[1]} ([[link]])")
                fields["between"] = pair
            elif key in ("app",):
                if raw not in apps:
                    raise where.error(kpath, f"no app {specmod.show_value(raw)} in the scenario ([[app]])")
                fields["app"] = raw
            elif key in ("via", "site"):
                if raw not in site_names:
                    raise where.error(kpath, f"no site {specmod.show_value(raw)} in the scenario")
                fields[key] = raw
            elif key == "replicas":
                if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= specmod.MAX_REPLICAS:
                    raise where.error(kpath, f"must be a whole number from 0 to {specmod.MAX_REPLICAS}, got "
                                             f"{specmod.show_value(raw)}")
                fields["replicas"] = raw
            elif key == "action":
                if raw not in ROLLOUT_ACTIONS:
                    raise where.error(kpath, f"must be one of {', '.join(ROLLOUT_ACTIONS)}, got {specmod.show_value(raw)}")
                fields["action"] = raw
            elif key == "for":
                fields["duration"] = _duration(raw, kpath, where, positive=True)
            elif key == "offline":
                if not isinstance(raw, bool):
                    raise where.error(kpath, f"must be true or false, got {specmod.show_value(raw)}")
                fields["offline"] = raw
            elif key in ("reason", "note"):
                if not isinstance(raw, str) or len(raw) > 200:
                    raise where.error(kpath, "must be a line of text")
                fields[key] = raw
        if kind == "reboot" and "duration" not in fields:
            fields["duration"] = 30.0  # a typical edge box's boot
        events.append(Event(at=at, kind=kind, line=where.line(path), index=i, **fields))
    return tuple(sorted(events, key=lambda e: (e.at, e.index)))
