"""Freed heap memory given back to the operating system, every few seconds.

glibc's allocator keeps what a program frees inside its heaps (one per thread that
allocates: the QUIC thread has its own) and gives back on its own only the free space at
the top of a heap.  Under churn (sessions opened and closed by the thousand, datagrams,
QUIC packets) the free space ends up scattered between live blocks, and a long-running
daemon's RSS creeps up while its live objects stay flat: a QUIC tunnel end through 60
rounds of 600 connections grew from ~60 to 77-80 MB with the same number of Python blocks
allocated, ~15-20 MB of it free inside glibc's heaps (``malloc_info``).  ``malloc_trim(0)``
returns every whole free page of every heap (``madvise``), without moving anything: with
it every 10 s the same run stayed between 56 and 70 MB, with no trend (docs/robustness.md).

:class:`HeapTrimmer` calls it from a greenlet every :data:`INTERVAL` seconds.  The call
walks the heaps' free lists while the event loop waits (0.04-2 ms for a heap of a few tens
of MB, 30-100 ms for 1-2 GB), so the interval stretches to keep trimming under
:data:`MAX_SHARE` of the time.  Where the C library has no ``malloc_trim`` (musl, macOS)
nothing runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import gevent

#: seconds between two trims (at least)
INTERVAL = 10.0
#: the longest the interval stretches to (a heap that takes long to trim)
MAX_INTERVAL = 300.0
#: the share of the time trimming may take: a trim of d seconds waits at least d / MAX_SHARE
MAX_SHARE = 0.001


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    try:
        import ctypes

        fn: Any = ctypes.CDLL(None).malloc_trim  # the C library this process runs on
    except (ImportError, OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


class HeapTrimmer:
    """Give freed heap memory back every :attr:`interval` seconds (module docstring)."""

    def __init__(self, interval: float = INTERVAL,
                 trim: Callable[[int], int] | bool | None = True) -> None:
        self.interval = interval
        self._base = interval
        # True: the C library's (if it has one); a function: that one; None: nothing runs
        self._trim: Callable[[int], int] | None = (
            malloc_trim() if trim is True else trim if callable(trim) else None)
        self._task: gevent.Greenlet | None = None
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def start(self) -> None:
        if self._trim is not None and self._task is None:
            self._task = gevent.spawn(self._run)

    def _run(self) -> None:
        me = gevent.getcurrent()
        while True:
            gevent.sleep(self.interval)
            if self._task is not me:
                # stopped while this wake-up was already due: stop()'s kill lands only at this
                # greenlet's next switch, after the trim this loop would make now
                return
            self.trim()

    def trim(self) -> bool:
        """Trim now; True if memory went back.  Stretches :attr:`interval` after a slow trim."""
        if self._trim is None:
            return False
        began = time.perf_counter()
        released = bool(self._trim(0))
        took = time.perf_counter() - began
        self.trims += 1
        self.interval = min(MAX_INTERVAL, max(self._base, took / MAX_SHARE))
        return released

    def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.kill(block=False)

    def close(self) -> None:
        self.stop()
