"""A TCP session on a reusable pool connection (extension level 2).

The frames are :mod:`npgevent.protocol.sessionframe`'s.  :func:`relay_framed` copies a local
socket (the user's or the target's) to and from a pool stream (a TLS stream, or any stream
with ``recv_into``/``sendall``) in frames, and tells the caller whether the pool connection
came out of it clean: both terminal frames exchanged, nothing broken.  Then it goes back to
the pool, with whatever the peer sent after its terminal (the next session's first bytes).

* **up** (a parked worker greenlet, :mod:`npgevent.relay.runners`): the local socket's
  reads become DATA frames, one write each with the header in front of the payload in the
  same buffer.  Local EOF sends EOF; a local error or the idle timeout sends ABORT.
* **down** (the calling greenlet): the peer's frames; DATA is written to the local socket,
  EOF shuts down its write side (a half-close, as :mod:`npgevent.relay.tcp` does), ABORT
  shuts the local socket down both ways (which ends **up** with its terminal).  When a write
  to the local socket fails, the socket is shut down the same way and **up** answers ABORT;
  what the peer still sends until its terminal is read and dropped.  **up** stops reading
  once the session is aborted (a socket shut down for reading still returns what it had
  queued, and a sender that never stops would keep it busy).  A write that fails after
  this end's EOF went out can no longer be told to the peer: the connection is given up.

On a TLS pool stream with no idle timeout and no rate limit, a session starts in hub
callbacks (:mod:`npgevent.relay.framedhub`): a short one runs to its end there, and anything
else hands each direction's state over to these pumps, which carry on from it.  A tunnel
whose session can start without waiting has no handler call this at all: it starts a
:class:`~npgevent.relay.framedsession.FramedSession` from the hub, built of the same parts
(:func:`begin`, the hub phase, :func:`pumps`, :func:`outcome`).

After this end sent ABORT, the peer has :data:`DRAIN` seconds to answer with its terminal;
a peer that doesn't, a pool stream that fails, or a malformed frame leaves the connection
unusable (the caller closes it, and the peer sees the close).  Nothing is reused that could
hold a half-written frame: a pump is only killed when the connection is given up.
"""

from __future__ import annotations

import time
from typing import Any

import gevent
from gevent import socket

from ..errors import detached
from ..net.sockopt import send_all
from ..protocol.sessionframe import (
    ABORT,
    ABORT_FRAME,
    DATA,
    EOF,
    EOF_FRAME,
    HEADER,
    MAX_DATA,
    NEED,
    FrameReader,
    pack_data_header,
)
from . import framedhub, runners
from .limit import RateLimiter
from .tcp import IdleTimeout, Stream, _describe, _Session, buffer_pool, chunk_size

DRAIN = 10.0  # s: after our ABORT, the peer's terminal must arrive within this
READER_SIZE = 1 << 16
_readers: list[FrameReader] = []  # parsed out completely at every session's end: reusable
KEEP_READERS = 16


class _GiveUp(BaseException):
    """Thrown into the calling pump: the pool connection is unusable (see :class:`_State`)."""


class _State:
    __slots__ = ("aborted", "broken", "done", "reason", "sent")

    def __init__(self) -> None:
        self.aborted = False  # this end's session failed: its terminal is ABORT, peer data dropped
        self.broken: BaseException | None = None  # the pool connection failed: not reusable
        self.reason: BaseException | None = None  # why this end aborted
        self.sent = 0  # our terminal frame once it is out: EOF or ABORT
        self.done = False  # the calling pump has finished (nothing may be thrown into it)

    def abort(self, why: BaseException, local: socket.socket) -> None:
        if not self.aborted:
            self.aborted, self.reason = True, detached(why)
        _stop(local)

    def broke(self, why: BaseException) -> None:
        """The pool connection can't be reused, for *why* (the first reason stays)."""
        if self.broken is None:
            self.broken = detached(why)

    def fail(self, why: BaseException) -> None:
        """The pool stream failed or sent a malformed frame: the calling pump is over."""
        self.done = True
        self.broke(why)


def _no_terminal() -> TimeoutError:
    return TimeoutError("no terminal frame from the peer within %gs" % DRAIN)


