"""The bridge between gevent and the QUIC thread: calls into the thread, in batches."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from gevent.event import AsyncResult

from npgevent.quic.bridge import Bridge
from npgevent.quic.loop import NativeLoop

pytestmark = pytest.mark.timeout(30)


class _Thread:
    """A real native thread running a NativeLoop, as the QUIC thread does."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.wakeups = 0
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()
        assert self.ready.wait(5)

    def _main(self) -> None:
        loop = NativeLoop()
        write = loop._write_to_self

        def counting() -> None:
            self.wakeups += 1
            write()

        loop._write_to_self = counting  # type: ignore[method-assign]
        self.loop = loop
        self.bridge.loop = loop
        loop.call_soon(self.ready.set)
        loop.run_forever()
        loop.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        assert not self.thread.is_alive()


def _until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not check() and time.monotonic() < end:
        time.sleep(0.01)


def test_calls_made_while_the_thread_is_busy_wake_it_once_and_run_in_order():
    bridge = Bridge()
    ran: list[object] = []
    flushes: list[int] = []
    bridge.after_calls = lambda: flushes.append(len(ran))
    side = _Thread(bridge)
    try:
        busy, release = threading.Event(), threading.Event()

        def hold() -> None:
            busy.set()
            release.wait(5)
            ran.append("held")

        assert bridge.to_thread(hold)
        assert busy.wait(5)  # the thread is inside a batch: its next calls are queued
        for i in range(100):
            assert bridge.to_thread(ran.append, i)
        release.set()
        _until(lambda: len(ran) == 101)
        assert ran == ["held", *range(100)]
        assert side.wakeups == 2  # one for hold(), one for the hundred calls behind it
        assert flushes and flushes[0] == 101  # after the batch, once it has all run
        # and the next call wakes the thread again
        assert bridge.to_thread(ran.append, "again")
        _until(lambda: ran[-1] == "again")
        assert ran[-1] == "again" and side.wakeups == 3
    finally:
        side.stop()
        bridge.close()


def test_a_call_after_the_loop_closed_is_refused():
    bridge = Bridge()
    side = _Thread(bridge)
    side.stop()
    assert bridge.to_thread(print, "never") is False
    bridge.close()


def test_results_come_back_through_the_hub():
    bridge = Bridge()
    side = _Thread(bridge)
    try:
        got: AsyncResult = AsyncResult()
        assert bridge.to_thread(lambda: bridge.to_gevent(got.set, threading.get_ident()))
        assert got.get(timeout=5) == side.thread.ident
    finally:
        side.stop()
        bridge.close()
