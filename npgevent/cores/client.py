"""The dual-end tunnel client (run-mode detection is :func:`npgevent.cores.client_core`).

The dual-end client dials the tunnel address and runs the handshake that
``auth=`` asks for (:mod:`npgevent.net.handshake`): with an npgevent server both
ends prove the key, and the control lines, pool connections and the server's
certificate are bound to the session; with a Go server (auth below 2) Go's
handshake.  It applies what the server dictates in its reply: flow, TLS code,
QUIC, ``max`` and the extension level.  It then keeps a pool of idle
connections to the server (adaptive capacity from ``min`` to the server's
``max``), and in forward flow (``+``) listens on its first target address for
users.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gevent
from gevent import socket
from gevent.event import Event

from ..errors import CoreError
from ..log import ERROR
from ..net import handshake
from ..net.dial import family_of
from ..net.handshake import HandshakeError
from ..net.sockopt import connect_numeric, format_addr, send_all, tune_tcp
from ..pool import hubsetup
from ..pool.base import Adaptive
from ..pool.tcp import ClientPool, PoolConn, read_exact
from ..protocol.auth import ControlCipher, PoolProver
from ..protocol.handshake import reuses_pool
from ..protocol.signals import Level
from .common import Instance
from .tunnel import TunnelCore

POOL_ID_TIMEOUT = 60.0  # Go waits up to a minute for the server's 4-byte id
#: servers (ip:port) that proved the key in this process: a later Go-style answer is refused
AUTHENTICATED_SERVERS: set[str] = set()
WARNED_GO_SERVERS: set[str] = set()  # one WARN per Go server, not one per reconnect


class DualClientCore(TunnelCore):
    mode = 2

    def __init__(self, inst: Instance) -> None:
        super().__init__(inst)
        self.server_ip = ""
        self.ctx: Any = None
        self.engine: Any = None  # QuicEngine when the server asks for QUIC
        self.quic: Any = None
        self.prover: Any = None  # PoolProver when both ends authenticated
        self.vouched = ""  # the certificate fingerprint the authenticated server vouched for
        self.tls_session: Any = None  # the latest TLS session, to resume pool connections from
        self._ticket: Event | None = None  # set once the first TLS pool dial is over
        self._leader: Any = None  # the greenlet of that first dial

    def _start(self) -> None:
        opts, spec, log = self.opts, self.inst.spec, self.log
        tunnel = spec.tunnel
        try:
            ip = self.inst.resolver.resolve(tunnel.host or "127.0.0.1")[0]
        except OSError as exc:
            raise CoreError("tunnel address %s: %s" % (tunnel, exc)) from None
        self.server_ip = ip
        sock = socket.socket(family_of(ip), socket.SOCK_STREAM)
        server = "%s:%d" % (ip, tunnel.port)
        try:
            sock.settimeout(opts.tcp_dial_timeout)
            sock.connect((ip, tunnel.port))
            tune_tcp(sock, opts.report_interval)
            sock.settimeout(opts.handshake_timeout)
            outcome = handshake.dial(sock, self.key, opts.auth)
            sock.settimeout(None)
        except socket.timeout:
            sock.close()
            raise CoreError("tunnel handshake with %s: timed out" % tunnel) from None
        except HandshakeError as exc:
            sock.close()
            self.inst.events.failure("auth" if exc.refused or "authentication" in str(exc) else "handshake")
            if exc.refused:
                log.error("Tunnel handshake with %s refused (auth=%s): %s", tunnel, opts.auth, exc)
            raise CoreError("tunnel handshake: %s" % exc) from None
        except OSError as exc:
            sock.close()
            raise CoreError("tunnel %s: %s" % (tunnel, exc.strerror or exc)) from None
        reply, self.leftover = outcome.reply, outcome.leftover
        if outcome.keys is not None:
            AUTHENTICATED_SERVERS.add(server)
            self.cipher = ControlCipher(outcome.keys.c2s, outcome.keys.s2c)
            self.prover = PoolProver(outcome.keys.pool)
            self.vouched = outcome.fingerprint
        elif server in AUTHENTICATED_SERVERS:
            sock.close()
            log.error("Tunnel handshake with %s: it proved the key before and now answers with Go "
                      "NodePass's unauthenticated handshake: refused (a downgrade attack?)", tunnel)
            raise CoreError("tunnel handshake: an unauthenticated answer from a server that "
                            "authenticated before")
        elif opts.auth == "1" and server not in WARNED_GO_SERVERS:
            WARNED_GO_SERVERS.add(server)
            log.warn("Tunnel server %s speaks only Go NodePass's handshake: no authentication (its reply "
                     "reveals the key to anyone on the path), control signals and pool connections "
                     "unauthenticated; auth=2 refuses such servers", tunnel)
        self.control = sock
        self.peer = format_addr(sock.getpeername())
        self.flow, self.tls_code, self.npg = reply.flow, reply.tls, reply.npg
        if self.cipher is not None:
            log.info("Tunnel authenticated: %s proved the key", self.peer)
        log.info("Tunnel signal <- : %s <- %s", reply.encode(), self.peer)
        log.info("Tunnel handshaked: %s <-> %s", format_addr(sock.getsockname()), self.peer)
        connector = self._dial_pool  # TLS; plain TCP pool connections go through hub_dial
        hub_dial = None
        if reply.quic:
            connector = self._start_quic(reply.max)
        elif self.tls_code != "0":
            from ..net.tlsctx import client_context  # pyOpenSSL costs ~12 MB: load it only when used

            self.ctx = client_context(self.tls_code)
        else:
            hub_dial = self._hub_dial_pool
        adaptive = Adaptive(opts.min, reply.max, opts.min_pool_interval, opts.max_pool_interval)
        self.pool = ClientPool(log, connector, adaptive, report_every=opts.report_interval,
                               hub_dial=hub_dial)
        self.spawn_task(self.pool.run)
        self.reuse = reuses_pool(self.npg, self.tls_code, reply.quic)
        if self.reuse:  # the server announced level 2: tell it ours, so that it frames its launches
            self._write_or_fail(Level(self.npg))
        if self.flow == "+":
            self.open_user_listeners(spec.targets[0])
        self.start_control()

    def _start_quic(self, server_max: int) -> Any:
        """Start the QUIC thread and its connections; return the pool connector."""
        from ..pool.quic import QuicConnector, connection_count
        from ..quic.config import make_configuration
        from ..quic.engine import QuicEngine

        opts = self.opts
        self.engine = QuicEngine(self.log, opts.report_interval, opts.quic_offload)
        self.engine.on_failure = lambda why: self.fail(CoreError("QUIC: %s" % why))
        self.engine.start()
        from ..quic.config import DATAGRAM_SIZE

        # larger datagrams only towards an npgevent server: quic-go would drop them
        size = opts.quic_datagram_size if self.npg >= 1 else DATAGRAM_SIZE
        config = make_configuration(True, 3 * opts.report_interval, self.tls_code,
                                    server_name=self.inst.spec.tunnel.host, datagram_size=size)
        self.quic = QuicConnector(self.engine, self.server_ip, self.inst.spec.tunnel.port, config,
                                  connection_count(server_max), opts.tcp_dial_timeout, POOL_ID_TIMEOUT,
                                  self.log, prover=self.prover, fingerprint=self.vouched)
        self.quic.start()
        return self.quic.connect

    def _close(self) -> None:
        super()._close()
        if self.quic is not None:
            self.quic.close()
        if self.engine is not None:
            self.engine.stop()

    def _await_ticket(self) -> None:
        """The first TLS pool dial leads; the others of the first burst wait for its ticket
        (at most one handshake timeout), so that they resume instead of each doing a full
        handshake.  A failed leader releases them all the same."""
        if self.tls_session is not None:
            return
        if self._ticket is None:
            self._ticket, self._leader = Event(), gevent.getcurrent()
            return
        if self._leader is not gevent.getcurrent():
            self._ticket.wait(self.opts.handshake_timeout)

    def _hub_dial_pool(self, on_conn: Callable[[PoolConn], None], on_fail: Callable[[BaseException], None],
                       in_progress: set[Any]) -> None:
        """A plain-TCP pool connection set up in hub callbacks (:mod:`npgevent.pool.hubsetup`):
        what :meth:`_dial_pool` does for TLS code 0, without a greenlet."""
        opts = self.opts
        hubsetup.dial(family_of(self.server_ip), (self.server_ip, self.inst.spec.tunnel.port),
                      self.prover.proof() if self.prover is not None else b"", opts.tcp_dial_timeout,
                      POOL_ID_TIMEOUT, opts.report_interval,
                      lambda sock, cid: on_conn(PoolConn(cid.hex(), sock, sock)), on_fail, in_progress)

    def _dial_pool(self) -> PoolConn:
        """One TLS pool connection (codes 1/2): TCP, the TLS handshake, then the server's
        4-byte id.  Plain TCP ones are set up by :meth:`_hub_dial_pool`."""
        from ..net.tls import TLSStream

        assert self.ctx is not None
        opts = self.opts
        host = self.inst.spec.tunnel.host
        sock = socket.socket(family_of(self.server_ip), socket.SOCK_STREAM)
        try:
            connect_numeric(sock, (self.server_ip, self.inst.spec.tunnel.port), opts.tcp_dial_timeout)
            tune_tcp(sock, opts.report_interval)
            self._await_ticket()
            stream = TLSStream.client(sock, self.ctx, host, self.tls_session)
            stream.handshake(opts.handshake_timeout, verify_name=host if self.tls_code == "2" else "")
            resumed = stream.resumed
            self.inst.events.tls_handshake(resumed)
            # a resumed session is as authentic as the connection its ticket came from, and
            # tickets are kept only from connections that passed this check: no need to hash
            # the certificate again (~30 us a pool connection)
            if self.vouched and not resumed and stream.peer_fingerprint() != self.vouched:
                self.log.limited(ERROR, "cert-mismatch", "Tunnel connection to %s refused: its TLS "
                                 "certificate %s is not the one the authenticated server vouched for "
                                 "(%s): a man in the middle?" % (self.inst.spec.tunnel,
                                                                 stream.peer_fingerprint(), self.vouched))
                raise ConnectionError("pool connection: certificate not the one vouched for")
            if self.prover is not None:
                send_all(stream, self.prover.proof())
            sock.settimeout(POOL_ID_TIMEOUT)
            cid = read_exact(stream, 4).hex()
            sock.settimeout(None)
            self.tls_session = stream.session()  # the server's tickets came before the id
        except BaseException:
            sock.close()
            raise
        finally:
            if self._ticket is not None and not self._ticket.is_set() and self._leader is gevent.getcurrent():
                self._ticket.set()
        return PoolConn(cid, stream, sock)
