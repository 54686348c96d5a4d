"""The tunnel server (``server://``).

Run mode: 0 tries to listen on the first target address (TCP and UDP): success
means **reverse** (flow ``-``, run mode 1: users connect here, the client dials
its targets), failure means **forward** (flow ``+``, run mode 2: the client
listens, the server dials its targets).  Mode 1 forces reverse, 2 forward.

The tunnel listener serves two phases:

1. *handshake*: concurrent attempts, Go's handshake or npgevent's
   authenticated one as ``auth=`` decides (:mod:`npgevent.net.handshake`); the
   first to succeed becomes the control connection
   (:mod:`npgevent.cores.control_slot`, which also lets a peer that proves the
   key take over a slot held by an unauthenticated one, with ``auth=1``).
2. *pool*: every later connection is a pool connection: refused unless it comes
   from the control connection's IP and fewer than ``max`` are idle; TLS
   handshake for codes 1/2 (a failure is logged at debug and dropped); in an
   authenticated tunnel, a pool proof (:mod:`npgevent.protocol.auth`); then 4
   random bytes (the id) are written and the connection waits in the pool.

When the control connection dies the core is torn down (listeners included) and
restarted after the cooldown; live sessions carry on (see ``Core.close``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import gevent
from gevent import socket

from ..errors import CoreError
from ..log import WARN
from ..net import handshake
from ..net.sockopt import ListenError, format_addr, listen_tcp, listen_udp, send_all, unmap
from ..pool import hubsetup
from ..pool.tcp import IdlePool, PoolConn, new_cid, read_exact
from ..protocol.auth import POOL_PROOF, ControlCipher, PoolVerifier
from ..protocol.handshake import Reply, reuses_pool
from .common import Instance
from .control_slot import ControlSlot
from .tunnel import KeepingStreamServer, TunnelCore

if TYPE_CHECKING:
    from ..net.tlsctx import ServerTLS

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
            from ..net.tlsctx import ServerTLS  # pyOpenSSL costs ~12 MB: load it only when used

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
        self.setups: set[hubsetup.Setup] = set()  # plain pool connections reading their proof
        self.pool = IdlePool(self.log)
        self.pool.max_idle = self.opts.max  # reused connections kept (receiving side)
        self.engine: Any = None  # QuicEngine when quic=1
        self.pool_verifier: PoolVerifier | None = None  # set when the client authenticated
        self.quic_pool: Any = None  # QuicServerPool when quic=1
        self.slot = ControlSlot(self)
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
        from ..quic.engine import QuicEngine

        assert self.tls is not None  # quic=1 always has TLS (code 1 at least)
        opts = self.opts
        self.engine = QuicEngine(self.log, opts.report_interval, opts.quic_offload)
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
        self._adopt(*self.slot.first(self.listener))
        self.tunnel_server = KeepingStreamServer(self.listener, self._pool_accept,
                                                 spawn=self.tasks.spawn, first=self._pool_accept_in_hub)
        self.tunnel_server.start()
        if self.engine is not None:
            from ..pool.quic import QuicServerPool

            self.quic_pool = QuicServerPool(self.engine, self.pool, self.opts.max,
                                            self.opts.handshake_timeout, self.log, self.tasks,
                                            verifier=self.pool_verifier)
        if self.flow == "-":
            tcp, udp = self._user_socks
            self._user_socks = (None, None)
            self.open_user_listeners(self.inst.spec.targets[0], tcp, udp)
        self.start_control()

    def on_claim(self, ip: str, reply: Reply) -> None:
        """An attempt from *ip* took the control slot, just before its reply leaves.  With
        QUIC, admit the client's address now: a Go client dials its QUIC pool the instant it
        reads the reply.  Larger datagrams only towards an npgevent peer."""
        if self.engine is not None:
            self.engine.admit(ip, self.opts.quic_datagram_size if reply.npg >= 1 else 0)

    def reply_for(self, level: int) -> Reply:
        opts = self.opts
        return Reply(quic=bool(opts.quic), max=opts.max, flow=self.flow, tls=self.tls_code, npg=level)

    def fingerprint(self) -> str:
        return self.tls.fingerprint if self.tls is not None else ""

    def _adopt(self, sock: socket.socket, addr: Any, outcome: handshake.Outcome) -> None:
        """The winner becomes the control connection."""
        log = self.log
        peer = format_addr(addr)
        sock.settimeout(None)
        self.control, self.peer, self.peer_ip = sock, peer, unmap(addr[0])
        self.leftover, self.npg = outcome.leftover, outcome.reply.npg
        self.reuse = False  # until the client says it speaks level 2 too (on_level)
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

    def on_level(self, level: int) -> None:
        """The client's extension level: at 2 on a TLS pool, our launches are framed and their
        pool connections reused (a client that announced nothing stays at level 1 here)."""
        if reuses_pool(min(level, self.npg), self.tls_code, self.engine is not None) and not self.reuse:
            self.reuse = True
            self.log.debug("Tunnel extension level %d: TCP sessions reuse their pool connections",
                           min(level, self.npg))

    def _pool_accept(self, sock: socket.socket, addr: Any) -> None:
        """A connection to the tunnel port after the handshake, in its own greenlet: a
        takeover attempt, a TLS pool connection, or a plain one the hub path passed on."""
        opts = self.opts
        if self.slot.open_to_takeover() and self.slot.is_challenger(sock, unmap(addr[0])):
            if self.slot.challenge(sock, addr):
                assert self.tunnel_server is not None
                self.tunnel_server.keep(sock)
            return
        if not self._admissible(addr):
            return
        stream: Any = sock
        if self.tls is not None:
            from ..net.tls import TLSError, TLSStream

            stream = TLSStream.server(sock, self.tls.current())
            try:
                stream.handshake(opts.handshake_timeout)
            except (TLSError, OSError) as exc:
                self.inst.events.failure("pool_admission")
                self.log.debug("Tunnel connection: %s dropped: %s", format_addr(addr), exc)
                return
        if self.pool_verifier is not None and not self._proven(stream, sock, addr):
            return
        if self._hand_out(stream, sock, addr):
            assert self.tunnel_server is not None
            self.tunnel_server.keep(sock)

    def _pool_accept_in_hub(self, sock: socket.socket, addr: Any) -> bool:
        """A plain-TCP pool connection admitted in the accept callback, with its proof read in
        hub callbacks (:mod:`npgevent.pool.hubsetup`): no greenlet.  False passes the
        connection to :meth:`_pool_accept` (TLS, QUIC, or a possible takeover)."""
        if self.tls is not None or self.engine is not None:
            return False
        if self.slot.open_to_takeover() and self.slot.is_challenger(sock, unmap(addr[0])):
            return False  # the challenge reads a handshake: that waits
        if not self._admissible(addr):
            sock.close()
            return True
        if self.pool_verifier is None:
            if not self._hand_out(sock, sock, addr, hubsetup.send_now):
                sock.close()
            return True

        def proven(sock: socket.socket, proof: bytes) -> None:
            if not self._proof_ok(proof, addr) or not self._hand_out(sock, sock, addr, hubsetup.send_now):
                sock.close()

        def failed(exc: BaseException) -> None:
            if not isinstance(exc, hubsetup.Cancelled):  # not our own close
                self._no_proof(addr, exc)

        hubsetup.admit(sock, POOL_PROOF, self.opts.handshake_timeout, proven, failed, self.setups)
        return True

    def _admissible(self, addr: Any) -> bool:
        """The pool phase's checks before any byte is read (logged at debug when refused)."""
        log = self.log
        if self.engine is not None:
            log.debug("Tunnel connection: %s refused: the pool is QUIC", format_addr(addr))
            return False
        if unmap(addr[0]) != self.peer_ip:
            self.inst.events.failure("pool_admission")
            log.debug("Tunnel connection: %s refused: not the tunnel client", format_addr(addr))
            return False
        if self.pool.active >= self.opts.max:
            log.debug("Tunnel connection: %s refused: pool full (%d)", format_addr(addr), self.opts.max)
            return False
        return True

    def _hand_out(self, stream: Any, sock: socket.socket, addr: Any, write: Any = send_all) -> bool:
        """Give the admitted connection its id and put it in the pool; False if the write
        failed (the caller closes).  In the hub, *write* is one that never waits."""
        cid = new_cid()
        while cid in self.pool.idle or cid in self.pool.lent:
            cid = new_cid()
        try:
            write(stream, bytes.fromhex(cid))
        except OSError as exc:
            self.log.debug("Tunnel connection: %s dropped: %s", format_addr(addr), exc)
            return False
        self.pool.add(PoolConn(cid, stream, sock))
        return True

    def take_over(self, sock: socket.socket, addr: Any, outcome: handshake.Outcome) -> None:
        """A peer that proved the key replaces the unauthenticated control connection: the
        old control loop stops, its idle pool connections go, sessions in flight carry on."""
        old = self.peer
        self.stop_control()
        self.pool.flush()
        for conn in self.verifying.values():
            conn.close()
        self.verifying.clear()
        self.forged, self.ticks, self._verified, self._ping_sent = 0, 0, False, 0.0
        self._adopt(sock, addr, outcome)
        if self.quic_pool is not None:
            self.quic_pool.verifier = self.pool_verifier
        self.log.warn("Tunnel control taken over: %s proved the key; the unauthenticated peer %s "
                      "is dropped", self.peer, old)
        self.start_control()

    def _proven(self, stream: Any, sock: socket.socket, addr: Any) -> bool:
        """An authenticated tunnel: the connection must prove membership before it gets an id."""
        sock.settimeout(self.opts.handshake_timeout)
        try:
            proof = read_exact(stream, POOL_PROOF)
        except (OSError, gevent.Timeout, socket.timeout) as exc:
            self._no_proof(addr, exc)
            return False
        finally:
            sock.settimeout(None)
        return self._proof_ok(proof, addr)

    def _no_proof(self, addr: Any, exc: BaseException) -> None:
        self.inst.events.failure("pool_admission")
        self.log.limited(WARN, "pool-proof", "Tunnel connection: %s dropped: no pool proof (%s)"
                         % (format_addr(addr), exc))

    def _proof_ok(self, proof: bytes, addr: Any) -> bool:
        assert self.pool_verifier is not None
        if not self.pool_verifier.check(proof):
            self.pool_rejected += 1
            self.inst.events.failure("pool_admission")
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
        for setup in list(self.setups):
            setup.cancel()
        self.slot.close()
        if self.engine is not None:
            self.engine.stop()
        for s in self._user_socks:
            if s is not None:
                s.close()
        if self.listener is not None:
            self.listener.close()
