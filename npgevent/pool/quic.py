"""The QUIC pool (``quic=1``): pool connections are QUIC streams.

Server: one QUIC endpoint on the tunnel address (TLS 1.3, ALPN ``np-quic``);
connections from any IP but the control connection's are closed; a new
bidirectional stream must send the byte ``0x00``, is answered with 4 random
bytes (its id) and then waits in the idle pool like a TCP pool connection.

Client: ceil(max / 128) QUIC connections (1 to 64), each redialled 500 ms after
it dies; the pool's connector opens a stream on the least loaded live
connection (at most 128 streams each), writes ``0x00`` (and, authenticated, its pool
proof in the same packet) and reads the id.  The
idle pool, adaptive refill, flush and verify logic are the TCP pool's.
"""

from __future__ import annotations

import collections
import math
from typing import Any

import gevent
from gevent.event import Event
from gevent.pool import Group

from ..log import ERROR, WARN, InstanceLog
from ..protocol.auth import POOL_PROOF, PoolProver, PoolVerifier
from ..quic.engine import QuicEngine
from ..quic.stream import QuicStream
from .tcp import IdlePool, PoolConn, new_cid, read_exact

MAX_STREAMS = 128
REDIAL_DELAY = 0.5


def connection_count(server_max: int) -> int:
    return max(1, min(64, math.ceil(server_max / MAX_STREAMS)))


class QuicServerPool:
    """Accepts pool streams for a server's :class:`IdlePool`."""

    def __init__(self, engine: QuicEngine, pool: IdlePool, max_idle: int, timeout: float,
                 log: InstanceLog, group: Group, verifier: PoolVerifier | None = None) -> None:
        self.engine, self.pool, self.max_idle = engine, pool, max_idle
        self.timeout, self.log, self.group = timeout, log, group
        self.verifier = verifier  # an authenticated tunnel: every stream proves membership
        engine.on_new_stream = self._new_stream

    def _new_stream(self, stream: QuicStream) -> None:
        # called in the hub: hand the blocking part to a greenlet
        self.group.spawn(self._accept, stream)

    def _accept(self, stream: QuicStream) -> None:
        if self.pool.active >= self.max_idle:
            self.log.debug("Tunnel connection: QUIC stream refused: pool full (%d)", self.max_idle)
            stream.close()
            return
        stream.settimeout(self.timeout)
        try:
            hello = read_exact(stream, 1)
            if hello != b"\x00":
                raise ConnectionError("bad stream hello %r" % hello)
            if self.verifier is not None and not self.verifier.check(read_exact(stream, POOL_PROOF)):
                self.log.limited(WARN, "pool-proof", "Tunnel connection: QUIC stream refused: it did not "
                                 "prove membership of the authenticated tunnel")
                stream.close()
                return
            cid = new_cid()
            while cid in self.pool.idle:
                cid = new_cid()
            stream.sendall(bytes.fromhex(cid))
        except (OSError, gevent.Timeout) as exc:
            self.log.debug("Tunnel connection: QUIC stream dropped: %s", exc)
            stream.close()
            return
        stream.settimeout(None)
        self.pool.add(PoolConn(cid, stream, stream))


class QuicConnector:
    """The client's QUIC connections and the pool connector that opens streams on them."""

    def __init__(self, engine: QuicEngine, ip: str, port: int, config: Any, count: int,
                 dial_timeout: float, id_timeout: float, log: InstanceLog,
                 prover: PoolProver | None = None, fingerprint: str = "") -> None:
        self.engine, self.ip, self.port, self.config = engine, ip, port, config
        self.count, self.dial_timeout, self.id_timeout, self.log = count, dial_timeout, id_timeout, log
        self.prover = prover  # an authenticated tunnel: every stream proves membership
        self.fingerprint = fingerprint  # ... and every connection shows the vouched certificate
        self.conns: list[int | None] = [None] * count
        # streams being opened, per connection: a refill opens many at once, and each must
        # count where it goes before the engine has registered the others (else they all
        # land on one connection, whose every packet then walks all of them)
        self._opening: collections.Counter[int] = collections.Counter()
        # the first refill waits (up to the dial timeout) until every connection has been
        # dialled once, so that its streams spread over all of them
        self._untried = set(range(count))
        self._all_tried = Event()
        self._changed = Event()
        self.group = Group()
        engine.on_conn_closed = self._closed

    def start(self) -> None:
        for slot in range(self.count):
            self.group.spawn(self._keep, slot)

    def _keep(self, slot: int) -> None:
        """Keep one connection up: dial, wait for it to die, redial after 500 ms."""
        while True:
            try:
                conn = self.engine.dial(self.ip, self.port, self.config, self.dial_timeout)
            except (OSError, gevent.Timeout) as exc:
                self.log.debug("QUIC connection %d: %s", slot, exc)
                self._tried(slot)
                gevent.sleep(REDIAL_DELAY)
                continue
            self._tried(slot)
            seen = self.engine.fingerprints.get(conn, "")
            if self.fingerprint and seen != self.fingerprint:
                self.log.limited(ERROR, "cert-mismatch", "QUIC connection to %s:%d refused: its certificate "
                                 "%s is not the one the authenticated server vouched for (%s): a man in "
                                 "the middle?" % (self.ip, self.port, seen or "(none)", self.fingerprint))
                self.engine.close_conn(conn)
                gevent.sleep(REDIAL_DELAY)
                continue
            self.conns[slot] = conn
            self._notify()
            while self.engine.conn_alive(conn):
                self._changed.wait()
            self.conns[slot] = None
            gevent.sleep(REDIAL_DELAY)

    def _tried(self, slot: int) -> None:
        self._untried.discard(slot)
        if not self._untried:
            self._all_tried.set()

    def _closed(self, conn: int, reason: str) -> None:
        self.log.debug("QUIC connection closed: %s", reason)
        self._notify()

    def _notify(self) -> None:
        ev, self._changed = self._changed, Event()
        ev.set()

    def connect(self) -> PoolConn:
        """Open one pool stream (the pool's connector)."""
        self._all_tried.wait(self.dial_timeout)
        live = [c for c in self.conns if c is not None and self.engine.conn_alive(c)]
        if not live:
            ev = self._changed
            ev.wait(self.dial_timeout)
            live = [c for c in self.conns if c is not None and self.engine.conn_alive(c)]
            if not live:
                raise ConnectionError("no QUIC connection to %s:%d" % (self.ip, self.port))
        counts, opening = self.engine.stream_count, self._opening
        conn = min(live, key=lambda c: counts[c] + opening[c])
        if counts[conn] + opening[conn] >= MAX_STREAMS:
            raise ConnectionError("QUIC stream limit reached on every connection")
        # wait as long as for the id itself: a stream given up early would still be opened by
        # the thread and pooled by the server, which could then name it in a launch signal
        opening[conn] += 1
        try:
            # the proof rides with the hello: one packet, not two
            proof = self.prover.proof() if self.prover is not None else b""
            stream = self.engine.open_stream(conn, self.id_timeout, proof)
        finally:
            opening[conn] -= 1
            if opening[conn] <= 0:
                del opening[conn]
        stream.settimeout(self.id_timeout)
        try:
            cid = read_exact(stream, 4).hex()
        except BaseException:
            stream.close()
            raise
        stream.settimeout(None)
        return PoolConn(cid, stream, stream)

    def close(self) -> None:
        self.group.kill(block=False)
