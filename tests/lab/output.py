"""A program's output read line by line as it arrives, each line stamped with time.monotonic().

For peers and observers run on lab hosts (Serf agents, avahi-browse): what they report and when
is read from their output, by a thread that drains the pipe so the program never blocks on it.
"""

from __future__ import annotations

import subprocess
import threading
import time
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class StampedOutput(Generic[T]):
    def __init__(self, proc: subprocess.Popen, parse: Callable[[str, float], T | None], what: str):
        self.items: list[T] = []  # what `parse` made of the lines, in arrival order
        self.lines: list[str] = []
        self._what = what
        self._changed = threading.Condition()
        threading.Thread(target=self._read, args=(proc, parse), daemon=True).start()

    def _read(self, proc: subprocess.Popen, parse: Callable[[str, float], T | None]) -> None:
        for line in proc.stdout:
            item = parse(line, time.monotonic())
            with self._changed:
                self.lines.append(line.rstrip())
                if item is not None:
                    self.items.append(item)
                self._changed.notify_all()

    def wait(self, matches: Callable[[T], bool], timeout: float, what: str) -> T:
        """The first item that `matches`, waiting up to `timeout` seconds for it to arrive."""
        return self._wait(lambda: next((item for item in self.items if matches(item)), None), timeout,
                          f"report {what}")

    def wait_line(self, text: str, timeout: float) -> None:
        """Until a line containing `text` has arrived."""
        self._wait(lambda: any(text in line for line in self.lines) or None, timeout, f"print {text!r}")

    def _wait(self, find: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        with self._changed:
            while (found := find()) is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = "\n".join(self.lines[-20:])
                    raise TimeoutError(f"{self._what} did not {what} within {timeout:g}s:\n{tail}")
                self._changed.wait(left)
            return found
