"""Transcript files: `command args` lines, each followed by `----` and the output expected.

    # a comment
    deploy svc replicas=3
    ----
    n1: submit_app -> ok

A blank line ends an output block. `run_file(path, execute, rewrite=True)` writes the
actual output back into the file instead of comparing (pytest --rewrite), like etcd's
datadriven tests: review the diff, commit it.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

SEPARATOR = "----"


@dataclass(frozen=True)
class Case:
    line: int  # 1-based line of the command
    command: str
    expected: str
    comments: tuple[str, ...]  # comment and blank lines before the command, as written


def parse(text: str) -> list[Case]:
    cases, lines, i, pending = [], text.splitlines(), 0, []
    while i < len(lines):
        line = lines[i]
        if not line.strip() or line.lstrip().startswith("#"):
            pending.append(line)
            i += 1
            continue
        command, start = line.strip(), i + 1
        i += 1
        if i >= len(lines) or lines[i].strip() != SEPARATOR:
            raise ValueError(f"line {start}: {SEPARATOR!r} expected after the command {command!r}")
        i += 1
        output = []
        while i < len(lines) and lines[i].strip():
            output.append(lines[i])
            i += 1
        cases.append(Case(start, command, "\n".join(output), tuple(pending)))
        pending = []
    return cases


def split(command: str) -> tuple[str, list[str], dict[str, str]]:
    """`name pos1 pos2 key=value ...` -> (name, positional, keyword)."""
    words = shlex.split(command)
    positional = [w for w in words[1:] if "=" not in w]
    keyword = dict(w.split("=", 1) for w in words[1:] if "=" in w)
    return words[0], positional, keyword


def run_file(path: Path, execute: Callable[[str], str], rewrite: bool = False) -> list[str]:
    """Run every case in order; the mismatches (empty when all match, or after a rewrite)."""
    cases = parse(path.read_text())
    problems, written = [], []
    for case in cases:
        actual = execute(case.command).rstrip("\n")
        if rewrite:
            written.extend([*case.comments, case.command, SEPARATOR, *([actual] if actual else [])])
        elif actual != case.expected:
            problems.append(f"{path.name}:{case.line}: {case.command}\n--- expected\n{case.expected}\n"
                            f"--- actual\n{actual}")
    if rewrite:
        path.write_text("\n".join(written) + "\n")
    return problems
