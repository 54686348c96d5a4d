"""The start of a framed session (:mod:`npgevent.relay.framed`) in hub callbacks.

The framed relay runs each direction as a greenlet loop: the up pump on a parked worker,
the down pump in the caller, each waiting in the hub between reads (a watcher started and
stopped and two greenlet switches per wait, about four waits and a worker job per short
session).  Here both directions start as read watchers whose callbacks do the pumps' work
without waiting: a local read becomes a DATA frame written with ``send_nowait``, the pool
stream's frames are parsed as they are read and their bytes sent on with a non-blocking
``send``, EOF frames go out and come in as in the pumps.  A request/response session thus
runs to its end in the hub, and the caller only waits for that end (a
:class:`~npgevent.relay.framedsession.FramedSession` has no caller: its end is a callback).

What may run in a hub callback is narrow: nothing that waits, no abort.  So the phase hands
the session over to the greenlet pumps, with each direction's state, as soon as anything but
the plain course comes: a write that did not go out whole (its rest is written first), a
local socket that fails, the peer's ABORT, a TLS read that needs a write, or bulk (a local
read that fills the chunk, :data:`BULK` bytes from the peer in one callback: the pumps read
on without a loop turn per chunk).  A pool stream
that fails or sends a malformed frame ends the phase with that error, as it would end the
down pump.  The pumps then carry on exactly where the phase stopped: the frame reader keeps
its place, bytes already read are counted and handed over.

Only for a :class:`~npgevent.net.tls.TLSStream` pool stream (reads and writes without
waiting) and a plain gevent local socket, with no idle timeout and no rate limit.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import gevent
from gevent import socket
from gevent.hub import Waiter

from ..errors import detached
from ..net.lightsock import PLAIN
from ..protocol.sessionframe import ABORT, DATA, EOF, EOF_FRAME, HEADER, NEED, FrameReader, pack_data_header
from .tcp import buffer_pool

if TYPE_CHECKING:
    from .framed import _State

#: frames parsed (and reads made) per callback of the pool stream: a flooding peer can't hold
#: the hub; what is left wakes it again (level-triggered, or a follow-up callback)
EVENTS_PER_WAKEUP = 32

#: bytes from the peer in one callback that make a session bulk: the pumps take it over
BULK = 1 << 16

_SHUT_WR = socket.SHUT_WR


def usable(pool: Any, local: Any, limiter: Any, idle: float) -> bool:
    """Whether :func:`run` can carry the start of this session."""
    return limiter is None and idle <= 0 and type(local) in PLAIN and stream_usable(pool)


def stream_usable(pool: Any) -> bool:
    """Whether a pool stream can be read and written from hub callbacks (a TLS stream)."""
    return hasattr(pool, "recv_into_nowait") and hasattr(pool, "send_nowait")


class _Side:
    """A watcher's callback owner: gevent's ``cancel_wait`` (a socket closed under an active
    watcher) calls ``callback.__self__.throw``: for the local socket that aborts the session
    (as a failed local read does), for the pool stream it ends the phase with the error."""

    __slots__ = ("local", "phase", "readable")

    def __init__(self, phase: Phase, readable: Any, local: bool) -> None:
        self.phase: Phase | None = phase
        self.readable = readable
        self.local = local

    def fire(self) -> None:
        phase = self.phase
        if phase is None or phase.over:
            return
        try:
            self.readable()
        except Exception as exc:  # the pool stream failed, a malformed frame, or a bug
            phase.end(exc)

    def throw(self, error: BaseException, *args: Any) -> None:
        phase = self.phase
        if phase is None or phase.over:
            return
        if self.local:
            phase.st.abort(error, phase.local)
            phase.end()
        else:
            phase.end(error)


class Phase:
    """Both directions' callbacks; *over* is called (in the hub, or in the greenlet that
    kills it) once the phase has ended: see :meth:`end`."""

    def __init__(self, pool: Any, local: socket.socket, st: _State, reader: FrameReader,
                 acct: list[int], rx: int, tx: int, chunk: int, over: Callable[[], None]) -> None:
        self.pool, self.local, self.st, self.reader = pool, local, st, reader
        self.acct, self.rx, self.tx, self.chunk = acct, rx, tx, chunk
        self.bufs = buffer_pool(chunk + HEADER)  # a read's frame: header in front, one write
        self.hub = gevent.get_hub()
        self.over_cb = over
        self.up_left: tuple[bytes, int] | None = (b"", 0)  # as relay_framed's (see there)
        self.down_left: bytes | None = b""
        self.error: BaseException | None = None
        self.over = False
        self.local_watcher = local._read_event
        self.pool_watcher = pool.sock._read_event
        self.up = _Side(self, self._up, local=True)
        self.down = _Side(self, self._down, local=False)

    def start(self) -> None:
        self.local_watcher.start(self.up.fire)
        self.pool_watcher.start(self.down.fire)
        if self.pool.has_buffered():  # the start of this session, read past the last one's end
            self.hub.loop.run_callback(self.down.fire)

    # -- in the hub ------------------------------------------------------------------------
    def _up(self) -> None:
        """Local socket -> one DATA frame (or, at its end, our EOF)."""
        st, pool, bufs = self.st, self.pool, self.bufs
        buf = bufs.get()
        try:
            try:
                n = self.local._sock.recv_into(memoryview(buf)[HEADER:], self.chunk)
            except BlockingIOError:
                return
            except OSError as exc:  # the up pump sends ABORT, the down pump drains
                st.abort(exc, self.local)
                self.end()
                return
            if not n:
                self.local_watcher.stop()
                written = pool.send_nowait(EOF_FRAME)
                if written == HEADER:
                    st.sent = EOF
                    self.up_left = None
                    if self.down_left is None:
                        self.end()
                    return
                if written:  # part of it (not on TLS, whose record is all or nothing)
                    self.up_left = (EOF_FRAME[written:], EOF)
                # else nothing out, and the same bytes must be offered again: the pump reads
                # the local EOF again and sends the frame
                self.end()
                return
            pack_data_header(buf, n)
            frame = memoryview(buf)[: HEADER + n]
            written = pool.send_nowait(frame)
            self.acct[self.rx] += n
            if written < HEADER + n:  # the rest goes out first in the pump
                self.up_left = (bytes(frame[written:]), 0)
                self.end()
            elif n == self.chunk:  # bulk: the pumps read on without a loop turn per chunk
                self.end()
        finally:
            bufs.put(buf)

    def _down(self) -> None:
        """The peer's frames -> local socket, until its EOF."""
        reader, pool = self.reader, self.pool
        moved = 0
        for _ in range(EVENTS_PER_WAKEUP):
            kind, data = reader.next()
            if kind == DATA:
                assert data is not None
                n = len(data)
                try:
                    sent = self.local._sock.send(data)
                except OSError:  # full (BlockingIOError), or failed: the pump's write fails
                    sent = 0     # again and takes the pump's course
                self.acct[self.tx] += n
                moved += n
                if sent < n:
                    self.down_left = bytes(data[sent:])
                    self.end()
                    return
                if moved >= BULK:  # the pumps read on without a loop turn per chunk
                    self.end()
                    return
            elif kind == NEED:
                got = pool.recv_into_nowait(reader.room())
                if got is None:
                    return  # nothing yet: the watcher calls again
                if got < 0:  # OpenSSL must write first: the pump waits for that
                    self.end()
                    return
                if not got:
                    raise ConnectionResetError("pool connection closed in mid-session")
                reader.filled(got)
            elif kind == EOF:
                self.pool_watcher.stop()
                try:
                    self.local.shutdown(_SHUT_WR)
                except OSError:
                    pass
                self.down_left = None
                if self.up_left is None:
                    self.end()
                return
            else:  # ABORT: the pumps close the local socket and answer it
                assert kind == ABORT
                self.pool_watcher.stop()
                self.st.abort(ConnectionAbortedError("the peer aborted the session"), self.local)
                self.down_left = None
                self.end()
                return
        # frames already read (more than one callback takes) or decrypted bytes inside the
        # stream: no socket event will announce them
        if reader.start < reader.end or pool.has_buffered():
            self.hub.loop.run_callback(self.down.fire)

    def end(self, error: BaseException | None = None) -> None:
        """The phase is over: both directions ended, a hand-over to the pumps, or *error*."""
        if self.over:
            return
        self.over = True
        if error is not None and self.error is None:
            self.error = detached(error)
        self._stop()
        self.over_cb()

    def _stop(self) -> None:
        self.local_watcher.stop()
        self.pool_watcher.stop()
        # no cycle left: each side's callback is a method of this phase, which holds both
        # sides; freed by reference counting when the session ends, not by the collector
        up, down = self.up, self.down
        up.phase = down.phase = up.readable = down.readable = None


def run(pool: Any, local: socket.socket, st: _State, reader: FrameReader, acct: list[int],
        rx: int, tx: int, chunk: int) -> tuple[tuple[bytes, int] | None, bytes | None]:
    """Relay in hub callbacks until both directions end or the pumps must take over; return
    what is left of each direction (``relay_framed``'s ``up_left`` and ``down_left``).
    Raises what ended the pool stream (a failure, a malformed frame)."""
    waiter = Waiter(gevent.get_hub())
    phase = Phase(pool, local, st, reader, acct, rx, tx, chunk, partial(waiter.switch, None))
    phase.start()
    try:
        waiter.get()
    finally:
        phase.over = True
        phase._stop()
    if phase.error is not None:
        raise phase.error
    return phase.up_left, phase.down_left
