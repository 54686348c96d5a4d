"""A TCP relay whose small reads run in hub callbacks: short sessions switch no greenlet.

:func:`npgevent.relay.tcp.relay` runs each direction as a greenlet loop: read, write, and
wait in the hub between reads.  Every wait is a libev watcher started and stopped and two
greenlet switches; a short request/response session waits about five times.  Here, between
two plain gevent sockets, each direction is a read watcher whose callback reads a chunk and
passes it on with a non-blocking ``send``, in the hub; the calling greenlet only waits for
the session's end.

What may run in a hub callback is narrow: nothing that waits.  A direction therefore moves to
a greenlet (:mod:`npgevent.relay.runners`) for good as soon as it would have to wait for
anything but input: a write that did not go out whole (the rest waits for a writable
socket) or a read that filled the chunk (a bulk transfer: the greenlet pump splices it).
Sessions with an idle timeout or a rate limit keep the greenlet relay.

The relay's contract is :func:`~npgevent.relay.tcp.relay`'s: half-close is propagated, an
error in either direction ends both, and it returns only once no callback or greenlet of the
session can touch its sockets (the caller closes them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gevent
from gevent import socket
from gevent.hub import Waiter
from greenlet import GreenletExit

from ..errors import detached
from ..net.lightsock import PLAIN
from . import runners, tcp  # tcp imports this module too: its names are used at call time only

_SHUT_WR = socket.SHUT_WR


class _Direction:
    """One direction: src -> dst, read in the hub until it moves to a greenlet or ends."""

    __slots__ = ("dst", "idx", "job", "open", "raw_dst", "recv_into", "session", "src", "watcher")

    def __init__(self, session: _HubRelay, src: socket.socket, dst: socket.socket, idx: int) -> None:
        self.session: _HubRelay | None = session  # None once the relay returned (no cycle left)
        self.src, self.dst, self.idx = src, dst, idx
        self.recv_into = src._sock.recv_into
        self.raw_dst = dst._sock
        self.watcher = src._read_event  # the socket's own watcher (see throw)
        self.job: runners.Job | None = None
        self.open = True  # not yet at its end (EOF passed on, or failed)

    def readable(self) -> None:
        """The watcher's callback, in the hub: must not wait."""
        session = self.session
        if session is None:
            return
        try:
            session.pass_on(self)
        except Exception as exc:  # a bug must end the session, not leave it hanging
            session.fail(exc)

    def throw(self, error: BaseException, *args: Any) -> None:
        """gevent's ``cancel_wait`` calls this (``callback.__self__.throw``) when the socket is
        closed under an active watcher: the session ends with that error, as a waiting
        greenlet would."""
        if self.session is not None:
            self.session.fail(error)


class _HubRelay:
    def __init__(self, user: socket.socket, target: socket.socket, acct: list[int], rx: int,
                 tx: int, chunk: int, can_splice: bool) -> None:
        self.hub = gevent.get_hub()
        self.acct, self.chunk, self.can_splice = acct, chunk, can_splice
        self.pool = tcp.buffer_pool(chunk)
        self.dirs = (_Direction(self, user, target, tx), _Direction(self, target, user, rx))
        self.waiter: Waiter | None = None
        self.failure: BaseException | None = None
        self.woken = False

    def run(self) -> BaseException | None:
        self.waiter = Waiter(self.hub)
        for d in self.dirs:
            d.watcher.start(d.readable)
        try:
            try:
                self.waiter.get()
            except BaseException:  # killed (an instance stopping): end the session with it
                self._stop(kill=True)
                raise
            self._stop(kill=self.failure is not None)
            return self.failure
        finally:
            for d in self.dirs:
                d.session = None  # the directions and the relay refer to each other

    # -- in the hub ------------------------------------------------------------------------
    def pass_on(self, d: _Direction) -> None:
        pool, chunk = self.pool, self.chunk
        buf = pool.get()
        try:
            self._pass_chunk(d, buf, chunk)
        finally:
            pool.put(buf)

    def _pass_chunk(self, d: _Direction, buf: bytearray, chunk: int) -> None:
        """One read of *d* into *buf* and its non-blocking write (the caller keeps *buf*)."""
        try:
            n = d.recv_into(buf, chunk)
        except BlockingIOError:
            return
        except OSError as exc:
            self.fail(exc)
            return
        if not n:
            d.watcher.stop()
            try:
                d.raw_dst.shutdown(_SHUT_WR)
            except OSError:
                pass
            self.done(d)
            return
        try:
            sent = d.raw_dst.send(memoryview(buf)[:n])
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.fail(exc)
            return
        self.acct[d.idx] += n
        if sent < n or n == chunk:
            d.watcher.stop()
            d.job = runners.run(self._in_greenlet, d, bytes(buf[sent:n]))

    def done(self, d: _Direction) -> None:
        d.open = False
        if not (self.dirs[0].open or self.dirs[1].open):
            self._wake()

    def fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = detached(exc)
        for d in self.dirs:
            d.watcher.stop()
            d.open = False
        self._wake()

    def _wake(self) -> None:
        if not self.woken:
            self.woken = True
            assert self.waiter is not None
            self.waiter.switch(None)

    # -- in a greenlet ---------------------------------------------------------------------
    def _in_greenlet(self, d: _Direction, rest: bytes) -> None:
        """The rest of the direction as the greenlet relay's pump (which half-closes at EOF)."""
        err: BaseException | None
        try:
            if rest:
                d.dst.sendall(rest)
        except OSError as exc:
            err = detached(exc)
        else:
            err = tcp._pump(d.src, d.dst, self.acct, d.idx, None, None, self.chunk, self.can_splice)
        loop = self.hub.loop
        if err is None:
            loop.run_callback(self.done, d)
        elif d.open:  # the session ends with it, as in the greenlet relay
            loop.run_callback(self.fail, err)

    def _stop(self, kill: bool) -> None:
        for d in self.dirs:
            d.watcher.stop()
        for d in self.dirs:
            job = d.job
            if job is not None and not job.dead:
                if kill:
                    job.kill(block=True)
                else:
                    job.join()


