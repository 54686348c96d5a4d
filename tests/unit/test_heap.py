"""npgevent.heap: freed heap memory goes back to the OS on a timer, the timer stretches
after a slow trim, nothing runs without malloc_trim, and glibc's own trim really lowers
the RSS of a process whose heap is full of freed blocks."""

from __future__ import annotations

import os

import gevent
import pytest
from helpers import status_kb

from npgevent import heap

pytestmark = pytest.mark.timeout(30)


def test_it_trims_every_interval_until_closed():
    calls: list[int] = []
    trimmer = heap.HeapTrimmer(interval=0.05, trim=lambda pad: calls.append(pad) or 1)
    trimmer.start()
    try:
        gevent.sleep(0.4)
        assert len(calls) >= 4 and set(calls) == {0}
    finally:
        trimmer.close()
    seen = len(calls)
    gevent.sleep(0.2)
    assert len(calls) == seen  # closed: no more trims
    trimmer.close()  # twice is fine


def test_a_close_that_lands_as_the_wake_up_is_due_trims_no_more(monkeypatch):
    """stop() kills the trimmer's greenlet without blocking: the kill lands at its next switch.
    A close taken while its sleep's wake-up was already due (here: inside the sleep, which then
    returns at once) must not let the trim after it run (the default suite saw one, once)."""
    calls: list[int] = []
    trimmer = heap.HeapTrimmer(interval=0.05, trim=lambda pad: calls.append(pad) or 1)
    naps: list[float] = []

    def nap(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 1:
            trimmer.close()
        else:
            raise gevent.GreenletExit  # a loop that slept again: end it here

    monkeypatch.setattr(heap.gevent, "sleep", nap)
    task = gevent.Greenlet(trimmer._run)
    trimmer._task = task  # as start() does
    task.start()
    task.join(5)
    monkeypatch.undo()
    assert task.dead and calls == []


def test_a_slow_trim_stretches_the_interval(monkeypatch):
    clock = iter([0.0, 0.05, 1.0, 1.0 + 10.0])  # a trim of 50 ms, then one of 10 s
    monkeypatch.setattr(heap.time, "perf_counter", lambda: next(clock))
    trimmer = heap.HeapTrimmer(interval=10.0, trim=lambda pad: 0)
    assert trimmer.trim() is False
    assert trimmer.interval == pytest.approx(0.05 / heap.MAX_SHARE)  # 50 s: trimming stays <= 0.1 %
    trimmer.trim()
    assert trimmer.interval == heap.MAX_INTERVAL
    clock2 = iter([0.0, 0.0001])
    monkeypatch.setattr(heap.time, "perf_counter", lambda: next(clock2))
    trimmer.trim()
    assert trimmer.interval == 10.0  # a quick trim brings it back


def test_without_malloc_trim_nothing_runs():
    trimmer = heap.HeapTrimmer(interval=0.01, trim=None)
    assert not trimmer.available
    trimmer.start()
    assert trimmer._task is None and trimmer.trim() is False and trimmer.trims == 0
    trimmer.close()


@pytest.mark.skipif(heap.malloc_trim() is None, reason="no malloc_trim in this C library")
def test_glibc_gives_back_the_pages_of_freed_blocks():
    trimmer = heap.HeapTrimmer()
    trimmer.trim()
    blocks = [bytes(20_000) for _ in range(2000)]  # ~40 MB in glibc's heap (under its mmap threshold)
    del blocks[::2]  # ~20 MB freed between live blocks: glibc keeps it
    before = status_kb(os.getpid())
    assert trimmer.trim() is True
    after = status_kb(os.getpid())
    assert before - after > 10_000, (before, after)
    del blocks
