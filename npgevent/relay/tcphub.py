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

from typing import Any

import gevent
from gevent import socket
from gevent.hub import Waiter

from . import runners

_SHUT_WR = socket.SHUT_WR


class _Direction:
    __slots__ = ("dst", "idx", "job", "open", "raw_dst", "recv_into", "src", "watcher")

    def __init__(self, src: socket.socket, dst: socket.socket, idx: int) -> None:
        self.src, self.dst, self.idx = src, dst, idx
        self.recv_into = src._sock.recv_into
        self.raw_dst = dst._sock
        self.watcher = src._read_event  # the socket's own: close() cancels it
        self.job: runners.Job | None = None
        self.open = True  # not yet at its end (EOF passed on, or failed)


def relay_in_hub(user: socket.socket, target: socket.socket, acct: list[int], rx: int, tx: int,
                 chunk: int, can_splice: bool) -> BaseException | None:
    """Relay between two plain gevent sockets until both directions end; the error that ended
    the session, or None for two clean ends.  (The greenlet relay's pump, for a direction that
    moves to a greenlet, is imported late: :mod:`npgevent.relay.tcp` imports this module.)"""
    from .tcp import _copy_socket, buffer_pool

    hub = gevent.get_hub()
    loop = hub.loop
    pool = buffer_pool(chunk)
    dirs = (_Direction(user, target, tx), _Direction(target, user, rx))
    waiter = Waiter(hub)
    failure: list[BaseException] = []
    waking = [False]

    def wake() -> None:  # in the hub
        if not waking[0]:
            waking[0] = True
            waiter.switch(None)

    def done(d: _Direction) -> None:
        d.open = False
        if not (dirs[0].open or dirs[1].open):
            wake()

    def fail(exc: BaseException) -> None:
        if not failure:
            failure.append(exc)
        for d in dirs:
            d.watcher.stop()
            d.open = False
        wake()

    def readable(d: _Direction) -> None:  # hub callback: must not wait
        try:
            pass_on(d)
        except Exception as exc:  # a bug must end the session, not leave it hanging
            fail(exc)

    def pass_on(d: _Direction) -> None:
        buf = pool.get()
        try:
            n = d.recv_into(buf, chunk)
        except BlockingIOError:
            pool.put(buf)
            return
        except OSError as exc:
            pool.put(buf)
            fail(exc)
            return
        if not n:
            pool.put(buf)
            d.watcher.stop()
            try:
                d.raw_dst.shutdown(_SHUT_WR)
            except OSError:
                pass
            done(d)
            return
        try:
            sent = d.raw_dst.send(memoryview(buf)[:n])
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            pool.put(buf)
            fail(exc)
            return
        acct[d.idx] += n
        if sent < n or n == chunk:
            rest = bytes(buf[sent:n])
            pool.put(buf)
            d.watcher.stop()
            d.job = runners.run(in_greenlet, d, rest)
            return
        pool.put(buf)

    def in_greenlet(d: _Direction, rest: bytes) -> None:
        try:
            if rest:
                d.dst.sendall(rest)
            _copy_socket(d.src, d.dst, acct, d.idx, None, None, chunk, can_splice)
            try:
                d.dst.shutdown(_SHUT_WR)
            except OSError:
                pass
        except Exception as exc:  # the session ends with it, as in the greenlet relay
            if d.open:
                loop.run_callback(fail, exc)
            return
        loop.run_callback(done, d)

    for d in dirs:
        d.watcher.start(readable, d)
    try:
        waiter.get()
    except BaseException:
        _stop(dirs, block=True)
        raise
    _stop(dirs, block=True, kill=bool(failure))
    return failure[0] if failure else None


def _stop(dirs: tuple[_Direction, _Direction], block: bool, kill: bool = True) -> None:
    for d in dirs:
        d.watcher.stop()
    for d in dirs:
        job = d.job
        if job is not None and not job.dead:
            if kill:
                job.kill(block=block)
            else:
                job.join()


def usable(user: Any, target: Any, limiter: Any, idle: float) -> bool:
    """Whether :func:`relay_in_hub` can carry this session."""
    return (limiter is None and idle <= 0 and type(user) is socket.socket
            and type(target) is socket.socket)
