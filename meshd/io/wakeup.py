"""Waking trio loops when something changed, from any thread.

Invariants:
- `notify_threadsafe` may be called from any thread (pysyncobj's Raft thread calls it); it
  never blocks and never raises, even once trio has finished.
- A listener does not lose a notify that came while its loop was busy: its next wait
  returns at once.
- Periodic waits land on shared instants (`next_slot`): every loop of the daemon that looks
  again every second wakes at the same whole second of trio's clock, and one timer of the
  run (`_Slots`) wakes them all by setting their events. A timeout that fires in trio raises
  Cancelled through the waiting task, several times the cost of the look it allows on a
  small board (about 0.3 ms here); an idle daemon had a dozen a second. A slotted wait is
  never longer than its period and may be shorter; one that must be exactly a period (a
  retry delay, a lease, a deadline) uses a plain timeout instead.
- A slotted waiter that is cancelled or notified first leaves only its event behind, set
  (and dropped) at its slot: nothing outlives one period.
"""

from __future__ import annotations

import math

import trio


def next_slot(now: float, period: float) -> float:
    """The first multiple of `period` after `now`: where a wait of up to `period` ends, shared
    by every wait of that period (and of its divisors' multiples: 2 s and 5 s slots are 1 s
    slots too)."""
    return (math.floor(now / period) + 1.0) * period


class _Slots:
    """The run's one timer for slotted waits: slot instant -> the events to set then."""

    def __init__(self) -> None:
        self._due: dict[float, list[trio.Event]] = {}
        self._target = math.inf  # the instant the timer task waits for
        self._moved = trio.Event()  # an earlier instant was added: the task waits anew
        trio.lowlevel.spawn_system_task(self._run, name="meshd.io.wakeup._Slots")

    def add(self, at: float, event: trio.Event) -> None:
        self._due.setdefault(at, []).append(event)
        if at < self._target:
            self._moved.set()

    async def _run(self) -> None:
        while True:
            self._target = min(self._due, default=math.inf)
            with trio.move_on_at(self._target):
                await self._moved.wait()
            self._moved = trio.Event()
            now = trio.current_time()
            for at in [at for at in self._due if at <= now]:
                for event in self._due.pop(at):
                    event.set()


_SLOTS: trio.lowlevel.RunVar[_Slots] = trio.lowlevel.RunVar("meshd.io.wakeup._Slots")


def _slots() -> _Slots:
    try:
        return _SLOTS.get()
    except LookupError:
        slots = _Slots()
        _SLOTS.set(slots)
        return slots


def slot_event(period: float) -> trio.Event:
    """An event set at the next slot of `period`."""
    event = trio.Event()
    _slots().add(next_slot(trio.current_time(), period), event)
    return event


async def sleep_slot(period: float) -> None:
    """Sleep until the next slot of `period` (at most `period`)."""
    await slot_event(period).wait()


class Wakeup:
    """Wake several trio waiters when the replicated state changes (thread-safe notify)."""

    def __init__(self) -> None:
        self._event = trio.Event()
        self._generation = 0  # notifies so far
        self._token = trio.lowlevel.current_trio_token()
        self._waiters: set[trio.Event] = set()  # slotted listeners' own events

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
        for event in self._waiters:
            event.set()
        self._waiters.clear()

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
        return await self.wait_until(trio.current_time() + timeout)

    async def wait_slot(self, period: float) -> bool:
        """Wait for a notify not seen yet, or the next slot of `period` (next_slot); True when
        notified."""
        wakeup = self._wakeup
        if wakeup._generation == self._seen:
            event = slot_event(period)
            wakeup._waiters.add(event)
            try:
                await event.wait()
            finally:
                wakeup._waiters.discard(event)
        notified = wakeup._generation != self._seen
        self._seen = wakeup._generation
        return notified

    async def wait_until(self, deadline: float) -> bool:
        """Wait for a notify not seen yet, or trio's clock reaching `deadline`; True when
        notified."""
        wakeup = self._wakeup
        if wakeup._generation == self._seen:
            event = wakeup._event
            with trio.move_on_at(deadline):
                await event.wait()
        notified = wakeup._generation != self._seen
        self._seen = wakeup._generation
        return notified
