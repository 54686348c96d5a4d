"""Two-way TCP relay between a user-side and a target-side stream.

Between two plain gevent sockets with no idle timeout and no rate limit, :func:`relay`
hands the session to :mod:`npgevent.relay.tcphub`: small reads are passed on from hub
callbacks, and a direction takes a greenlet (the pump below) only for bulk or for a write
that has to wait.  Everything else (TLS and QUIC streams, ``read=``, ``rate=``) relays here.

One direction runs in the calling greenlet, the other on a parked worker greenlet
(:mod:`npgevent.relay.runners`: cheaper than a new greenlet per session).  Each
direction ("pump") starts with ``recv_into`` + ``sendall`` through a private
buffer, which is the cheapest path for small request/response traffic.  When a
read fills the buffer, the transfer is bulk: if both ends are plain gevent
sockets on Linux, the pump switches to ``os.splice`` through a pipe (zero-copy:
the payload never enters Python), waiting on the sockets' own gevent watchers.

Half-close is propagated: when one direction reaches EOF, the pump shuts down
the write side of its destination and the other direction carries on until it
ends too.  Any error (reset, broken pipe, idle timeout) ends both directions:
the failing pump kills the other greenlet, and sockets are only closed by the
caller once both pumps are dead, so no pump can touch a file descriptor that was
closed and reused under it.

``idle`` (the URL's ``read=``) is an idle timeout for the *session*: a pump
whose read times out ends the session only if the other direction has been
idle for as long too, so a long one-way transfer is not cut.

Streams are gevent sockets or anything with the same few methods (the TLS and
QUIC stream wrappers): ``recv_into``, ``sendall``, ``shutdown``, ``settimeout``.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from typing import Any, Protocol

import gevent
from gevent import socket

from ..errors import detached
from ..net.lightsock import PLAIN
from ..net.sockopt import send_all
from . import runners, tcphub
from .limit import RateLimiter

SPLICE_OK = sys.platform.startswith("linux") and hasattr(os, "splice")
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20
SPLICE_CHUNK = 1 << 20
STREAM_CHUNK = 1 << 16


class Stream(Protocol):
    def recv_into(self, buffer: Any, nbytes: int = ..., flags: int = ...) -> int: ...

    def sendall(self, data: Any, flags: int = ...) -> Any: ...

    def shutdown(self, how: int) -> None: ...

    def settimeout(self, value: float | None) -> None: ...

    def close(self) -> None: ...


class IdleTimeout(Exception):
    """The session was idle for longer than ``read=``."""

    def __str__(self) -> str:
        return "idle timeout"


class _Abort(BaseException):
    """Thrown into the calling pump when the other direction failed.

    A BaseException so the pump's ``except Exception`` cannot swallow it."""


class _Session:
    __slots__ = ("idle", "last")

    def __init__(self, idle: float) -> None:
        self.idle = idle
        self.last = time.monotonic()

    def expired(self) -> bool:
        return time.monotonic() - self.last >= self.idle


def relay(
    user: Stream,
    target: Stream,
    acct: list[int],
    rx: int,
    tx: int,
    *,
    limiter: RateLimiter | None = None,
    idle: float = 0.0,
    bufsize: int = 16384,
    splice: bool = True,
) -> str:
    """Copy both ways until both directions end; return why it ended.

    ``acct[tx]`` counts bytes written to *target*, ``acct[rx]`` bytes read from
    it.  Sockets are left open: the caller closes them.
    """
    can_splice = (splice and SPLICE_OK and type(user) in PLAIN
                  and type(target) in PLAIN)
    if tcphub.usable(user, target, limiter, idle):
        return _describe(tcphub.relay_in_hub(user, target, acct, rx, tx,
                                             chunk_size(bufsize, None, can_splice), can_splice))
    sess = _Session(idle) if idle > 0 else None
    if idle > 0:
        user.settimeout(idle)
        target.settimeout(idle)
    main = gevent.getcurrent()
    state = {"main_done": False}
    loop = gevent.get_hub().loop

    def abort_main() -> None:
        # decided in the hub, when it runs: by then the calling pump may have ended on its
        # own, and the calling greenlet may be past this relay (an abort must not follow it)
        if not state["main_done"]:
            main.throw(_Abort)

    def backward() -> BaseException | None:
        err = _pump(target, user, acct, rx, limiter, sess, bufsize, can_splice)
        if err is not None and not state["main_done"]:
            loop.run_callback(abort_main)
        return err

    back = runners.run(backward)
    try:
        err: BaseException | None = _pump(user, target, acct, tx, limiter, sess, bufsize,
                                          can_splice)
        state["main_done"] = True
        if err is not None:
            back.kill(block=True)
            return _describe(err)
        back.join()
        return _describe(back.value) if back.value is not None else "EOF"
    except _Abort:
        state["main_done"] = True
        back.join()
        return _describe(back.value)
    except BaseException:
        state["main_done"] = True
        back.kill(block=True)
        raise


def _describe(err: BaseException | None) -> str:
    if err is None:
        return "EOF"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__