def _stop(local: socket.socket) -> None:
    """Shut the local socket down both ways: a read waiting on it returns (EOF) at once."""
    try:
        local.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def relay_framed(
    pool: Stream,
    local: socket.socket,
    acct: list[int],
    rx: int,
    tx: int,
    *,
    limiter: RateLimiter | None = None,
    idle: float = 0.0,
    bufsize: int = 16384,
) -> tuple[str, bytes | None]:
    """Relay one session; return why it ended and, if the pool connection may be reused,
    the bytes read past the peer's terminal (else None: close it).

    ``acct[tx]`` counts bytes written to *local*, ``acct[rx]`` bytes read from it.  Both
    streams are left open."""
    st, sess, reader, chunk = begin(pool, local, limiter, idle, bufsize)
    # what is left of each direction: (bytes to write first, our terminal they complete) for
    # the up pump, bytes for the local socket for the down pump; None = that direction is over
    up_left: tuple[bytes, int] | None = (b"", 0)
    down_left: bytes | None = b""
    if framedhub.usable(pool, local, limiter, idle):  # short sessions never leave the hub
        try:
            up_left, down_left = framedhub.run(pool, local, st, reader, acct, rx, tx, chunk)
        except Exception as exc:  # the pool stream failed, or a malformed frame
            st.fail(exc)
            up_left = down_left = None
    if up_left is not None or down_left is not None:
        pumps(pool, local, st, reader, acct, rx, tx, limiter, sess, chunk, up_left, down_left)
    return outcome(pool, st, reader, idle)


def begin(pool: Stream, local: socket.socket, limiter: RateLimiter | None, idle: float,
          bufsize: int) -> tuple[_State, _Session | None, FrameReader, int]:
    """A session's state, idle clock, frame reader and local read size."""
    if idle > 0:
        local.settimeout(idle)
        pool.settimeout(idle)
    reader = _readers.pop() if _readers else FrameReader(READER_SIZE)
    return _State(), _Session(idle) if idle > 0 else None, reader, _payload(bufsize, limiter)


def pumps(pool: Stream, local: socket.socket, st: _State, reader: FrameReader, acct: list[int],
          rx: int, tx: int, limiter: RateLimiter | None, sess: _Session | None, chunk: int,
          up_left: tuple[bytes, int] | None, down_left: bytes | None) -> None:
    """Run the greenlet pumps from where the hub phase left each direction (``(b"", 0)`` and
    ``b""`` for a session that starts here; None for a direction that is over) until both
    end.  A failure of the pool stream or a malformed frame is recorded in ``st.broken``; a
    kill (BaseException) is raised after the up pump has been ended."""
    main = gevent.getcurrent()
    loop = gevent.get_hub().loop
    timer: list[Any] = []

    def give_up() -> None:  # in the hub: only while the calling pump still runs
        if not st.done:
            main.throw(_GiveUp)

    def upward(first: bytes, terminal: int) -> None:
        aborted = _up(pool, local, st, acct, rx, limiter, sess, chunk, first, terminal)
        if st.done:
            return
        if st.aborted and not aborted:
            # the session failed after our EOF went: the peer can no longer be told to stop
            st.broke(ConnectionAbortedError("the session failed after its half-close"))
        if st.broken is not None:
            loop.run_callback(give_up)
        elif st.aborted:  # the peer's terminal has DRAIN seconds to arrive
            t = loop.timer(DRAIN)
            timer.append(t)
            t.start(_drain_expired, st, give_up)

    up: runners.Job | None = None
    try:
        if up_left is not None:
            up = runners.run(upward, *up_left)
        if down_left is not None:
            _down(pool, local, st, reader, acct, tx, limiter, sess, down_left)
        st.done = True
        if up is not None:
            up.join()
    except _GiveUp:
        st.done = True
        _kill(up)
        st.broke(_no_terminal())
    except Exception as exc:  # the pool stream failed, or a malformed frame
        st.fail(exc)
        _kill(up)
    except BaseException:
        st.done = True
        _kill(up)
        raise
    finally:
        for t in timer:
            t.close()


def outcome(pool: Stream, st: _State, reader: FrameReader, idle: float) -> tuple[str, bytes | None]:
    """Why the session ended, and the bytes read past it if the connection may be reused
    (else None); the frame reader goes back for the next session."""
    reusable = st.broken is None and st.sent
    leftover = reader.rest() if reusable else None
    reader.reset()
    if len(_readers) < KEEP_READERS:
        _readers.append(reader)
    if reusable and idle > 0:
        pool.settimeout(None)
    return _describe(st.broken or st.reason), leftover


def _kill(job: runners.Job | None) -> None:
    if job is not None:
        job.kill(block=True)


