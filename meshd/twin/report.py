"""What `meshd sim` writes: the timeline (human and `timeline.jsonl`), `summary.json`, and a
picture of the run (`run.svg`).

The picture reads without the text: per site (up to MAX_PANELS sites), replicas running
against replicas wanted over time, and one lane per node coloured by its state (leader, up,
draining, cut off, paused, down, revoked), with every failure marked where it happened and
every cut between sites shaded until it healed. A fleet of more sites is drawn as one chart of
the whole fleet and one strip per site, coloured by the share of its replicas running (upper
half) and the share on the newest version it took in (lower half: how far a rollout came).

Invariants:
- Pure and deterministic: the same run gives the same bytes (no clock, no random, numbers
  formatted to fixed precision, keys sorted).
"""

from __future__ import annotations

import json
from html import escape

from meshd.twin.run import Twin

MAX_PANELS = 8  # sites drawn one panel each; more are strips (a page of 100 panels reads as nothing)
MAX_LANES = 40  # node lanes per panel; a bigger site shows its nodes' states as counts
WIDTH = 1000
LEFT = 150  # room for names
RIGHT = 20
CHART_H = 110
LANE_H = 9
STRIP_H = 12
COLOURS = {"leader": "#1b7f3b", "up": "#5cb85c", "draining": "#f0ad4e", "cut off": "#9b59b6", "paused": "#5bc0de",
           "down": "#d9534f", "revoked": "#333333"}
FAILURE_COLOUR = "#c0392b"
NEWEST_COLOUR = "#2ca02c"
CUT_COLOUR = "#f5cba7"


def timeline_text(twin: Twin) -> str:
    width = max((len(e["site"]) for e in twin.timeline), default=4)
    return "".join(f"{e['t']:>12.3f}  {e['site']:<{width}}  {e['text']}\n" for e in twin.timeline)