class BufferPool:
    """Reusable relay buffers, so an idle connection holds none.

    A pump takes a buffer only once its socket is readable and gives it back
    after the chunk was written on, as Go's buffer pool does; 10,000 idle
    connections then cost no buffer memory at all.
    """

    __slots__ = ("_free", "keep", "size")

    def __init__(self, size: int, keep: int = 256) -> None:
        self.size = size
        self.keep = keep
        self._free: list[bytearray] = []

    def get(self) -> bytearray:
        free = self._free
        return free.pop() if free else bytearray(self.size)

    def put(self, buf: bytearray) -> None:
        if len(self._free) < self.keep:
            self._free.append(buf)


_pools: dict[int, BufferPool] = {}


def buffer_pool(size: int) -> BufferPool:
    pool = _pools.get(size)
    if pool is None:
        pool = _pools[size] = BufferPool(size)
    return pool


def chunk_size(bufsize: int, limiter: RateLimiter | None, can_splice: bool) -> int:
    """The read size of a direction: ``NP_TCP_DATA_BUF_SIZE``, at most the limiter's chunk, and
    at least :data:`STREAM_CHUNK` where nothing splices and nothing limits (into TLS/QUIC:
    fewer, larger writes; buffers are pooled)."""
    chunk = bufsize if limiter is None else min(bufsize, limiter.chunk)
    if not can_splice and limiter is None:
        chunk = max(chunk, STREAM_CHUNK)
    return chunk


def _pump(
    src: Stream,
    dst: Stream,
    acct: list[int],
    idx: int,
    limiter: RateLimiter | None,
    sess: _Session | None,
    bufsize: int,
    can_splice: bool,
) -> BaseException | None:
    """Copy src -> dst until EOF (then half-close dst). Return the error, or None."""
    chunk = chunk_size(bufsize, limiter, can_splice)
    try:
        if type(src) in PLAIN:
            _copy_socket(src, dst, acct, idx, limiter, sess, chunk, can_splice)
        else:
            _copy_stream(src, dst, acct, idx, limiter, sess, chunk)
    except Exception as exc:  # OSError, IdleTimeout, a TLS error from a wrapper: end the session
        return detached(exc)  # kept by the caller: not with the frames that raised it
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    return None


def _copy_socket(
    src: socket.socket,
    dst: Stream,
    acct: list[int],
    idx: int,
    limiter: RateLimiter | None,
    sess: _Session | None,
    chunk: int,
    can_splice: bool,
) -> None:
    """Plain gevent socket source: pooled buffers, reads on the raw socket, splice for bulk."""
    pool = buffer_pool(chunk)
    raw_recv_into = src._sock.recv_into  # non-blocking stdlib socket under the gevent one
    wait = src._wait
    while True:
        buf = pool.get()
        try:
            n = raw_recv_into(buf, chunk)
        except BlockingIOError:
            pool.put(buf)
            try:
                wait(src._read_event)
            except socket.timeout:
                if sess is not None and not sess.expired():
                    continue
                raise IdleTimeout() from None
            continue
        except BaseException:
            pool.put(buf)
            raise
        if not n:
            pool.put(buf)
            return
        try:
            send_all(dst, memoryview(buf)[:n])
        finally:
            pool.put(buf)
        acct[idx] += n
        if sess is not None:
            sess.last = time.monotonic()
        if limiter is not None:
            limiter.take(n)
        if can_splice and n == chunk:
            _splice_loop(src, dst, acct, idx, limiter, sess)
            return


def _copy_stream(
    src: Stream,
    dst: Stream,
    acct: list[int],
    idx: int,
    limiter: RateLimiter | None,
    sess: _Session | None,
    chunk: int,
) -> None:
    """Any other stream (TLS, QUIC): its own blocking recv_into with a private buffer."""
    chunk = max(chunk, STREAM_CHUNK)  # TLS/QUIC reads gather several records per call
    buf = bytearray(chunk)
    view = memoryview(buf)
    while True:
        try:
            n = src.recv_into(buf, chunk)
        except socket.timeout:
            if sess is not None and not sess.expired():
                continue
            raise IdleTimeout() from None
        if not n:
            return
        send_all(dst, view[:n])
        acct[idx] += n
        if sess is not None:
            sess.last = time.monotonic()
        if limiter is not None:
            limiter.take(n)


def _splice_loop(
    src: socket.socket,
    dst: socket.socket,
    acct: list[int],
    idx: int,
    limiter: RateLimiter | None,
    sess: _Session | None,
) -> None:
    """Zero-copy src -> dst through a pipe until EOF (raises on errors)."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        try:
            import fcntl

            fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass
        chunk = SPLICE_CHUNK if limiter is None else limiter.chunk
        sfd, dfd = src.fileno(), dst.fileno()
        wait = src._wait  # the socket's own watchers: close() cancels the wait
        splice = os.splice
        flags = _SPLICE_FLAGS
        while True:
            try:
                n = splice(sfd, w, chunk, flags=flags)
            except BlockingIOError:
                try:
                    wait(src._read_event)
                except socket.timeout:
                    if sess is not None and not sess.expired():
                        continue
                    raise IdleTimeout() from None
                continue
            if n == 0:
                return
            left = n
            while left:
                try:
                    left -= splice(r, dfd, left, flags=flags)
                except BlockingIOError:
                    dst._wait(dst._write_event)
            acct[idx] += n
            if sess is not None:
                sess.last = time.monotonic()
            if limiter is not None:
                limiter.take(n)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise OSError(errno.EINVAL, "splice not supported on these sockets") from exc
        raise
    finally:
        os.close(r)
        os.close(w)
