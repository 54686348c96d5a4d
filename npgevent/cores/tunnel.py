"""What the tunnel server and client share: control channel, launches, relays.

After the handshake both ends run the same machinery:

* **control loop** (reader greenlet): framed lines from the peer through the
  sans-IO :class:`~npgevent.protocol.signals.LineDecoder`; a line that does not
  decode is logged and skipped (50 ms pause, as Go); ping -> pong; pong ->
  the ``CHECK_POINT`` EVENT line with the round trip; flush -> drop idle pool
  connections; launch/verify -> a session greenlet.  3 x
  ``NP_REPORT_INTERVAL`` of silence, EOF, or a failed control write fails the
  core, and the runner restarts it after the cooldown;
* **ticker**: a ping every ``NP_REPORT_INTERVAL`` (the first at once), the flush
  rule (pool errors > half the idle count), a sweep of dead idle connections
  and, on the server, the one-off TLS verify signal;
* **receiving side** (server in reverse flow ``-``, client in forward flow
  ``+``): user listeners on the first target address; each TCP connection or
  UDP source address takes any idle pool connection, sends a launch signal
  naming it, and relays;
* **dialling side**: a launch signal takes the named pool connection, dials a
  target (round robin + failover, ``dial=``), writes the PROXY line for
  ``proxy=1`` from the user address in the signal, and relays.

UDP rides one pool connection per user address: raw (every read is one
datagram) with a Go peer, length-framed between npgevent peers (extension
level 1, see :mod:`npgevent.protocol.handshake`).  At level 2 (TLS pools) the receiving
side marks its TCP launches framed (``#3``): the session is relayed in frames
(:mod:`npgevent.relay.framed`) and its pool connection goes back to both pools after it.
A TCP session whose start need not wait (tls=0, or framed on a reused TLS pool) takes no
greenlet on either side: :mod:`npgevent.cores.tunnel_hub`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import gevent
from gevent import socket
from gevent.lock import Semaphore

from ..errors import ConfigError, CoreError, RemoteProtocolError
from ..log import ERROR, WARN, checkpoint_line
from ..net import lightsock
from ..net.dial import Attempt, Dialer, DialError
from ..net.sockopt import format_addr, send_all
from ..pool.tcp import IdlePool, PoolConn
from ..protocol.auth import ControlCipher
from ..protocol.proxyproto import proxy_v1
from ..protocol.signals import (
    Flush,
    Launch,
    Level,
    LineDecoder,
    Ping,
    Pong,
    Signal,
    Unknown,
    Verify,
    encode_line,
)
from ..relay.framed import relay_framed
from ..relay.listeners import Listeners
from ..relay.stats import TCP_RX, TCP_TX
from ..relay.tcp import relay
from ..relay.udp import SessionTable, UdpSession
from ..url import HostPort, parse_hostport
from . import tunnel_hub
from .common import Core, Instance
from .tunnel_udp import TunnelUdpSession, udp_exchange
from .verify import VerifySignal

FORGED_LIMIT = 3  # control lines failing authentication before the tunnel is torn down


class KeepingStreamServer(lightsock.LightStreamServer):
    """A StreamServer whose handler may keep the accepted socket open (pool connections).

    *first*, if given, sees each connection in the accept callback (the hub: it must not
    wait); when it returns True it has taken the connection over, else the handler runs in a
    greenlet as usual."""

    def __init__(self, *args: Any, first: Callable[[socket.socket, Any], bool] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._kept: set[int] = set()
        self._first = first

    def do_handle(self, *args: Any) -> None:
        if self._first is not None:
            try:
                if self._first(*args):
                    return
            except Exception:  # a bug: drop this connection, report it, keep accepting
                args[0].close()
                self.loop.handle_error(self, *sys.exc_info())
                return
        super().do_handle(*args)

    def keep(self, sock: socket.socket) -> None:
        self._kept.add(id(sock))

    def do_close(self, sock: socket.socket, *args: Any) -> None:
        if id(sock) in self._kept:
            self._kept.discard(id(sock))
            return
        sock.close()


def parse_user_addr(text: str) -> tuple[str, int] | None:
    try:
        hp = parse_hostport(text, "user address")
    except ConfigError:
        return None
    return hp.host, hp.port


class TunnelCore(VerifySignal, Core):
    """Base of the dual-end server and client cores (see module docstring)."""

    pool: IdlePool

    def __init__(self, inst: Instance) -> None:
        super().__init__(inst)
        self.key = inst.spec.key.encode()
        self.dialer = Dialer(inst.spec.targets, inst.resolver, source_ip=self.opts.dial,
                             tcp_timeout=self.opts.tcp_dial_timeout, log=self.log,
                             events=inst.events)
        self.control: socket.socket | None = None
        self.peer = ""  # the peer's control address, as text
        self.flow = "-"
        self.tls_code = "0"
        self.npg = 0  # agreed extension level (0 with a Go peer)
        self.reuse = False  # level 2 on a TLS pool: our TCP launches are framed (#3), and reused
        self.leftover = b""  # bytes read past the handshake line
        self.cipher: ControlCipher | None = None  # set when both ends authenticated
        self.pool_rejected = 0  # pool connections that failed to prove membership
        self.forged = 0  # control lines that failed authentication
        self._wlock = Semaphore()
        self._ping_sent = 0.0
        self.ticks = 0
        self.listeners = Listeners(self.opts, inst.slots, self.log, self.sessions.spawn)
        #: receiving side: UDP sessions launched on a pool connection and not answered yet, by cid
        self.awaiting: dict[str, TunnelUdpSession] = {}
        #: sending side of the verify signal: the connection it named, until the peer closes it
        self.verifying: dict[str, PoolConn] = {}
        self.control_tasks: list[gevent.Greenlet] = []

    @property
    def receives(self) -> bool:
        """True on the side that accepts user traffic."""
        return (self.flow == "-") == (self.inst.spec.scheme == "server")

    # -- control channel -----------------------------------------------------------
    def send_signal(self, sig: Signal) -> None:
        if self.control is None:
            raise CoreError("no control connection")
        with self._wlock:  # sealing and sending in one step: sequence numbers stay in order
            send_all(self.control, self.signal_line(sig))

    def signal_line(self, sig: Signal) -> bytes:
        """*sig* as a control line: sealed on an authenticated channel, Go's framing otherwise
        (sealing takes the next sequence number: call it holding the write lock)."""
        message = sig.encode()
        return self.cipher.seal_line(message.encode()) if self.cipher is not None \
            else encode_line(message, self.key)

    def start_control(self) -> None:
        """Start the control reader and the ticker (after the handshake)."""
        self.control_tasks = [self.spawn_task(self._control_loop), self.spawn_task(self._ticker)]

    def stop_control(self) -> None:
        """Stop the control reader and the ticker without failing the core, and close the
        control connection (the server hands the slot to a peer that proved the key)."""
        gevent.killall(self.control_tasks, block=True)
        self.control_tasks = []
        if self.control is not None:
            self.control.close()
            self.control = None

    def _control_loop(self) -> None:
        assert self.control is not None
        sock = self.control
        limit = 3 * self.opts.report_interval
        sock.settimeout(limit)
        decoder = LineDecoder(self.key, opener=self.cipher.open_line if self.cipher is not None else None)
        pending = decoder.feed(self.leftover) if self.leftover else []
        while True:
            for item in pending:
                if isinstance(item, RemoteProtocolError):
                    self._bad_line(item)
                else:
                    self._dispatch(item)
            try:
                data = sock.recv(65536)
            except socket.timeout:
                raise CoreError("control connection silent for %ss" % _num(limit)) from None
            except OSError as exc:
                raise CoreError("control connection: %s" % (exc.strerror or exc)) from None
            if not data:
                raise CoreError("control connection closed by the peer (EOF)")
            pending = decoder.feed(data)

    def _bad_line(self, error: RemoteProtocolError) -> None:
        if self.cipher is None:  # Go's control lines: skip it, as Go does
            kind = " ".join(str(error).split()[:3])  # one rate-limited line per kind of error
            self.log.limited(ERROR, "signal-skip:" + kind, "Control signal skipped: %s", error)
            gevent.sleep(0.05)
            return
        self.forged += 1  # an authenticated channel carries no garbage of its own
        self.log.limited(ERROR, "signal-forged", "Control signal from %s rejected: %s", self.peer, error)
        if self.forged >= FORGED_LIMIT:
            raise CoreError("control channel: %d lines failed authentication: torn down" % self.forged)

    def _dispatch(self, sig: Signal) -> None:
        if isinstance(sig, Ping):
            self._write_or_fail(Pong())
        elif isinstance(sig, Pong):
            self._checkpoint()
        elif isinstance(sig, Launch):
            if (self.opts.noudp if sig.udp else self.opts.notcp) or self.receives:
                self.log.debug("%s launch signal ignored: cid %s", "UDP" if sig.udp else "TCP", sig.cid)
                return
            if len(self.sessions) >= self.opts.semaphore_limit:
                self.log.limited(ERROR, "signal-queue", "Signal queue full (%d): launch %s dropped",
                               self.opts.semaphore_limit, sig.cid)
                return
            if not tunnel_hub.start_launch(self, sig):
                self.sessions.spawn(self._launch, sig)
        elif isinstance(sig, Flush):
            self.pool.flush()
            self.log.debug("Tunnel pool flushed by the peer")
        elif isinstance(sig, Verify):
            # claim the named connection now, in the control loop, so the receiving side cannot
            # hand it to a user meanwhile: the peer closes it right after the signal
            conn = self.pool.claim(sig.cid)
            victim = self.awaiting.pop(sig.cid, None) if conn is None else None
            if victim is not None:
                # too late: a UDP session of ours launched on it, and the peer (Go takes any
                # idle connection for the signal) never sees that launch: relaunch it elsewhere
                victim.lost_to_verify()
                return
            self.sessions.spawn(self._on_verify, sig, conn)
        elif isinstance(sig, Level):
            self.on_level(sig.level)
        elif isinstance(sig, Unknown):
            self.log.debug("Unknown signal ignored: %s", sig.text[:80])

    def on_level(self, level: int) -> None:
        """The peer's ``np:#n<level>`` (the server overrides it: the client's level)."""
        self.log.debug("Extension level signal ignored: %d", level)

    def _write_or_fail(self, sig: Signal) -> None:
        try:
            self.send_signal(sig)
        except OSError as exc:
            raise self.control_failed(exc) from None

    def _ticker(self) -> None:
        while True:
            self.ticks += 1
            self._ping_sent = time.monotonic()
            self._write_or_fail(Ping())
            self._maintain()
            gevent.sleep(self.opts.report_interval)

    def _maintain(self) -> None:
        pool = self.pool
        if pool.errors and pool.errors > pool.active / 2:
            self.log.debug("Tunnel pool flush: %d errors, %d idle", pool.errors, pool.active)
            self._write_or_fail(Flush())
            pool.flush()
        pool.sweep(strict=self.receives)
        self.listeners.report_drops()

    def _checkpoint(self) -> None:
        inst = self.inst
        rtt = (time.monotonic() - self._ping_sent) if self._ping_sent else 0.0
        ping = int(rtt * 1000)
        if self._ping_sent:
            inst.events.ping(rtt)
        t = inst.traffic
        self.log.event(checkpoint_line(self.mode, ping, self.pool.active, inst.slots.tcp, inst.slots.udp,
                                       t.tcp_rx, t.tcp_tx, t.udp_rx, t.udp_tx))

    # -- receiving side ----------------------------------------------------------------
    def open_user_listeners(self, where: HostPort, tcp: socket.socket | None = None,
                            udp: socket.socket | None = None) -> None:
        self.listeners.open(where, self._user_tcp, self._new_udp_session,
                            ip=self.inst.resolver.listen_ip(where.host), tcp_sock=tcp, udp_sock=udp,
                            tcp_start=partial(tunnel_hub.start_user_tcp, self))

    def _user_tcp(self, sock: socket.socket, addr: Any, conn: PoolConn | None = None) -> None:
        """One user connection on the receiving side (its slot is held by the listener; its
        pool connection may have been taken at accept: :mod:`.tunnel_hub`)."""
        log = self.log
        conn = conn or self.pool.take_any(self.opts.pool_get_timeout)
        if conn is None:
            log.limited(WARN, "pool-empty", "Tunnel connection: request timeout for %s (no idle pool "
                        "connection)", format_addr(addr))
            return
        framed = self.reuse
        if framed:
            self.pool.lend(conn)
        leftover = None
        try:
            log.debug("Tunnel connection: get %s <- pool active %d", conn.cid, self.pool.active)
            try:
                self.send_signal(Launch(False, format_addr(addr), conn.cid, framed))
            except OSError as exc:
                self.fail(self.control_failed(exc))
                return
            log.debug("TCP launch signal: cid %s -> %s", conn.cid, self.peer)
            reason, leftover = self._relay_tcp(conn, sock, framed)
            log.debug("Exchange complete: %s: %s", conn.cid, reason)
        finally:
            kept = self.give_back(conn, leftover)
            log.debug("Tunnel connection: %s %s", "back in the pool" if kept else "closed", conn.cid)

    def give_back(self, conn: PoolConn, leftover: bytes | None) -> bool:
        """Receiving side, after a session on *conn*: back to the pool (True) or closed.
        Nothing may follow the dialling side's terminal frame: only a clean end is reused."""
        return self.pool.finish(conn, leftover if leftover == b"" else None, trim=True)

    def control_failed(self, exc: OSError) -> CoreError:
        """The core's error for a control write that failed with *exc*."""
        return CoreError("control write failed: %s" % (exc.strerror or exc))

    def _relay_tcp(self, conn: PoolConn, local: socket.socket, framed: bool) -> tuple[str, bytes | None]:
        """One TCP session on *conn*: why it ended and, framed, the bytes read past it if
        *conn* may be reused (else None: it is closed)."""
        inst, opts = self.inst, self.opts
        if framed:
            return relay_framed(conn.stream, local, inst.traffic.bytes, TCP_RX, TCP_TX, limiter=inst.limiter,
                                idle=opts.read, bufsize=opts.tcp_data_buf_size)
        return relay(conn.stream, local, inst.traffic.bytes, TCP_RX, TCP_TX, limiter=inst.limiter,
                     idle=opts.read, bufsize=opts.tcp_data_buf_size), None

    def _new_udp_session(self, table: SessionTable, addr: Any) -> UdpSession:
        return TunnelUdpSession(table, addr, self)

    # -- dialling side ------------------------------------------------------------------
    def _take_named(self, sig: Launch | Verify, what: str) -> PoolConn | None:
        # the connection our verify signal named is still the peer's to launch on: a Go client
        # may hand it to a user before it reads the signal
        conn = self.verifying.pop(sig.cid, None) or self.pool.take(sig.cid, self.opts.pool_get_timeout)
        if conn is None:
            self.log.limited(ERROR, "pool-miss", "%s: pool connection %s not found within %ss", what, sig.cid,
                           _num(self.opts.pool_get_timeout))
        return conn

    def _launch(self, sig: Launch, conn: PoolConn | None = None, attempt: Attempt | None = None) -> None:
        """Dialling side of a launch: take the named pool connection, hold a slot, dial, relay
        (the connection and the dial may have been started already: :mod:`.tunnel_hub`)."""
        inst, log = self.inst, self.log
        kind = "UDP" if sig.udp else "TCP"
        log.debug("%s launch signal: cid %s <- %s", kind, sig.cid, self.peer)
        conn = conn or self._take_named(sig, kind + " launch")
        if conn is None:
            return
        if sig.framed:
            self.pool.lend(conn)
        leftover = None
        slots = inst.slots
        acquire, release = ((slots.acquire_udp, slots.release_udp) if sig.udp
                            else (slots.acquire_tcp, slots.release_tcp))
        try:
            if not acquire():
                log.limited(ERROR, "launch-slot", "%s slot limit reached (%d): launch %s refused", kind,
                            slots.limit, sig.cid)
                if attempt is not None and attempt.sock is not None:
                    attempt.sock.close()  # a dial started in the hub (tunnel_hub) goes no further
                return
            try:
                try:
                    target, where = (self.dialer.dial_udp() if sig.udp
                                     else self.dialer.dial_tcp(attempt=attempt))
                except (DialError, OSError) as exc:
                    log.limited(ERROR, "dial", "Dial target failed for %s: %s", sig.addr, exc)
                    return
                try:
                    if sig.udp:
                        log.debug("Starting transfer: %s <-> %s", sig.addr, where)
                        udp_exchange(self, conn, target)
                        log.debug("Transfer complete: %s <-> %s", sig.addr, where)
                    else:
                        leftover = self._tcp_exchange(conn, target, where, sig)
                finally:
                    target.close()
            finally:
                release()
        finally:
            self.pool.finish(conn, leftover)

    def _tcp_exchange(self, conn: PoolConn, target: socket.socket, where: HostPort,
                      sig: Launch) -> bytes | None:
        self.log.debug("Target connection: %s <-> %s", sig.addr, where)
        if self.opts.proxy:
            self._send_proxy(target, sig.addr)
        reason, leftover = self._relay_tcp(conn, target, sig.framed)
        self.log.debug("Exchange complete: %s: %s", sig.cid, reason)
        return leftover

    def _send_proxy(self, target: socket.socket, user: str) -> None:
        src = parse_user_addr(user)
        if src is None:
            self.log.limited(ERROR, "proxy-skip", "PROXY line skipped: bad user address %r in launch signal",
                             user[:80])
            return
        send_all(target, proxy_v1(src, target.getpeername()))

    # -- teardown ------------------------------------------------------------------------
    def _stop_accepting(self) -> None:
        self.listeners.stop_accepting()

    def _close(self) -> None:
        self.listeners.close()
        for conn in self.verifying.values():
            conn.close()
        self.verifying.clear()
        if getattr(self, "pool", None) is not None:
            self.pool.close()
        if self.control is not None:
            self.control.close()


def _num(seconds: float) -> str:
    return ("%d" % seconds) if seconds == int(seconds) else ("%g" % seconds)
