"""Log lines that anyone who can reach a port can cause (junk on the peer port, a refused uid
on the admin socket, a bad frame) are let through at most once per EVERY seconds for each
message, with the count of those held back: a flood costs a line every ten seconds, not a
line per connection, and the log still says it is happening and how much.

Invariants:
- The first record of a message is always let through; errors and above are never held.
- A record let through after others were held carries `suppressed` (how many) in its fields.
- Memory is bounded: at most MAX_MESSAGES messages are tracked, the least recent forgotten.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Callable

# One line per message per ten seconds still shows a flood's start, its rate and its end.
EVERY = 10.0
# The throttled loggers log a few dozen distinct message templates; this is far beyond them.
MAX_MESSAGES = 256


class RepeatThrottle(logging.Filter):
    def __init__(self, every: float = EVERY, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.every, self.clock = every, clock
        self._messages: OrderedDict[str, list] = OrderedDict()  # msg -> [last let through, held]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        key = f"{record.name}\0{record.msg}"
        now = self.clock()
        entry = self._messages.get(key)
        if entry is not None and now - entry[0] < self.every:
            entry[1] += 1
            return False
        if entry is not None and entry[1]:
            record.suppressed = entry[1]
        self._messages[key] = [now, 0]
        self._messages.move_to_end(key)
        while len(self._messages) > MAX_MESSAGES:
            self._messages.popitem(last=False)
        return True


def throttle(logger: logging.Logger) -> logging.Logger:
    """Attach one RepeatThrottle to `logger` (once) and return it."""
    if not any(isinstance(f, RepeatThrottle) for f in logger.filters):
        logger.addFilter(RepeatThrottle())
    return logger
