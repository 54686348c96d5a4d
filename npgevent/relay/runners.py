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
``value``.  :class:`Sessions` offers what a core needs of its ``Group`` of session handlers
(``spawn``, ``len``, ``join``, ``kill``): a user connection's handler runs on a parked worker
too (a gevent ``Greenlet`` spawned into a ``Group``, run and reaped costs ~31 us here, a job
on a parked worker ~10 us).  A kill is decided in a hub callback: it throws into the worker
only while the worker runs *that* job, and a job killed before it started never runs, so a
late kill can't reach the worker's next job.  An exception other than the kill is reported through the hub,
as an uncaught exception in a greenlet is.  Jobs must not rely on greenlet identity or
greenlet-local state (the relay's pumps don't).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Protocol

import gevent
from gevent.event import Event
from greenlet import GreenletExit

KEEP = 64  # parked workers kept between sessions (each holds its frame stack, ~17 KB)


class Owner(Protocol):
    """Told when a job ends (run to its end, killed, or killed before it ran)."""

    def _ended(self, job: Any) -> None: ...


class Job:
    """One job on a worker greenlet (see module doc)."""

    __slots__ = ("_cancel", "_done", "_started", "_worker", "args", "fn", "owner", "value")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args
        self.value: Any = None
        self._done = Event()
        self._started = False
        self._cancel = False
        self._worker: _Worker | None = None
        self.owner: Owner | None = None  # told when the job ends

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
                # a finished job holds nothing of its function or owner: often a session that
                # holds the job (a cycle for the collector otherwise)
                job.fn, job.args = _finished, ()
                owner, job.owner = job.owner, None
                job._done.set()
                if owner is not None:
                    owner._ended(job)
            job = owner = None  # a parked worker holds nothing of its last job (its session's objects)
            parked = _parked.setdefault(self.hub, [])
            if len(parked) >= KEEP:
                return
            parked.append(self)
            while self.job is None:
                self.hub.switch()  # until run() hands this worker its next job


_parked: dict[Any, list[_Worker]] = {}  # per hub: a worker only ever runs in its own


def _finished(*_args: Any) -> None:
    """What a job that has run holds in place of its function."""


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


class Tracked(Protocol):
    """What :class:`Sessions` needs of a session: a :class:`Job`, or a session that runs in
    hub callbacks alone (:class:`~npgevent.relay.tcphub.HubSession`), which calls its owner's
    ``_ended`` when it ends."""

    owner: Owner | None

    @property
    def dead(self) -> bool: ...

    def kill(self, exception: type[BaseException] = ..., block: bool = ...) -> None: ...


class Detached:
    """The bookkeeping of a :class:`Tracked` session that no greenlet waits for (it ends from
    hub callbacks or a worker's job): ``dead``, ``owner``, ``join``; :meth:`start_tracking`
    lists it, :meth:`_over` marks it ended and tells the owner."""

    def __init__(self) -> None:
        self.owner: Owner | None = None  # told when the session ends
        self.dead = False
        self._done: Event | None = None  # made only for a join that waits

    def kill(self, exception: type[BaseException] = GreenletExit, block: bool = True) -> None:
        raise NotImplementedError  # each session ends itself its own way

    def start_tracking(self, owner: Sessions | None) -> None:
        if owner is not None:
            owner.track(self)

    def join(self, timeout: float | None = None) -> None:
        if not self.dead:
            if self._done is None:
                self._done = Event()
            self._done.wait(timeout)

    def _over(self) -> None:
        self.dead = True
        if self._done is not None:
            self._done.set()
        if self.owner is not None:
            self.owner._ended(self)


class Sessions:
    """The live sessions of a core, each a :class:`Job` on a parked worker or a
    :class:`Tracked` session of the hub: what the core needs of a gevent ``Group``
    (``spawn``, ``len``, ``join``, ``kill``), and ``adopt`` to take over another's (the
    sessions of a failed core that carry on)."""

    def __init__(self) -> None:
        self._live: set[Tracked] = set()
        self._empty = Event()
        self._empty.set()

    def spawn(self, fn: Callable[..., Any], *args: Any) -> Job:
        job = run(fn, *args)  # starts at the next loop iteration: listed before it can end
        self.track(job)
        return job

    def track(self, session: Tracked) -> None:
        """List a session that is not ended yet (it tells this owner when it ends)."""
        session.owner = self
        self._live.add(session)
        self._empty.clear()

    def _ended(self, job: Tracked) -> None:
        self._live.discard(job)
        if not self._live:
            self._empty.set()

    def adopt(self, other: Sessions) -> None:
        for job in list(other._live):
            if not job.dead:
                other._live.discard(job)
                job.owner = self
                self._live.add(job)
        if self._live:
            self._empty.clear()
        if not other._live:
            other._empty.set()

    def __len__(self) -> int:
        return len(self._live)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every session ended (True) or *timeout* passed (False)."""
        return bool(self._empty.wait(timeout))

    def kill(self, block: bool = True, timeout: float | None = None) -> None:
        """End every session (GreenletExit in each); with *block*, wait up to *timeout*."""
        for job in list(self._live):
            job.kill(block=False)
        if block:
            self._empty.wait(timeout)
