"""Parked greenlets for a relay's second direction.

Every TCP session relays in two greenlets: the one that handles it and one more for the
reverse direction.  A fresh greenlet costs more than its switches: Python 3.11 gives each
greenlet its own frame stack (a 16 KiB ``mmap`` on first use, an ``munmap`` at its end), and
gevent builds a ``Greenlet`` object.  At thousands of short connections per second that is a
measurable share of the CPU per connection.

:func:`run` hands the job to a parked worker greenlet instead (or starts one when none is
parked); the worker runs it, parks, and lives on for the next session.  At most :data:`KEEP`
workers stay parked, so a burst leaves no more than that behind.

A :class:`Job` offers what the relay needs of a greenlet: ``join``, ``kill``, ``dead`` and
``value``.  A kill is decided in a hub callback: it throws into the worker only while the
worker runs *that* job, and a job killed before it started never runs, so a late kill can't
reach the worker's next job.  An exception other than the kill is reported through the hub,
as an uncaught exception in a greenlet is.  Jobs must not rely on greenlet identity or
greenlet-local state (the relay's pumps don't).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import Event
from greenlet import GreenletExit

KEEP = 16  # parked workers kept between sessions (each holds its frame stack)


class Job:
    """One job on a worker greenlet (see module doc)."""

    __slots__ = ("_cancel", "_done", "_started", "_worker", "args", "fn", "value")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args
        self.value: Any = None
        self._done = Event()
        self._started = False
        self._cancel = False
        self._worker: _Worker | None = None

    @property
    def dead(self) -> bool:
        return self._done.is_set()

    def join(self, timeout: float | None = None) -> None:
        self._done.wait(timeout)

    def kill(self, exception: type[BaseException] = GreenletExit, block: bool = True) -> None:
        """End the job by raising *exception* in it, as ``Greenlet.kill`` does."""
        if self._done.is_set():
            return
        if not self._started:
            self._cancel = True  # as for a Greenlet not started yet: it never runs
        else:
            gevent.get_hub().loop.run_callback(self._throw, exception)
        if block:
            self._done.wait()

    def _throw(self, exception: type[BaseException]) -> None:
        if self._done.is_set():
            return
        worker = self._worker
        if worker is not None and worker.job is self:
            worker.glet.throw(exception)


class _Worker:
    __slots__ = ("glet", "hub", "job")

    def __init__(self, job: Job) -> None:
        self.job: Job | None = job
        job._worker = self
        self.hub = gevent.get_hub()
        self.glet = gevent.spawn_raw(self._run)

    def _run(self) -> None:
        while True:
            job = self.job
            assert job is not None
            try:
                if not job._cancel:
                    job._started = True
                    job.value = job.fn(*job.args)
            except GreenletExit:
                pass  # killed: the job ends, the worker lives on
            except BaseException:
                self.hub.handle_error(self.glet, *sys.exc_info())
            finally:
                self.job = None
                job._worker = None
                job._done.set()
            parked = _parked.setdefault(self.hub, [])
            if len(parked) >= KEEP:
                return
            parked.append(self)
            while self.job is None:
                self.hub.switch()  # until run() hands this worker its next job


_parked: dict[Any, list[_Worker]] = {}  # per hub: a worker only ever runs in its own


def run(fn: Callable[..., Any], *args: Any) -> Job:
    """Run ``fn(*args)`` on a parked worker (or a new one) from the next loop iteration."""
    job = Job(fn, args)
    hub = gevent.get_hub()
    parked = _parked.get(hub)
    while parked:
        worker = parked.pop()
        if worker.glet.dead:
            continue
        worker.job = job
        job._worker = worker
        hub.loop.run_callback(worker.glet.switch)
        return job
    _Worker(job)
    return job


def parked() -> int:
    """How many workers of this thread's hub wait for a job."""
    return len(_parked.get(gevent.get_hub(), ()))
