"""The tunnel server (``server://``).

Run mode: 0 tries to listen on the first target address (TCP and UDP): success
means **reverse** (flow ``-``, run mode 1: users connect here, the client dials
its targets), failure means **forward** (flow ``+``, run mode 2: the client
listens, the server dials its targets).  Mode 1 forces reverse, 2 forward.

The tunnel listener serves two phases:

1. *handshake*: attempts run concurrently, each with its own
   ``NP_HANDSHAKE_TIMEOUT`` (at most 8 per address and 64 in all; unlike Go, a
   failed attempt makes nobody wait).  Go's handshake or npgevent's
   authenticated one, as ``auth=`` decides (:mod:`npgevent.net.handshake`); the
   first attempt to succeed becomes the control connection, the rest are closed.
2. *pool*: every later connection is a pool connection: refused unless it comes
   from the control connection's IP and fewer than ``max`` are idle; TLS
   handshake for codes 1/2 (a failure is logged at debug and dropped); in an
   authenticated tunnel, a pool proof (:mod:`npgevent.protocol.auth`); then 4
   random bytes (the id) are written and the connection waits in the pool.

When the control connection dies the core is torn down (listeners included) and
restarted after the cooldown; live sessions carry on (see ``Core.close``).
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any

import gevent
from gevent import socket
from gevent.event import AsyncResult
from gevent.pool import Group

from ..errors import CoreError
from ..log import ERROR, WARN
from ..net import handshake
from ..net.handshake import HandshakeError
from ..net.sockopt import ListenError, format_addr, listen_tcp, listen_udp, unmap
from ..pool.tcp import IdlePool, PoolConn, new_cid, read_exact
from ..protocol.auth import POOL_PROOF, ControlCipher, PoolVerifier
from ..protocol.handshake import Reply
from .common import Instance
from .tunnel import KeepingStreamServer, TunnelCore

if TYPE_CHECKING:
    from ..net.tls import ServerTLS

HANDSHAKES_PER_IP = 8  # handshake attempts open at once from one address
HANDSHAKES = 64  # ... and in all
WARNED_GO_CLIENTS: set[str] = set()  # Go clients (by IP) already warned about in this process


def server_tls(inst: Instance) -> ServerTLS | None:
    """The instance's TLS state, created (and logged) once per process."""
    tls = getattr(inst, "server_tls", None)
    if tls is None and not getattr(inst, "tls_logged", False):
        opts = inst.opts
        code = "1" if (opts.quic and opts.tls == "0") else opts.tls
        if code == "0":
            inst.log.warn("TLS code-0: unencrypted")
        else:
            from ..net.tls import ServerTLS  # pyOpenSSL costs ~12 MB: load it only when used

            tls = ServerTLS(code, opts.crt, opts.key, opts.reload_interval, inst.log)
        inst.server_tls = tls  # type: ignore[attr-defined]
        inst.tls_logged = True  # type: ignore[attr-defined]
    return tls


def warn_exposure(inst: Instance) -> None:
    """Once per process: a server reachable beyond loopback that an attacker can take over."""
    if getattr(inst, "exposure_warned", False):
        return
    inst.exposure_warned = True  # type: ignore[attr-defined]
    host = inst.spec.tunnel.host
    loopback = host == "localhost" or host.startswith("127.") or host == "::1"
    if loopback:
        return
    if not inst.spec.key_given:
        inst.log.warn("Tunnel key not set: the key is the FNV-1a hash of the port, which anyone can "
                      "compute and use to take this tunnel over; set a long random key (docs/security.md)")
    elif inst.opts.auth != "2":
        inst.log.warn("auth=%s on a server reachable beyond loopback: anyone who speaks Go NodePass's "
                      "handshake with a key of the right length learns the key from the reply and can "
                      "take a free control slot; set auth=2 if every client is npgevent "
                      "(docs/security.md)", inst.opts.auth)