def timeline_jsonl(twin: Twin) -> str:
    return "".join(json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n" for e in twin.timeline)


def summary_json(twin: Twin) -> str:
    return json.dumps(twin.summary(), sort_keys=True, indent=2) + "\n"


def summary_text(summary: dict) -> str:
    lines = [f"scenario {summary['scenario']} (seed {summary['seed']}): {summary['duration_s']:g} s simulated",
             f"placed {summary['placed']} replica(s); below wanted {summary['below_wanted']['replica_seconds']:g} "
             f"replica-seconds (at most {summary['below_wanted']['max']} at once)"]
    for item in summary["unplaced"]:
        lines.append(f"unplaced in {item['site']}: {item['app']} x{item['missing']}: {'; '.join(item['reasons'])}")
    for f in summary["failures"]:
        back = "not recovered" if f["recovered_after_s"] is None else f"recovered after {f['recovered_after_s']:g} s"
        lines.append(f"{f['kind']} {f['target']} at {f['at']:g} s ({f['replicas_lost']} replica(s) lost"
                     + (", the leader" if f["leader_lost"] else "") + f"): {back}")
    for c in summary["cuts"]:
        healed = "never healed" if c["healed_at"] is None else (
            f"healed at {c['healed_at']:g} s, " + ("not converged" if c["converged_after_s"] is None else
                                                  f"converged {c['converged_after_s']:g} s later with "
                                                  f"{c['bytes_to_converge']} bytes"))
        lines.append(f"cut {'-'.join(c['between'])} at {c['at']:g} s: {healed}")
    links = summary["bytes_between_sites"]
    if 0 < len(links) <= 6:
        lines.append("bytes between sites: " + ", ".join(f"{k} {v}" for k, v in links.items()))
    elif links:
        busiest = max(links, key=lambda k: (links[k], k))
        lines.append(f"bytes between sites: {sum(links.values())} on {len(links)} links (busiest {busiest}: "
                     f"{links[busiest]})")
    for c in summary["conflicts"]:
        lines.append(f"conflict on {c['app']}: {c['winner_site']} won over {', '.join(c['losers'])}")
    return "\n".join(lines) + "\n"


# --- the picture -----------------------------------------------------------------------

def _fmt_time(t: float) -> str:
    if t >= 2 * 86400:
        return f"{t / 86400:.1f}d"
    if t >= 2 * 3600:
        return f"{t / 3600:.1f}h"
    if t >= 600:
        return f"{t / 60:.0f}m"
    return f"{t:.0f}s"


class _Canvas:
    def __init__(self, duration: float) -> None:
        self.duration = max(duration, 1e-6)
        self.parts: list[str] = []
        self.y = 10

    def x(self, t: float) -> float:
        return LEFT + (WIDTH - LEFT - RIGHT) * min(max(t, 0.0), self.duration) / self.duration

    def add(self, text: str) -> None:
        self.parts.append(text)

    def text(self, x: float, y: float, s: str, size: int = 11, anchor: str = "start", colour: str = "#222") -> None:
        self.add(f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{colour}">'
                 f'{escape(s)}</text>')

    def rect(self, x0: float, y: float, x1: float, h: float, colour: str, title: str = "") -> None:
        inner = f"<title>{escape(title)}</title>" if title else ""
        self.add(f'<rect x="{x0:.1f}" y="{y:.1f}" width="{max(x1 - x0, 0.5):.1f}" height="{h:.1f}" fill="{colour}">'
                 f'{inner}</rect>' if inner else
                 f'<rect x="{x0:.1f}" y="{y:.1f}" width="{max(x1 - x0, 0.5):.1f}" height="{h:.1f}" fill="{colour}"/>')


def _steps(points: list[tuple[float, object]], end: float) -> list[tuple[float, float, object]]:
    """(from, to, value) spans of a step function."""
    return [(t, points[i + 1][0] if i + 1 < len(points) else end, v) for i, (t, v) in enumerate(points)]


def _chart(c: _Canvas, title: str, running: list, wanted: list, end: float, marks: list, cuts: list,
           newest: list | None = None) -> None:
    top = c.y
    c.text(10, top + 14, title, size=13)
    peak = max([float(v) for _, v in running + wanted] + [1.0])
    def y(v: float) -> float:
        return top + CHART_H - 10 - (CHART_H - 30) * float(v) / peak
    c.add(f'<rect x="{LEFT}" y="{top + 10}" width="{WIDTH - LEFT - RIGHT}" height="{CHART_H - 20}" fill="#fafafa" '
          f'stroke="#ddd"/>')
    for start, stop in cuts:
        c.rect(c.x(start), top + 10, c.x(stop), CHART_H - 20, CUT_COLOUR, "cut off from another site")
    lines = [("wanted", wanted, 'stroke="#888" stroke-dasharray="5,3"'),
             ("running", running, 'stroke="#1f77b4" stroke-width="2"')]
    if newest is not None and newest != running:  # only when a newer edit is not everywhere at once
        lines.append(("on the newest version", newest, f'stroke="{NEWEST_COLOUR}" stroke-width="1.5" '
                                                       f'stroke-dasharray="2,2"'))
    for label, series, style in lines:
        path = []
        for start, stop, v in _steps(series, end):
            path.append(f"{'M' if not path else 'L'}{c.x(start):.1f},{y(v):.1f} L{c.x(stop):.1f},{y(v):.1f}")
        if path:
            c.add(f'<path d="{" ".join(path)}" fill="none" {style}><title>{label}</title></path>')
    c.text(LEFT - 6, y(peak) + 4, f"{peak:g}", anchor="end", size=10)
    c.text(LEFT - 6, y(0) + 4, "0", anchor="end", size=10)
    c.text(LEFT - 40, top + CHART_H / 2, "replicas", anchor="end", size=10, colour="#666")
    for t, label in marks:
        c.add(f'<line x1="{c.x(t):.1f}" y1="{top + 10}" x2="{c.x(t):.1f}" y2="{top + CHART_H - 10}" '
              f'stroke="{FAILURE_COLOUR}" stroke-width="1.5"><title>{escape(label)}</title></line>')
        c.text(c.x(t) + 2, top + 20, label, size=9, colour=FAILURE_COLOUR)
    c.y += CHART_H


def _lanes(c: _Canvas, twin: Twin, site: str, end: float) -> None:
    names = sorted(twin.sites[site].nodes)
    if len(names) > MAX_LANES:
        c.text(LEFT, c.y + 10, f"{len(names)} nodes: lanes shown for the first {MAX_LANES}", size=10, colour="#666")
        c.y += 14
        names = names[:MAX_LANES]
    for name in names:
        c.text(LEFT - 6, c.y + LANE_H - 1, name, size=9, anchor="end")
        for start, stop, state in _steps(twin.series.points.get(f"node/{site}/{name}", []), end):
            c.rect(c.x(start), c.y, c.x(stop), LANE_H - 2, COLOURS.get(str(state), "#ccc"), f"{name}: {state}")
        c.y += LANE_H
    c.y += 8


def _axis(c: _Canvas, end: float) -> None:
    c.add(f'<line x1="{LEFT}" y1="{c.y}" x2="{WIDTH - RIGHT}" y2="{c.y}" stroke="#444"/>')
    for i in range(11):
        t = end * i / 10
        c.add(f'<line x1="{c.x(t):.1f}" y1="{c.y}" x2="{c.x(t):.1f}" y2="{c.y + 4}" stroke="#444"/>')
        c.text(c.x(t), c.y + 15, _fmt_time(t), size=10, anchor="middle")
    c.y += 24


def _legend(c: _Canvas) -> None:
    """Node states, then the chart's lines and marks, wrapped to the page's width."""
    items: list[tuple[str, str]] = []  # (label, the mark's SVG at x=0, y=0)
    for state, colour in COLOURS.items():
        items.append((state, f'<rect x="0" y="0" width="10" height="10" fill="{colour}"/>'))
    items += [("running", '<line x1="0" y1="5" x2="18" y2="5" stroke="#1f77b4" stroke-width="2"/>'),
              ("wanted", '<line x1="0" y1="5" x2="18" y2="5" stroke="#888" stroke-dasharray="5,3"/>'),
              ("newest version", f'<line x1="0" y1="5" x2="18" y2="5" stroke="{NEWEST_COLOUR}" stroke-width="1.5" '
                                 f'stroke-dasharray="2,2"/>'),
              ("failure", f'<line x1="8" y1="0" x2="8" y2="10" stroke="{FAILURE_COLOUR}" stroke-width="1.5"/>'),
              ("cut from other sites", f'<rect x="0" y="0" width="18" height="10" fill="{CUT_COLOUR}"/>')]
    x = LEFT
    for label, mark in items:
        width = 30 + 6 * len(label)
        if x + width > WIDTH - RIGHT:
            x, c.y = LEFT, c.y + 16
        c.add(f'<g transform="translate({x},{c.y})">{mark}</g>')
        c.text(x + 22, c.y + 9, label, size=10)
        x += width
    c.y += 22


def picture(twin: Twin) -> str:
    end = twin.now
    c = _Canvas(end)
    c.text(10, c.y + 14, f"{twin.scenario.name}: seed {twin.seed}, {_fmt_time(end)} simulated", size=15)
    c.y += 26
    _legend(c)
    cuts_of: dict[str, list] = {}
    for cut in twin.cuts:
        for site in cut.between:
            cuts_of.setdefault(site, []).append((cut.at, cut.healed_at if cut.healed_at is not None else end))
    marks_of: dict[str, list] = {}
    for f in twin.failures:
        marks_of.setdefault(f.site, []).append((f.at, f"{f.kind} {f.target}"))
    series = twin.series.points
    names = list(twin.sites)
    if len(names) <= MAX_PANELS:
        for site in names:
            _chart(c, f"site {site}", series.get(f"site/{site}/running", []), series.get(f"site/{site}/wanted", []),
                   end, marks_of.get(site, []), cuts_of.get(site, []), series.get(f"site/{site}/newest", []))
            _lanes(c, twin, site, end)
    else:
        running, wanted, newest = _fleet(twin, names)
        _chart(c, f"the fleet ({len(names)} sites)", running, wanted, end,
               [m for site in names for m in marks_of.get(site, [])], [], newest)
        c.y += 6
        c.text(LEFT, c.y + 10, "each site, share of wanted replicas: upper half running, lower half on the newest "
                               "version (green: all, red: none)", size=10, colour="#666")
        c.y += 14
        half = (STRIP_H - 2) / 2
        for site in names:
            c.text(LEFT - 6, c.y + STRIP_H - 2, site, size=9, anchor="end")
            wanted_of = series.get(f"site/{site}/wanted", [])
            for row, (key, what) in enumerate((("running", "running"), ("newest", "on the newest version"))):
                share = _share(series.get(f"site/{site}/{key}", []), wanted_of)
                for start, stop, value in _steps(share, end):
                    c.add(f'<rect x="{c.x(start):.1f}" y="{c.y + row * half:.1f}" '
                          f'width="{max(c.x(stop) - c.x(start), 0.5):.1f}" height="{half:.1f}" '
                          f'fill="{_shade(float(value))}"><title>{escape(site)}: {value:.0%} {what}</title></rect>')
            for a, b in cuts_of.get(site, []):
                c.add(f'<rect x="{c.x(a):.1f}" y="{c.y:.1f}" width="{max(c.x(b) - c.x(a), 0.5):.1f}" '
                      f'height="{STRIP_H - 2}" fill="none" stroke="#9b59b6"><title>cut off</title></rect>')
            c.y += STRIP_H
        c.y += 8
    _axis(c, end)
    height = c.y + 10
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
            f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif">\n'
            f'<rect width="{WIDTH}" height="{height}" fill="white"/>\n' + "\n".join(c.parts) + "\n</svg>\n")


