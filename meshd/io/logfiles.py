"""Size-rotated log files for workload output, and readers for them (tail, follow).

Layout: `output.log` is the file being written; `output.log.1` is the previous one,
`output.log.2` the one before, ... up to `output.log.<keep>`; older content is dropped.

Invariants:
- No file grows beyond `max_bytes`. A write that fits in an empty file is never split: when
  it would push the current file past `max_bytes`, the file is rotated first. Only a single
  write larger than `max_bytes` is cut into `max_bytes` pieces.
- Writes go straight to the OS (unbuffered), so readers see every byte `write` returned for.
- Readers never modify the files; they cope with rotation happening while they read.
- Blocking file calls are used on purpose: they touch only small local files, and the
  supervisor's copy loop must keep the order of the bytes it receives.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import AsyncGenerator, BinaryIO

import trio

# Read granularity for tail/follow: large enough for bursts, small enough to keep each
# step of the event loop short.
READ_CHUNK = 64 * 1024


def iso_time(ts: float) -> str:
    """`ts` (seconds since the epoch) as the logs write times: ISO 8601, milliseconds, the
    local offset (daemon log lines and workload output lines alike)."""
    return datetime.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="milliseconds")


class RotatingLog:
    """Append-only writer of one log file, rotated by size (see the module docstring)."""

    def __init__(self, path: Path, max_bytes: int, keep: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        if keep < 0:
            raise ValueError(f"keep must be 0 or more rotated files, got {keep}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO | None = open(self.path, "ab", buffering=0)
        self._size = os.fstat(self._file.fileno()).st_size

    @property
    def closed(self) -> bool:
        return self._file is None

    def write(self, data: bytes) -> None:
        if self._file is None:
            raise ValueError(f"log {self.path} is closed")
        view = memoryview(data)
        while view:
            if self._size + len(view) > self.max_bytes and (
                len(view) <= self.max_bytes or self._size >= self.max_bytes
            ):
                self._rotate()
            room = self.max_bytes - self._size
            piece = view[:room]
            self._file.write(piece)
            self._size += len(piece)
            view = view[len(piece) :]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        if self.keep == 0:
            self.path.unlink(missing_ok=True)
        else:
            rotated_path(self.path, self.keep).unlink(missing_ok=True)
            for index in range(self.keep - 1, 0, -1):
                older = rotated_path(self.path, index)
                if older.exists():
                    older.rename(rotated_path(self.path, index + 1))
            self.path.rename(rotated_path(self.path, 1))
        self._file = open(self.path, "ab", buffering=0)
        self._size = 0


def rotated_path(path: Path, index: int) -> Path:
    return path.with_name(f"{path.name}.{index}")


def rotated_files(path: Path) -> list[tuple[int, Path]]:
    """The rotated files of `path` that exist now, newest first: [(1, output.log.1), ...]."""
    prefix = path.name + "."
    found = []
    try:
        entries = list(path.parent.iterdir())
    except FileNotFoundError:
        return []
    for entry in entries:
        suffix = entry.name[len(prefix) :]
        if entry.name.startswith(prefix) and suffix.isdigit() and suffix[0] != "0":
            found.append((int(suffix), entry))
    return sorted(found)


def _read_last(file: BinaryIO, end: int, max_bytes: int) -> bytes:
    """Up to the last `max_bytes` of `file` before offset `end`."""
    start = max(0, end - max_bytes)
    return os.pread(file.fileno(), end - start, start)


def _tail_of_rotated(path: Path, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    need = max_bytes
    for _, rotated in rotated_files(path):
        if need <= 0:
            break
        try:
            with open(rotated, "rb", buffering=0) as file:
                data = _read_last(file, os.fstat(file.fileno()).st_size, need)
        except FileNotFoundError:  # rotated away while we looked
            continue
        chunks.append(data)
        need -= len(data)
    return b"".join(reversed(chunks))


def read_tail(path: Path, max_bytes: int) -> bytes:
    """The last `max_bytes` of the log, across its rotated files, oldest byte first."""
    path = Path(path)
    if max_bytes <= 0:
        return b""
    try:
        with open(path, "rb", buffering=0) as file:
            current = _read_last(file, os.fstat(file.fileno()).st_size, max_bytes)
    except FileNotFoundError:
        current = b""
    return _tail_of_rotated(path, max_bytes - len(current)) + current


def _read_to_end(file: BinaryIO) -> bytes:
    chunks = []
    while chunk := file.read(READ_CHUNK):
        chunks.append(chunk)
    return b"".join(chunks)


def _file_id(stat: os.stat_result) -> tuple[int, int]:
    return (stat.st_dev, stat.st_ino)


def _missed_between(path: Path, old: tuple[int, int], new: tuple[int, int]) -> bytes:
    """Content of rotated files newer than file `old` and older than file `new`.

    When the log rotated more than once between two polls, the files in between were
    never opened by the follower; they are read whole, oldest first.
    """
    index_of: dict[tuple[int, int], int] = {}
    paths = dict(rotated_files(path))
    for index, rotated in paths.items():
        try:
            index_of[_file_id(rotated.stat())] = index
        except FileNotFoundError:
            continue
    # old file already dropped: every rotated file is newer than it
    older_than = index_of.get(old, max(paths, default=0) + 1)
    newer_than = index_of.get(new, 0)
    chunks = []
    for index in range(older_than - 1, newer_than, -1):
        try:
            chunks.append(paths[index].read_bytes())
        except (KeyError, FileNotFoundError):
            continue
    return b"".join(chunks)


async def follow(
    path: Path, poll_interval: float = 0.2, *, tail_bytes: int = 0
) -> AsyncGenerator[bytes, None]:
    """Yield bytes appended to the log at `path` from now on, across rotations, until cancelled.

    With `tail_bytes`, first yields the last `tail_bytes` already written (as `read_tail`),
    seamlessly followed by new output. A log that does not exist yet is waited for. Rotation
    is noticed by the file at `path` changing identity (device, inode); the rest of the old
    file is read before switching. A file truncated in place is read again from its start.
    Close it when done: `async with contextlib.aclosing(follow(p)) as chunks: ...`.
    """
    path = Path(path)
    file: BinaryIO | None = None
    try:
        try:
            file = open(path, "rb", buffering=0)
        except FileNotFoundError:
            if tail_bytes > 0 and (backlog := _tail_of_rotated(path, tail_bytes)):
                yield backlog
        else:
            end = os.fstat(file.fileno()).st_size
            file.seek(end)
            if tail_bytes > 0:
                current = _read_last(file, end, tail_bytes)
                backlog = _tail_of_rotated(path, tail_bytes - len(current)) + current
                if backlog:
                    yield backlog
        while True:
            if file is None:
                try:
                    file = open(path, "rb", buffering=0)  # appeared since: read it all
                except FileNotFoundError:
                    await trio.sleep(poll_interval)
                    continue
            data = file.read(READ_CHUNK)  # one piece at a time: a slow reader holds no backlog
            if data:
                yield data
                continue
            own = os.fstat(file.fileno())
            try:
                named = os.stat(path)
            except FileNotFoundError:
                named = None  # between a rotation's rename and the new file's creation
            if named is not None and _file_id(named) != _file_id(own):
                try:
                    new_file = open(path, "rb", buffering=0)
                except FileNotFoundError:
                    await trio.sleep(poll_interval)
                    continue
                rest = _read_to_end(file)
                rest += _missed_between(
                    path, _file_id(own), _file_id(os.fstat(new_file.fileno()))
                )
                file.close()
                file = new_file
                if rest:
                    yield rest
                continue
            if own.st_size < file.tell():
                file.seek(0)  # truncated in place
                continue
            await trio.sleep(poll_interval)
    finally:
        if file is not None:
            file.close()
