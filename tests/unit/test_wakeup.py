"""Wakeup and its listeners (meshd.io.wakeup): no notify is lost by a loop that was busy."""

from __future__ import annotations

import threading

import trio

from meshd.io.wakeup import Wakeup, next_slot, sleep_slot


def test_a_notify_while_busy_is_seen_by_the_next_wait():
    async def main():
        wakeup = Wakeup()
        listener = wakeup.listener()
        wakeup.notify()  # the loop is busy elsewhere
        with trio.fail_after(1):
            assert await listener.wait(10) is True  # returns at once
        assert await listener.wait(0.01) is False  # and only once

    trio.run(main)


def test_every_listener_sees_the_notify_and_a_fresh_one_does_not():
    async def main():
        wakeup = Wakeup()
        a, b = wakeup.listener(), wakeup.listener()
        wakeup.notify()
        late = wakeup.listener()
        assert await a.wait(1) and await b.wait(1)
        assert await late.wait(0.01) is False

    trio.run(main)


def test_notify_from_another_thread_wakes_a_waiter():
    async def main():
        wakeup = Wakeup()
        listener = wakeup.listener()
        threading.Timer(0.05, wakeup.notify_threadsafe).start()
        with trio.fail_after(2):
            assert await listener.wait(10) is True

    trio.run(main)


def test_slotted_waits_of_one_period_end_together_at_its_next_multiple():
    async def main():
        ended = []

        async def sleeper(i):
            await sleep_slot(0.2)
            ended.append(trio.current_time())
        await trio.sleep_until(next_slot(trio.current_time(), 0.2) + 0.01)  # all five start in one slot
        async with trio.open_nursery() as nursery:
            start = trio.current_time()
            for i in range(5):
                nursery.start_soon(sleeper, i)
                await trio.sleep(0.01)
        slot = next_slot(start, 0.2)
        assert len(ended) == 5 and all(slot <= t < slot + 0.05 for t in ended)
        assert max(ended) - start <= 0.2 + 0.05

    trio.run(main)


def test_a_slotted_listener_wakes_for_a_notify_before_its_slot():
    async def main():
        wakeup = Wakeup()
        listener = wakeup.listener()
        trio.lowlevel.current_trio_token().run_sync_soon(wakeup.notify)
        with trio.fail_after(1):
            assert await listener.wait_slot(3600) is True
        start = trio.current_time()
        assert await listener.wait_slot(0.1) is False  # nothing new: until the slot
        assert trio.current_time() - start <= 0.15
        assert not wakeup._waiters  # a finished wait leaves nothing with the wakeup

    trio.run(main)


def test_an_earlier_slot_added_later_is_not_kept_waiting_by_a_later_one():
    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sleep_slot, 3600)
            await trio.sleep(0.01)
            start = trio.current_time()
            with trio.fail_after(1):
                await sleep_slot(0.1)
            assert trio.current_time() - start <= 0.15
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_next_slot_is_the_next_multiple():
    assert next_slot(0.0, 1.0) == 1.0
    assert next_slot(0.5, 1.0) == 1.0
    assert next_slot(1.0, 1.0) == 2.0
    assert next_slot(7.3, 5.0) == 10.0
