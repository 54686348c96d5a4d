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
    """A real native thread running a NativeLoop, as the QUIC thread does (*lean*: False
    takes the loop's fallback, asyncio's own iteration)."""

    def __init__(self, bridge: Bridge, lean: bool = True) -> None:
        self.bridge = bridge
        self.lean = lean
        self.wakeups = 0
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()
        assert self.ready.wait(5)

    def _main(self) -> None:
        loop = NativeLoop()
        loop._lean = loop._lean and self.lean
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


def test_calls_made_while_the_thread_is_busy_cost_no_wakeup_and_run_in_order():
    bridge = Bridge()
    ran: list[object] = []
    flushes: list[int] = []
    side = _Thread(bridge)
    try:
        side.loop.after_iteration = lambda: flushes.append(len(ran))
        busy, release = threading.Event(), threading.Event()

        def hold() -> None:
            busy.set()
            release.wait(5)
            ran.append("held")

        assert bridge.to_thread(hold)  # the loop waits in epoll_wait: one byte wakes it
        assert busy.wait(5)  # the thread is running its calls: the next ones are queued
        for i in range(100):
            assert bridge.to_thread(ran.append, i)
        release.set()
        _until(lambda: len(ran) == 101)
        assert ran == ["held", *range(100)]
        assert side.wakeups == 1  # the hundred calls behind hold() wrote nothing
        _until(lambda: bool(flushes))
        assert flushes[0] == 101  # the iteration ends once they have all run
        # and the next call, made while the loop waits, wakes it again
        assert bridge.to_thread(ran.append, "again")
        _until(lambda: ran[-1] == "again")
        assert ran[-1] == "again" and side.wakeups == 2
    finally:
        side.stop()
        bridge.close()


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "asyncio-iteration"])
def test_no_call_is_left_waiting_whatever_the_timing(lean: bool):
    """A lost wake-up would leave a call queued while the loop waits: 3,000 calls, each
    answered through the hub before the next, posted at every point of the loop's iteration
    (some right away, some after the thread has gone back to waiting)."""
    bridge = Bridge()
    side = _Thread(bridge, lean=lean)
    try:
        for i in range(3000):
            got: AsyncResult = AsyncResult()
            assert bridge.to_thread(bridge.to_gevent, got.set, i)
            if i % 3 == 0:  # a second call while the first may be running
                assert bridge.to_thread(lambda: None)
            assert got.get(timeout=5) == i, "call %d was never run" % i
            if i % 7 == 0:
                time.sleep(0.0005)  # let the loop go back to epoll_wait
        assert side.wakeups <= 3000 + 1000
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
