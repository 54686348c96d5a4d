"""Idle pool connections and the client's refill manager.

:class:`PoolConn` is one pre-established connection (plain TCP, TLS, or a QUIC
stream) with the 8-hex-digit id the server gave it.  :class:`IdlePool` keeps
the idle ones:

* ``take_any(timeout)`` for the side that receives user traffic: the newest
  idle connection that is still alive (a dead one, or one with data nobody
  should have sent yet, is dropped).  Not the oldest: a Go server takes the
  oldest for its one-off TLS verify signal and closes it at once, and a user
  session on that connection would die with it;
* ``take(cid, timeout)`` for the side that got a launch signal naming *cid*:
  waits for that id to arrive (no polling: ``add`` hands it over directly); a
  miss counts a pool error, which drives NodePass's flush rule.

No greenlet is parked per idle connection (an idle connection costs a socket
and a small object); liveness is checked when a connection is handed out and
by a periodic sweep.

:class:`ClientPool` adds the refill manager: every ``interval`` it opens
``capacity - idle - in_flight`` connections concurrently, then adapts capacity
and interval (:mod:`npgevent.pool.base`).  Plain TCP connections are set up in
hub callbacks (``hub_dial``, :mod:`npgevent.pool.hubsetup`); TLS ones through a
gevent greenlet pool.

Pool connections are single-use, as in NodePass: whoever takes one closes it after its
session.  Between npgevent peers at extension level 2 (TLS pools) a TCP session's connection
is *lent* instead (``lend``) and comes back after it (``finish``) when the session ended
cleanly at both ends (:mod:`npgevent.relay.framed`); it keeps its id meanwhile.  The client
counts lent connections toward its pool, up to half the capacity (a long session's
connection is still replaced), and the receiving side keeps a returning one only while its
idle pool is below the server's ``max`` (else closes it: the dialling side never picks a
connection by itself, and drops it when its sweep sees the close).  So after a burst the
pool stays as large as the burst needed, up to ``max``, as NodePass's adaptive capacity can
grow it too.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import AsyncResult, Event
from gevent.pool import Pool

from ..log import InstanceLog
from ..net.sockopt import peek
from .base import Adaptive


class PoolConn:
    """One idle (then used) pool connection."""

    __slots__ = ("cid", "sock", "stream")

    def __init__(self, cid: str, stream: Any, sock: Any) -> None:
        self.cid = cid
        self.stream = stream  # what the relay reads and writes
        self.sock = sock  # the transport (gevent socket, or the QUIC stream itself)

    def alive(self, strict: bool) -> bool:
        """Non-blocking check; with *strict*, pending data also disqualifies the connection."""
        probe = getattr(self.stream, "probe", None)
        if probe is not None:  # TLS and QUIC streams know best
            ok = bool(probe())
            return ok and not (strict and getattr(self.stream, "has_pending", False))
        try:
            data = peek(self.sock)
        except OSError:
            return False
        if data is None:
            return True
        return bool(data) and not strict

    def close(self) -> None:
        try:
            self.stream.close()
        except OSError:
            pass


def new_cid() -> str:
    return os.urandom(4).hex()


class IdlePool:
    """Idle pool connections by id (see module docstring)."""

    def __init__(self, log: InstanceLog) -> None:
        self.log = log
        self.idle: dict[str, PoolConn] = {}
        self.errors = 0
        self.closed = False
        self._wanted: dict[str, AsyncResult] = {}
        self._any: deque[AsyncResult] = deque()
        self.lent: dict[str, PoolConn] = {}  # level 2: on a session now, back after it
        self.max_idle = 0  # the receiving side keeps returning connections below this (0: any)
        self.on_take: Callable[[], None] | None = None  # the client's refill manager listens

    def _taken(self) -> None:
        if self.on_take is not None:
            self.on_take()

    @property
    def active(self) -> int:
        return len(self.idle)

    def add(self, conn: PoolConn) -> bool:
        if self.closed:
            conn.close()
            return False
        waiter = self._wanted.pop(conn.cid, None)
        if waiter is not None and not waiter.ready():
            waiter.set(conn)
            return True
        while self._any:
            waiter = self._any.popleft()
            if not waiter.ready():
                waiter.set(conn)
                return True
        if conn.cid in self.idle:
            self.log.debug("Tunnel connection: duplicate id %s dropped", conn.cid)
            conn.close()
            return False
        self.idle[conn.cid] = conn
        return True

    def lend(self, conn: PoolConn) -> None:
        """*conn* carries a session and comes back after it (see module docstring)."""
        self.lent[conn.cid] = conn

    def finish(self, conn: PoolConn, leftover: bytes | None, trim: bool = False) -> bool:
        """After a session on *conn*: back to the idle pool if the session left it reusable
        (*leftover*, the bytes read past it, is not None), it was lent since the last flush,
        and (with *trim*, the receiving side) fewer than :attr:`max_idle` are idle; else
        closed.  True if it went back."""
        lent = self.lent.get(conn.cid) is conn
        if lent:
            del self.lent[conn.cid]
        kept = (leftover is not None and lent and not self.closed
                and not (trim and self.max_idle and len(self.idle) >= self.max_idle)
                and (not leftover or hasattr(conn.stream, "unread")))  # a plain socket can't take it back
        if kept:
            if leftover:
                conn.stream.unread(leftover)
            return self.add(conn)
        conn.close()
        if lent:
            self._taken()  # it won't come back: the client's refill replaces it
        return False

    def discard(self, cid: str) -> None:
        conn = self.idle.pop(cid, None)
        if conn is not None:
            conn.close()

    def take_any(self, timeout: float, newest: bool = True) -> PoolConn | None:
        """An idle connection that is alive: the newest (the least likely to have died, and not
        the one a Go server takes for its TLS verify signal, which is the oldest), or with
        ``newest=False`` the oldest."""
        deadline = time.monotonic() + timeout
        while not self.closed:
            while self.idle:
                cid = next(reversed(self.idle)) if newest else next(iter(self.idle))
                conn = self.idle.pop(cid)
                self._taken()
                if conn.alive(strict=True):
                    return conn
                self.log.debug("Tunnel connection: %s dead or unclean, dropped", cid)
                conn.close()
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            waiter: AsyncResult = AsyncResult()
            self._any.append(waiter)
            got = waiter.wait(left)
            if not waiter.ready():
                waiter.set(None)  # mark abandoned so add() skips it
                return None
            conn = got
            if conn is None:
                return None
            if conn.alive(strict=True):
                return conn
            conn.close()
        return None

    def take_clean(self, newest: bool) -> PoolConn | None:
        """An idle connection that is alive and carries nothing yet, without waiting.

        Unlike :meth:`take_any` it leaves a connection that holds data where it is: on the
        dialling side that is one the peer already gave a user and wrote on, whose launch
        signal is still on its way and will claim it (a Go client hands out the oldest
        connection and writes before it signals).  Dead connections are dropped."""
        for cid in list(reversed(self.idle)) if newest else list(self.idle):
            conn = self.idle[cid]
            if conn.alive(strict=True):
                del self.idle[cid]
                self._taken()
                return conn
            if not conn.alive(strict=False):
                self.log.debug("Tunnel connection: %s dead, dropped", cid)
                self.discard(cid)
        return None

    def settle(self) -> None:
        """Take in the connections whose id is on their socket but not read yet (a launch can
        name one): none here, where connections arrive complete; see :meth:`ClientPool.settle`."""

    def claim(self, cid: str) -> PoolConn | None:
        """*cid* if it is idle now, without waiting."""
        conn = self.idle.pop(cid, None)
        if conn is not None:
            self._taken()
        return conn

    def take(self, cid: str, timeout: float) -> PoolConn | None:
        conn = self.claim(cid)
        if conn is not None:
            return conn
        if self.closed:
            return None
        waiter: AsyncResult = AsyncResult()
        self._wanted[cid] = waiter
        conn = waiter.wait(timeout)
        if not waiter.ready():
            if self._wanted.get(cid) is waiter:
                del self._wanted[cid]
            waiter.set(None)
            self.errors += 1
            return None
        if conn is None:
            self.errors += 1
        return conn

    def sweep(self, strict: bool) -> int:
        """Drop idle connections the peer closed; return how many."""
        dead = [cid for cid, conn in self.idle.items() if not conn.alive(strict)]
        for cid in dead:
            self.discard(cid)
        return len(dead)

    def flush(self) -> None:
        self.lent.clear()  # those on a session now are closed after it, at both ends
        conns, self.idle = list(self.idle.values()), {}
        for conn in conns:
            conn.close()
        self.errors = 0

    def close(self) -> None:
        self.closed = True
        self.flush()
        for waiter in list(self._wanted.values()) + list(self._any):
            if not waiter.ready():
                waiter.set(None)
        self._wanted.clear()
        self._any.clear()


#: a dial in hub callbacks: hub_dial(on_conn, on_fail, in_progress) (see ClientPool.hub_dial)
HubDial = Callable[[Callable[[PoolConn], None], Callable[[BaseException], None], set[Any]], Any]

REFILL_DEFER = 0.001  # s: a reactive refill starts this long after the take that woke it


class ClientPool(IdlePool):
    """The client's pool: keeps ``capacity`` idle connections, refilled adaptively.

    Capacity and interval follow NodePass's rules, evaluated once per interval.
    Beyond Go, refilling is also reactive: taking a connection wakes the manager,
    which tops the pool up at once instead of at the next tick, so a burst of
    sessions does not drain the pool for a whole interval.  Failures slow it down
    instead: the dials of a round not yet started when one of them failed are not
    made, and until a dial succeeds again each interval sends one dial as a probe
    (a server that just died, or its replacement still waiting for the control
    connection, gets one connection at a time, not the whole pool).
    """

    def __init__(
        self,
        log: InstanceLog,
        connector: Callable[[], PoolConn],
        adaptive: Adaptive,
        concurrency: int = 64,
        report_every: float = 5.0,
        hub_dial: HubDial | None = None,
    ) -> None:
        super().__init__(log)
        self.connector = connector
        #: plain TCP: starts a dial run in hub callbacks (:mod:`.hubsetup`) instead of a greenlet
        self.hub_dial = hub_dial
        self.setups: set[Any] = set()  # hub dials in progress, cancelled by close()
        self.concurrency = concurrency  # dials in flight at most, as the greenlet pool allows
        self._capped = False  # a round opened fewer than it needed: a finished dial wakes the loop
        self.adaptive = adaptive
        self.max_idle = adaptive.max_capacity  # the server's max=, as on the server
        self.in_flight = 0
        self.dialers = Pool(concurrency)
        self.report_every = report_every
        self._last_fail_log = 0.0
        self._fails = 0
        self._wake = Event()
        self.on_take = self._wake.set

    def run(self) -> None:
        """The refill loop (run it as a background task)."""
        ad = self.adaptive
        created = 0
        tick = time.monotonic() + ad.interval
        while not self.closed:
            # a lent connection comes back after its session: up to half the pool counts
            lent = min(len(self.lent), ad.capacity // 2)
            need = ad.need(len(self.idle), self.in_flight + lent) if self._fails < 3 else 0
            if self._fails and need:
                # after failures, one dial probes the server; its success brings the rest
                need = 0 if self.in_flight else 1
            if self.hub_dial is not None and need > self.concurrency - self.in_flight:
                need, self._capped = max(0, self.concurrency - self.in_flight), True
            fails = self._fails
            for _ in range(need):
                self.in_flight += 1
                if self.hub_dial is not None:
                    self.hub_dial(self._dialled, self._dial_failed, self.setups)
                else:
                    self.dialers.spawn(self._dial_one, fails)
            created += need
            left = tick - time.monotonic()
            if left <= 0:
                ad.update(len(self.idle), created)
                created = 0
                tick = time.monotonic() + ad.interval
                self._fails = min(self._fails, 2)  # after failures, retry once per interval
                continue
            self._wake.clear()
            if self._wake.wait(left) and REFILL_DEFER:
                # woken by a take: let the session that took the connection dial its target
                # first, so the refill's connect and handshake are not in its path
                gevent.sleep(REFILL_DEFER)

    def _dial_one(self, fails: int = 0) -> None:
        """One greenlet dial of a round that started with *fails* failures counted.  A TLS
        round's dials start one after another (each handshake's first flight costs CPU before
        the next greenlet runs: ~100 ms for 64 on a loaded machine), so a dial whose round has
        failed meanwhile is not started: the server is likely gone, and its replacement must
        not find a queue of stale dials in its backlog before the control connection (a Go
        server reads pre-handshake connections one at a time, with ``NP_SERVICE_COOLDOWN``
        after each that is not a handshake).  The next interval retries."""
        if self._fails > fails:
            self.in_flight -= 1
            return
        try:
            conn = self.connector()
        except (OSError, gevent.Timeout) as exc:
            self._failed(exc)
            return
        finally:
            self.in_flight -= 1
        self._succeeded()
        self.add(conn)

    def settle(self) -> None:
        """Finish now the hub dials whose id has arrived but is not read yet (a launch signal can
        name one: the control line and the pool connection are read in the same loop turn, in
        either order)."""
        for setup in list(self.setups):
            setup.poke()

    def _dialled(self, conn: PoolConn) -> None:
        self._dial_ended()
        self._succeeded()
        self.add(conn)

    def _succeeded(self) -> None:
        if self._fails:
            self._fails = 0
            self._wake.set()  # a probe got through: the rest of the pool now

    def _dial_failed(self, exc: BaseException) -> None:
        self._dial_ended()
        if not self.closed:
            self._failed(exc)

    def _dial_ended(self) -> None:
        self.in_flight -= 1
        if self._capped:  # the loop left some dials for later: now there is room
            self._capped = False
            self._wake.set()

    def _failed(self, exc: BaseException) -> None:
        self._fails += 1
        now = time.monotonic()
        if now - self._last_fail_log >= self.report_every:
            self._last_fail_log = now
            self.log.error("Tunnel pool: cannot open pool connections (%d failed): %s",
                           self._fails, exc)
        else:
            self.log.debug("Tunnel pool: dial failed: %s", exc)

    def close(self) -> None:
        super().close()
        self.dialers.kill(block=False)
        for setup in list(self.setups):
            setup.cancel()


def read_exact(stream: Any, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = stream.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError("connection closed after %d of %d bytes" % (len(buf), n))
        buf += chunk
    return buf