def _payload(bufsize: int, limiter: RateLimiter | None) -> int:
    """The local read size: a frame (header included) fills whole 16 KiB TLS records."""
    chunk = min(chunk_size(bufsize, limiter, False), MAX_DATA)
    return chunk - HEADER if chunk > HEADER and chunk % 16384 == 0 else chunk


def _drain_expired(st: _State, give_up: Any) -> None:
    if not st.done:  # else the terminal came in time, and the session is over
        st.broke(_no_terminal())
        give_up()


def _up(pool: Stream, local: socket.socket, st: _State, acct: list[int], idx: int,
        limiter: RateLimiter | None, sess: _Session | None, chunk: int, first: bytes = b"",
        terminal: int = 0) -> bool:
    """Local socket -> DATA frames; then this end's terminal frame.  True if it was ABORT.

    *first*: the rest of a frame the hub phase could not write whole (:mod:`.framedhub`),
    written before anything else; *terminal*: it completes this end's terminal frame, and
    the direction is over once it is out.

    It stops reading once the session is aborted (by either pump): a local socket shut down
    for reading still returns what it had queued, and a sender that never stops (a stream
    the user gave up) would keep it reading."""
    bufs = buffer_pool(chunk + HEADER)  # a read's frame: header in front, one write
    raw_recv_into = local._sock.recv_into
    wait = local._wait
    try:
        if first:
            pool.sendall(first)
        if terminal:
            st.sent = terminal
            return terminal == ABORT
        while not st.aborted:
            buf = bufs.get()
            try:
                n = raw_recv_into(memoryview(buf)[HEADER:], chunk)
            except BlockingIOError:
                bufs.put(buf)
                try:
                    wait(local._read_event)
                except socket.timeout:
                    if sess is not None and not sess.expired():
                        continue
                    st.abort(IdleTimeout(), local)
                    break
                except OSError as exc:  # shut down by an abort (gevent cancels the wait), or failed
                    st.abort(exc, local)
                    break
                continue
            except OSError as exc:  # the local socket failed
                bufs.put(buf)
                st.abort(exc, local)
                break
            if not n:
                bufs.put(buf)
                break
            try:
                pack_data_header(buf, n)
                pool.sendall(memoryview(buf)[: HEADER + n])
            finally:
                bufs.put(buf)
            acct[idx] += n
            if sess is not None:
                sess.last = time.monotonic()
            if limiter is not None:
                limiter.take(n)
        aborted = st.aborted
        pool.sendall(ABORT_FRAME if aborted else EOF_FRAME)
        st.sent = ABORT if aborted else EOF
        return aborted
    except Exception as exc:  # the pool stream failed (a TLS error is not an OSError)
        st.broke(exc)
        return False


def _write_local(local: socket.socket, st: _State, data: Any) -> bool:
    """A data frame's bytes to the local socket; False if that failed and the session is
    aborted (raises where the peer can no longer be told to stop: after this end's EOF)."""
    try:
        send_all(local, data)
    except OSError as exc:
        if st.sent == EOF:  # the peer can't be told to stop any more: give it up
            raise
        st.abort(exc, local)
        return False
    return True


def _down(pool: Stream, local: socket.socket, st: _State, reader: FrameReader, acct: list[int],
          idx: int, limiter: RateLimiter | None, sess: _Session | None, first: bytes = b"") -> None:
    """The peer's frames -> local socket, until the peer's terminal frame (returns) or a
    failure of the pool stream (raises).  *first*: the rest of a data frame the hub phase
    could not write whole (already counted), written before the next frame."""
    recv_into = pool.recv_into
    if first:
        _write_local(local, st, first)  # a failure aborts: what the peer still sends is dropped
    while True:
        kind, data = reader.next()
        if kind == DATA:
            assert data is not None
            if st.aborted or not _write_local(local, st, data):
                continue  # this end gave up the session: the rest is dropped
            n = len(data)
            acct[idx] += n
            if sess is not None:
                sess.last = time.monotonic()
            if limiter is not None:
                limiter.take(n)
        elif kind == NEED:
            room = reader.room()
            try:
                n = recv_into(room, len(room))
            except socket.timeout:
                if sess is None or not sess.expired() or st.aborted:
                    continue  # after an abort, DRAIN decides
                if st.sent == EOF:  # as for a failed write after our EOF
                    raise IdleTimeout() from None
                st.abort(IdleTimeout(), local)
                continue
            if not n:
                raise ConnectionResetError("pool connection closed in mid-session")
            reader.filled(n)
        elif kind == ABORT:
            st.abort(ConnectionAbortedError("the peer aborted the session"), local)
            return
        else:  # EOF
            try:
                local.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return