def _merge(series: list[list]) -> list[tuple[float, float]]:
    """The sum of step functions."""
    times = sorted({t for s in series for t, _ in s})
    out, index, current = [], [0] * len(series), [0.0] * len(series)
    for t in times:
        for i, s in enumerate(series):
            while index[i] < len(s) and s[index[i]][0] <= t:
                current[i] = float(s[index[i]][1])
                index[i] += 1
        total = sum(current)
        if not out or out[-1][1] != total:
            out.append((t, total))
    return out


def _fleet(twin: Twin, names: list[str]) -> tuple[list, list, list]:
    points = twin.series.points
    running, wanted, newest = (_merge([points.get(f"site/{s}/{key}", []) for s in names])
                               for key in ("running", "wanted", "newest"))
    return running, wanted, newest


def _share(running: list, wanted: list) -> list[tuple[float, float]]:
    times = sorted({t for t, _ in running} | {t for t, _ in wanted})
    out: list[tuple[float, float]] = []
    r = w = 0.0
    ri = wi = 0
    for t in times:
        while ri < len(running) and running[ri][0] <= t:
            r = float(running[ri][1])
            ri += 1
        while wi < len(wanted) and wanted[wi][0] <= t:
            w = float(wanted[wi][1])
            wi += 1
        value = 1.0 if w == 0 else min(1.0, r / w)
        if not out or out[-1][1] != value:
            out.append((t, value))
    return out


def _shade(share: float) -> str:
    red, green = int(217 - 125 * share), int(83 + 101 * share)
    return f"#{red:02x}{green:02x}{int(79 + 13 * share):02x}"