class ServerCore(TunnelCore):
    def __init__(self, inst: Instance) -> None:
        super().__init__(inst)
        warn_exposure(inst)
        self.tls = server_tls(inst)
        self.tls_code = self.tls.code if self.tls is not None else "0"
        self.listener: socket.socket | None = None
        self.tunnel_server: KeepingStreamServer | None = None
        self.peer_ip = ""
        self._user_socks: tuple[Any, Any] = (None, None)
        self._verified = False
        self.pool = IdlePool(self.log)
        self.engine: Any = None  # QuicEngine when quic=1
        self.pool_verifier: PoolVerifier | None = None  # set when the client authenticated
        self._claimer = 0
        self._quic_config: Any = None
        self._quic_cert: Any = None

    def _start(self) -> None:
        opts, spec = self.opts, self.inst.spec
        first = spec.targets[0]
        if opts.mode in ("0", "1"):
            try:
                tcp = listen_tcp(first) if not opts.notcp else None
                try:
                    udp = listen_udp(first) if not opts.noudp else None
                except ListenError:
                    if tcp is not None:
                        tcp.close()
                    raise
                self._user_socks = (tcp, udp)
                self.flow, self.mode = "-", 1
            except ListenError as exc:
                if opts.mode == "1":
                    raise CoreError("reverse mode: %s" % exc) from None
                self.log.debug("Target listen failed (%s): forward mode", exc)
                self.flow, self.mode = "+", 2
        else:
            self.flow, self.mode = "+", 2
        self.listener = listen_tcp(spec.tunnel, self.inst.resolver.listen_ip(spec.tunnel.host))
        if opts.quic:
            self._start_quic()
        self.spawn_task(self._serve)

    def _start_quic(self) -> None:
        """Bind the QUIC endpoint now, so it is up when the client dials after the handshake;
        it admits nobody until the control connection's IP is known."""
        from ..quic.config import make_configuration
        from ..quic.stream import QuicEngine

        assert self.tls is not None  # quic=1 always has TLS (code 1 at least)
        opts = self.opts
        self.engine = QuicEngine(self.log, opts.report_interval)
        self.engine.on_failure = lambda why: self.fail(CoreError("QUIC: %s" % why))
        self.engine.start()
        self._quic_cert = self.tls.cert
        self._quic_config = make_configuration(False, 3 * opts.report_interval,
                                               cert=self.tls.cert, key=self.tls.pkey)
        tunnel = self.inst.spec.tunnel
        host = self.inst.resolver.listen_ip(tunnel.host) or tunnel.host
        self.engine.listen(host, tunnel.port, self._quic_config, allowed_ip="")

    def _serve(self) -> None:
        assert self.listener is not None
        self._handshake_phase()
        self.tunnel_server = KeepingStreamServer(self.listener, self._pool_accept,
                                                 spawn=self.tasks.spawn)
        self.tunnel_server.start()
        if self.engine is not None:
            from ..pool.quic import QuicServerPool

            QuicServerPool(self.engine, self.pool, self.opts.max, self.opts.handshake_timeout,
                           self.log, self.tasks, verifier=self.pool_verifier)
        if self.flow == "-":
            tcp, udp = self._user_socks
            self._user_socks = (None, None)
            self.open_user_listeners(self.inst.spec.targets[0], tcp, udp)
        self.start_control()

    def _handshake_phase(self) -> None:
        """Take handshake attempts concurrently, each with its own deadline, until one wins
        the control slot.  A failed attempt costs nobody else anything (no pause); at most
        HANDSHAKES_PER_IP attempts per address and HANDSHAKES in total are open at once."""
        assert self.listener is not None
        self._won: AsyncResult = AsyncResult()
        self._claimer = 0  # id() of the attempt's socket that took the control slot
        attempts = Group()
        per_ip: collections.Counter[str] = collections.Counter()

        def accept_loop() -> None:
            while True:
                try:
                    sock, addr = self.listener.accept()  # type: ignore[union-attr]
                except OSError:  # the listener was closed: the core is going away
                    return
                ip = unmap(addr[0])
                if per_ip[ip] >= HANDSHAKES_PER_IP or len(attempts) >= HANDSHAKES:
                    self.log.limited(WARN, "handshake-busy", "tunnelHandshake: %s refused: %d handshakes "
                                     "open from that address, %d in all" % (format_addr(addr), per_ip[ip],
                                                                            len(attempts)))
                    sock.close()
                    continue
                per_ip[ip] += 1
                attempts.spawn(self._attempt, sock, addr, ip, per_ip)

        acceptor = gevent.spawn(accept_loop)
        try:
            sock, addr, outcome = self._won.get()
        finally:
            acceptor.kill(block=True)
            attempts.kill(block=False)
        self._adopt(sock, addr, outcome)

    def _attempt(self, sock: socket.socket, addr: Any, ip: str, per_ip: collections.Counter[str]) -> None:
        opts, log = self.opts, self.log
        peer = format_addr(addr)
        won = False
        try:
            with gevent.Timeout(opts.handshake_timeout, HandshakeError("handshake timeout")):
                outcome = handshake.serve(sock, self.key, opts.auth, self._reply, self._fingerprint(),
                                          lambda reply: self._claim(sock, ip, reply))
            self._won.set((sock, addr, outcome))
            won = True
        except (HandshakeError, CoreError, OSError) as exc:
            why = (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc)
            if self._claimer == id(sock):  # failed after taking the slot: start over
                self._won.set_exception(CoreError("tunnelHandshake: %s: %s" % (why, peer)))
            refused = isinstance(exc, HandshakeError) and exc.refused
            # one rate-limited line per kind (as Go words them: access denied, timeout, ...)
            log.limited(ERROR if refused else WARN, "handshake:" + why.split(":")[0],
                        "tunnelHandshake: %s: %s" % (why, peer))
        finally:
            per_ip[ip] -= 1
            if per_ip[ip] <= 0:
                del per_ip[ip]
            if not won:
                sock.close()

    def _claim(self, sock: socket.socket, ip: str, reply: Reply) -> bool:
        """Take the control slot for the attempt from *ip* (False if taken).  With QUIC, admit
        the client's address before the reply leaves: a Go client dials its QUIC pool the
        instant it reads the reply.  Larger datagrams only towards an npgevent peer."""
        if self._claimer:
            return False
        self._claimer = id(sock)
        if self.engine is not None:
            self.engine.admit(ip, self.opts.quic_datagram_size if reply.npg >= 1 else 0)
        return True

    def _reply(self, level: int) -> Reply:
        opts = self.opts
        return Reply(quic=bool(opts.quic), max=opts.max, flow=self.flow, tls=self.tls_code, npg=level)

    def _fingerprint(self) -> str:
        return self.tls.fingerprint if self.tls is not None else ""

    def _adopt(self, sock: socket.socket, addr: Any, outcome: handshake.Outcome) -> None:
        """The winner becomes the control connection."""
        log = self.log
        peer = format_addr(addr)
        sock.settimeout(None)
        self.control, self.peer, self.peer_ip = sock, peer, unmap(addr[0])
        self.leftover, self.npg = outcome.leftover, outcome.reply.npg
        if outcome.keys is not None:
            self.cipher = ControlCipher(outcome.keys.s2c, outcome.keys.c2s)
            self.pool_verifier = PoolVerifier(outcome.keys.pool)
            log.info("Tunnel authenticated: %s proved the key", peer)
        elif self.opts.auth == "1" and self.peer_ip not in WARNED_GO_CLIENTS:
            WARNED_GO_CLIENTS.add(self.peer_ip)  # one WARN per peer, not one per reconnect
            log.warn("Tunnel peer %s speaks only Go NodePass's handshake: no authentication (anyone "
                     "who knows the key length could have taken this slot), control signals and pool "
                     "connections unauthenticated; auth=2 refuses such peers", peer)
        log.info("Tunnel signal -> : %s -> %s", outcome.reply.encode(), peer)
        log.info("Tunnel handshaked: %s <-> %s", format_addr(sock.getsockname()), peer)

    def _pool_accept(self, sock: socket.socket, addr: Any) -> None:
        log, opts = self.log, self.opts
        if self.engine is not None:
            log.debug("Tunnel connection: %s refused: the pool is QUIC", format_addr(addr))
            return
        if unmap(addr[0]) != self.peer_ip:
            log.debug("Tunnel connection: %s refused: not the tunnel client", format_addr(addr))
            return
        if self.pool.active >= opts.max:
            log.debug("Tunnel connection: %s refused: pool full (%d)", format_addr(addr), opts.max)
            return
        stream: Any = sock
        if self.tls is not None:
            from ..net.tls import TLSError, TLSStream

            stream = TLSStream.server(sock, self.tls.current())
            try:
                stream.handshake(opts.handshake_timeout)
            except (TLSError, OSError) as exc:
                log.debug("Tunnel connection: %s dropped: %s", format_addr(addr), exc)
                return
        if self.pool_verifier is not None and not self._proven(stream, sock, addr):
            return
        cid = new_cid()
        while cid in self.pool.idle:
            cid = new_cid()
        try:
            stream.sendall(bytes.fromhex(cid))
        except OSError as exc:
            log.debug("Tunnel connection: %s dropped: %s", format_addr(addr), exc)
            return
        assert self.tunnel_server is not None
        self.tunnel_server.keep(sock)
        self.pool.add(PoolConn(cid, stream, sock))

    def _proven(self, stream: Any, sock: socket.socket, addr: Any) -> bool:
        """An authenticated tunnel: the connection must prove membership before it gets an id."""
        assert self.pool_verifier is not None
        sock.settimeout(self.opts.handshake_timeout)
        try:
            proof = read_exact(stream, POOL_PROOF)
        except (OSError, gevent.Timeout, socket.timeout) as exc:
            self.log.limited(WARN, "pool-proof", "Tunnel connection: %s dropped: no pool proof (%s)"
                             % (format_addr(addr), exc))
            return False
        finally:
            sock.settimeout(None)
        if not self.pool_verifier.check(proof):
            self.pool_rejected += 1
            self.log.limited(WARN, "pool-proof", "Tunnel connection: %s refused: it did not prove membership "
                             "of the authenticated tunnel (forged or replayed proof)" % format_addr(addr))
            return False
        return True

    def _maintain(self) -> None:
        super()._maintain()
        if self.engine is not None and self.tls is not None and self.tls.code == "2":
            self.tls.current()  # reloads the files when due
            if self.tls.cert is not self._quic_cert:
                self._quic_cert = self.tls.cert
                thread = self.engine.thread
                thread.call(thread.set_certificate, self._quic_config, self.tls.cert, self.tls.pkey)
        # the TLS verify signal, once, from the second report tick on (Go: 5-15 s after start)
        if self.tls is not None and not self._verified and self.ticks >= 2:
            self._verified = self.send_verify(self.tls.fingerprint)

    def _stop_accepting(self) -> None:
        super()._stop_accepting()
        if self.tunnel_server is not None:
            self.tunnel_server.close()
        elif self.listener is not None:
            self.listener.close()

    def _close(self) -> None:
        super()._close()
        if self.engine is not None:
            self.engine.stop()
        for s in self._user_socks:
            if s is not None:
                s.close()
        if self.listener is not None:
            self.listener.close()
