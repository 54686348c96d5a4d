"""The tunnel server (``server://``).

Run mode: 0 tries to listen on the first target address (TCP and UDP): success
means **reverse** (flow ``-``, run mode 1: users connect here, the client dials
its targets), failure means **forward** (flow ``+``, run mode 2: the client
listens, the server dials its targets).  Mode 1 forces reverse, 2 forward.

The tunnel listener serves two phases, as in Go:

1. *handshake*: connections are taken one at a time; each must send the key line
   within ``NP_HANDSHAKE_TIMEOUT``.  A wrong key logs
   ``tunnelHandshake: access denied: <addr>``, closes, and waits
   ``NP_SERVICE_COOLDOWN`` before the next attempt.  The right key gets the
   reply ``np://<quic>@<max>/<flow>#<tls>`` and becomes the control connection.
2. *pool*: every later connection is a pool connection: refused unless it comes
   from the control connection's IP and fewer than ``max`` are idle; TLS
   handshake for codes 1/2 (a failure is logged at debug and dropped); then 4
   random bytes (the id) are written and the connection waits in the pool.

When the control connection dies the whole core is torn down (listeners
included) and restarted after the cooldown.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import gevent
from gevent import socket

from ..errors import CoreError
from ..net.sockopt import ListenError, format_addr, listen_tcp, listen_udp, unmap
from ..pool.tcp import IdlePool, PoolConn, new_cid
from ..protocol.handshake import EXTENSION_LEVEL, Reply, check_hello, server_reply
from ..protocol.signals import MAX_LINE
from .common import Instance
from .tunnel import KeepingStreamServer, TunnelCore

if TYPE_CHECKING:
    from ..net.tls import ServerTLS


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


class ServerCore(TunnelCore):
    def __init__(self, inst: Instance) -> None:
        super().__init__(inst)
        self.tls = server_tls(inst)
        self.tls_code = self.tls.code if self.tls is not None else "0"
        self.listener: socket.socket | None = None
        self.tunnel_server: KeepingStreamServer | None = None
        self.peer_ip = ""
        self._user_socks: tuple[Any, Any] = (None, None)
        self._verified = False
        self.pool = IdlePool(self.log)
        self.engine: Any = None  # QuicEngine when quic=1
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
        from ..quic.stream import QuicEngine
        from ..quic.thread import make_configuration

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
        while True:
            sock, addr = self.listener.accept()
            if self._handshake(sock, addr):
                break
            gevent.sleep(0)
        self.tunnel_server = KeepingStreamServer(self.listener, self._pool_accept,
                                                 spawn=self.tasks.spawn)
        self.tunnel_server.start()
        if self.engine is not None:
            from ..pool.quic import QuicServerPool

            QuicServerPool(self.engine, self.pool, self.opts.max, self.opts.handshake_timeout,
                           self.log, self.tasks)
        if self.flow == "-":
            tcp, udp = self._user_socks
            self._user_socks = (None, None)
            self.open_user_listeners(self.inst.spec.targets[0], tcp, udp)
        self.start_control()

    def _handshake(self, sock: socket.socket, addr: Any) -> bool:
        opts, log = self.opts, self.log
        peer = format_addr(addr)
        sock.settimeout(opts.handshake_timeout)
        buf = b""
        try:
            while b"\n" not in buf and len(buf) <= MAX_LINE:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                buf += chunk
        except socket.timeout:
            log.warn("tunnelHandshake: handshake timeout: %s", peer)
            sock.close()
            return False
        except OSError as exc:
            log.warn("tunnelHandshake: read failed: %s: %s", peer, exc.strerror or exc)
            sock.close()
            return False
        line, sep, rest = buf.partition(b"\n")
        hello = check_hello(line + sep, self.key) if sep else None
        if hello is None or not hello.key_ok:
            log.warn("tunnelHandshake: access denied: %s", peer)
            sock.close()
            gevent.sleep(opts.service_cooldown)
            return False
        npg = EXTENSION_LEVEL if hello.npgevent else 0
        quic = bool(opts.quic)
        reply = Reply(quic=quic, max=opts.max, flow=self.flow, tls=self.tls_code, npg=npg)
        if self.engine is not None:
            # admit the client's address to the QUIC endpoint *before* the reply leaves: a Go
            # client dials its QUIC pool the instant it reads it.  Larger datagrams only
            # towards an npgevent peer: quic-go would drop them.
            size = opts.quic_datagram_size if npg >= 1 else 0
            self.engine.admit(unmap(addr[0]), size)
        try:
            sock.sendall(server_reply(reply, self.key))
        except OSError as exc:
            log.warn("tunnelHandshake: write failed: %s: %s", peer, exc.strerror or exc)
            sock.close()
            return False
        sock.settimeout(None)
        self.control, self.peer, self.peer_ip = sock, peer, unmap(addr[0])
        self.leftover, self.npg = rest, npg
        log.info("Tunnel signal -> : %s -> %s", reply.encode(), peer)
        log.info("Tunnel handshaked: %s <-> %s", format_addr(sock.getsockname()), peer)
        return True

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
