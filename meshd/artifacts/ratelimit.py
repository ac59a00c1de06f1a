"""How fast this node serves artifact pieces to its peers: one token bucket for all of them.

A member that holds an artifact its whole site wants would otherwise give its link (and
its workloads' share of it) to the fetch; `--artifact-upload-mbps` bounds what it sends.

Invariants:
- Pure: `now` is passed in.
- Over any interval of length T the bytes granted are at most rate * T + BURST: the bucket
  starts full and never holds more than BURST.
- A rate of 0 is no limit: every grant is immediate.
"""

from __future__ import annotations

# A burst of a quarter of a second at the configured rate, at least one 64 KiB send: short
# enough that the limit shows within a second, long enough that sends are not byte-sized.
BURST_SECONDS = 0.25
MIN_BURST_BYTES = 64 * 1024


class UploadLimit:
    def __init__(self, mbps: float) -> None:
        self.rate = mbps * 1e6 / 8  # bytes a second
        self.burst = max(MIN_BURST_BYTES, self.rate * BURST_SECONDS)
        self._tokens = self.burst
        self._at: float | None = None

    def delay(self, now: float, size: int) -> float:
        """Seconds to wait before sending `size` bytes (they are counted as sent then)."""
        if self.rate <= 0:
            return 0.0
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= size
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate
