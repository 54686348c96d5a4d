"""Plain-TCP pool connections set up in hub callbacks: no greenlet per pool connection.

Setting up a pool connection moves a few bytes each way: the client connects, sends its
proof (authenticated tunnels only) and reads the server's 4-byte id; the server reads that
proof and writes the id.  Done in a greenlet, each end paid a greenlet (a frame stack mapped
and unmapped), a timeout object and a wait through the hub for those few bytes, and a tunnel
refills one pool connection per session: with the refill suppressed, a tls=0 tunnel session
cost a third less CPU.  Here each end is a small state machine on the socket's own libev
watchers and one timer, run in hub callbacks, which never wait: a read takes what is there
and the watcher brings the rest; a write is a few bytes into an empty send buffer, and one
that does not go out whole fails the set-up.

TLS and QUIC pool connections, and a connection that may be a handshake taking over the
control slot, keep the greenlet path.  Whatever the outcome, exactly one of the callbacks
runs, once, and a failed set-up closes its socket.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from typing import Any

import gevent
from gevent import socket

from ..net import lightsock
from ..net.sockopt import established, tune_tcp, write_nowait


class Cancelled(ConnectionAbortedError):
    """The set-up's owner closed (``on_fail`` gets this)."""


Done = Callable[[socket.socket, bytes], None]
Failed = Callable[[BaseException], None]


class Setup:
    """One set-up in progress: connect (client), write, read *need* bytes, within deadlines."""

    __slots__ = ("buf", "need", "on_done", "on_fail", "owner", "sock", "timer", "watcher")

    def __init__(self, sock: socket.socket, on_done: Done, on_fail: Failed,
                 owner: set[Setup] | None = None) -> None:
        self.sock = sock
        self.on_done, self.on_fail = on_done, on_fail
        self.owner = owner  # the set of set-ups still in progress, for a close to cancel
        self.buf = b""
        self.need = 0
        self.watcher: Any = None
        self.timer: Any = None
        if owner is not None:
            owner.add(self)

    # -- steps -------------------------------------------------------------------------------
    def connect(self, address: tuple[Any, ...], timeout: float, then: Callable[[], None]) -> None:
        """Start a non-blocking connect; *then* runs once it is up (at once on loopback)."""
        raw = self.sock._sock
        err = raw.connect_ex(address)
        if err == 0 or (err == errno.EINPROGRESS and established(raw)):
            self._step(then)
            return
        if err not in (errno.EINPROGRESS, errno.EINTR):
            self._fail(OSError(err, os.strerror(err)))
            return
        self._arm(timeout)
        self._watch(self.sock._write_event, _Bound(self, lambda: self._connected(then)).fire)

    def _connected(self, then: Callable[[], None]) -> None:
        self._unwatch()
        err = self.sock._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(OSError(err, os.strerror(err)))
        else:
            self._step(then)

    def write(self, data: bytes) -> None:
        send_now(self.sock, data)

    def read(self, need: int, timeout: float) -> None:
        """Read exactly *need* bytes within *timeout*, then hand them to ``on_done``."""
        self.need, self.buf = need, b""
        self._arm(timeout)
        self._watch(self.sock._read_event, self.readable)  # a bound method: cancel_wait throws here

    # -- callbacks (in the hub: nothing here waits) -----------------------------------------
    def readable(self) -> None:
        try:
            data = self.sock._sock.recv(self.need - len(self.buf))
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(exc)
            return
        if not data:
            self._fail(ConnectionResetError("connection closed after %d of %d bytes"
                                            % (len(self.buf), self.need)))
            return
        self.buf += data
        if len(self.buf) == self.need:
            self._end()
            self._call(self.on_done, self.sock, self.buf)

    def poke(self) -> None:
        """Take what the socket holds now, without waiting for the watcher's turn: for an owner
        that knows the bytes are due (a launch signal naming an id not read yet)."""
        if self.need and self.on_fail is not None:
            self.readable()

    def throw(self, error: BaseException, *args: Any) -> None:
        """gevent's ``cancel_wait`` calls this when the socket is closed under the watcher."""
        self._fail(error)

    def _expired(self) -> None:
        self._fail(socket.timeout("timed out"))

    # -- plumbing ----------------------------------------------------------------------------
    def _step(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # OSError from a write, or a bug: the set-up fails, the hub lives
            self._fail(exc)

    def _arm(self, timeout: float) -> None:
        self._disarm()
        self.timer = gevent.get_hub().loop.timer(timeout)
        self.timer.start(self._expired)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.stop()
            self.timer.close()
            self.timer = None

    def _watch(self, watcher: Any, callback: Callable[[], None]) -> None:
        self.watcher = watcher
        watcher.start(callback)

    def _unwatch(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None

    def _end(self) -> bool:
        """Stop everything; False if the set-up had already ended."""
        if self.on_fail is None:
            return False
        self._unwatch()
        self._disarm()
        if self.owner is not None:
            self.owner.discard(self)
        return True

    def _fail(self, exc: BaseException) -> None:
        on_fail = self.on_fail
        if not self._end():
            return
        self.sock.close()
        self._call(on_fail, exc)

    def _call(self, fn: Any, *args: Any) -> None:
        self.on_done = self.on_fail = None  # type: ignore[assignment]  # ended: never again
        try:
            fn(*args)
        except Exception:  # the owner's bug: report it as gevent would, keep the hub running
            gevent.get_hub().handle_error(self, *sys.exc_info())

    def cancel(self) -> None:
        """The owner closes: end the set-up now (``on_fail`` runs with :class:`Cancelled`)."""
        self._fail(Cancelled("pool closed"))


class _Bound:
    """A watcher callback other than ``readable`` whose object gevent's ``cancel_wait`` can
    throw into (it calls ``callback.__self__.throw``)."""

    __slots__ = ("fn", "setup")

    def __init__(self, setup: Setup, fn: Callable[[], None]) -> None:
        self.setup, self.fn = setup, fn

    def fire(self) -> None:
        self.setup._step(self.fn)

    def throw(self, error: BaseException, *args: Any) -> None:
        self.setup._fail(error)


def send_now(sock: socket.socket, data: bytes) -> None:
    """A few bytes into a send buffer that holds nothing yet, without waiting: all go out, or
    ConnectionError."""
    if write_nowait(sock, data) != len(data):
        raise ConnectionError("pool set-up: a %d-byte write did not go out whole" % len(data))


def dial(family: int, address: tuple[Any, ...], proof: bytes, connect_timeout: float,
         id_timeout: float, keepalive: float, on_done: Done, on_fail: Failed,
         owner: set[Setup] | None = None) -> Setup | None:
    """Client: connect, send *proof* (if any), read the 4-byte id; ``on_done(sock, id)``.
    Never raises: a socket that can't be had (EMFILE) goes to ``on_fail`` at once."""
    try:
        sock = lightsock.tcp_socket(family)
    except OSError as exc:
        on_fail(exc)
        return None
    setup = Setup(sock, on_done, on_fail, owner)

    def connected() -> None:
        tune_tcp(sock, keepalive)
        if proof:
            setup.write(proof)
        setup.read(4, id_timeout)

    setup._step(lambda: setup.connect(address, connect_timeout, connected))
    return setup


def admit(sock: socket.socket, proof_len: int, timeout: float, on_done: Done, on_fail: Failed,
          owner: set[Setup] | None = None) -> Setup:
    """Server: read the client's *proof_len*-byte proof; ``on_done(sock, proof)``."""
    setup = Setup(sock, on_done, on_fail, owner)
    setup.read(proof_len, timeout)
    return setup
