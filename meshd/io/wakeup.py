"""Waking trio loops when something changed, from any thread.

Invariants:
- `notify_threadsafe` may be called from any thread (pysyncobj's Raft thread calls it); it
  never blocks and never raises, even once trio has finished.
- A listener does not lose a notify that came while its loop was busy: its next wait
  returns at once.
"""

from __future__ import annotations

import trio


class Wakeup:
    """Wake several trio waiters when the replicated state changes (thread-safe notify)."""

    def __init__(self) -> None:
        self._event = trio.Event()
        self._generation = 0  # notifies so far
        self._token = trio.lowlevel.current_trio_token()

    def listener(self) -> WakeupListener:
        return WakeupListener(self)

    def notify_threadsafe(self) -> None:
        try:
            self._token.run_sync_soon(self.notify)
        except trio.RunFinishedError:
            pass

    def notify(self) -> None:
        self._generation += 1
        self._event.set()
        self._event = trio.Event()

    async def wait(self, timeout: float) -> bool:
        """Wait for the next notify or the timeout; True when notified."""
        event = self._event
        with trio.move_on_after(timeout):
            await event.wait()
        return event.is_set()


class WakeupListener:
    """One loop's subscription to a Wakeup: a notify that came while the loop was busy
    (not waiting) is not lost; its next wait returns at once."""

    def __init__(self, wakeup: Wakeup) -> None:
        self._wakeup = wakeup
        self._seen = wakeup._generation

    async def wait(self, timeout: float) -> bool:
        """Wait for a notify not seen yet, or the timeout; True when notified."""
        wakeup = self._wakeup
        if wakeup._generation == self._seen:
            event = wakeup._event
            with trio.move_on_after(timeout):
                await event.wait()
        notified = wakeup._generation != self._seen
        self._seen = wakeup._generation
        return notified
