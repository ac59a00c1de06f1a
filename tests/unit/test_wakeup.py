"""Wakeup and its listeners (meshd.io.wakeup): no notify is lost by a loop that was busy."""

from __future__ import annotations

import threading

import trio

from meshd.io.wakeup import Wakeup


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