class HubSession(_HubRelay, runners.Detached):
    """A session that no greenlet waits for: started from a hub callback (single-end
    forwarding's accept), it calls *end* with the error that ended it (None for two clean
    ends) once no callback or greenlet of it can touch its sockets, in the hub or on a worker
    greenlet; *end* closes them.  It offers what :class:`~npgevent.relay.runners.Sessions`
    needs of a job (``dead``, ``kill``, ``join``, ``owner``), so an instance that stops drains
    or ends it like any other session.  A direction still moves to a greenlet for bulk or a
    write that waits, as in :func:`relay_in_hub`."""

    def __init__(self, user: socket.socket, target: socket.socket, acct: list[int], rx: int,
                 tx: int, bufsize: int, end: Callable[[BaseException | None], None]) -> None:
        # two plain gevent sockets: the read size and the splice of relay() between them
        super().__init__(user, target, acct, rx, tx, tcp.chunk_size(bufsize, None, tcp.SPLICE_OK),
                         tcp.SPLICE_OK)
        runners.Detached.__init__(self)
        self.end: Callable[[BaseException | None], None] | None = end

    def start(self, owner: runners.Sessions | None = None) -> None:
        """Start reading both ways, listed in *owner* (a core's sessions) if given."""
        self.start_tracking(owner)
        for d in self.dirs:
            d.watcher.start(d.readable)

    def kill(self, exception: type[BaseException] = GreenletExit, block: bool = True) -> None:
        """End the session with *exception* as its error (what a job's kill raises)."""
        if not self.woken:
            self.fail(exception())
        if block:
            self.join()

    def _wake(self) -> None:
        if self.woken:
            return
        self.woken = True
        up, down = self.dirs
        up.watcher.stop()
        down.watcher.stop()
        if (up.job is not None and not up.job.dead) or (down.job is not None and not down.job.dead):
            runners.run(self._finish, True)  # a direction's greenlet ends first: wait for it there
        else:
            self._finish(False)

    def _finish(self, jobs: bool) -> None:
        end, self.end = self.end, None
        try:
            if jobs:
                self._stop(kill=self.failure is not None)
            for d in self.dirs:
                d.session = None  # the directions and the session refer to each other
            if end is not None:
                end(self.failure)
        finally:
            self._over()


def relay_in_hub(user: socket.socket, target: socket.socket, acct: list[int], rx: int, tx: int,
                 chunk: int, can_splice: bool) -> BaseException | None:
    """Relay between two plain gevent sockets until both directions end; the error that ended
    the session, or None for two clean ends.  ``acct[tx]`` counts bytes read from *user*,
    ``acct[rx]`` bytes read from *target*."""
    return _HubRelay(user, target, acct, rx, tx, chunk, can_splice).run()


def usable(user: Any, target: Any, limiter: Any, idle: float) -> bool:
    """Whether :func:`relay_in_hub` can carry this session."""
    return (limiter is None and idle <= 0 and type(user) in PLAIN
            and type(target) in PLAIN)
