"""Client cores: run-mode detection, and the dual-end tunnel client.

Mode 0 (auto) tries to listen on the tunnel address: success means single-end
forwarding (the listener is handed over, so nothing races for the port);
failure (a remote address, or the port is taken) means dual-end tunnel mode.
Mode 1 forces single-end, mode 2 dual-end.

The dual-end client dials the tunnel address, sends the key line (ending in
``\\r\\n``: the npgevent marker a Go server ignores), and applies what the
server dictates in its reply: flow, TLS code, QUIC, ``max`` and the extension
level.  It then keeps a pool of idle connections to the server (adaptive
capacity from ``min`` to the server's ``max``), and in forward flow (``+``)
listens on its first target address for users.
"""

from __future__ import annotations

from typing import Any

from gevent import socket

from ..errors import CoreError, RemoteProtocolError
from ..net.dial import family_of
from ..net.sockopt import ListenError, format_addr, listen_tcp, tune_tcp
from ..pool.base import Adaptive
from ..pool.tcp import ClientPool, PoolConn, read_exact
from ..protocol.handshake import client_hello, read_reply
from ..protocol.signals import MAX_LINE
from .common import Core, Instance
from .forward import ForwardCore
from .tunnel import TunnelCore

POOL_ID_TIMEOUT = 60.0  # Go waits up to a minute for the server's 4-byte id


def client_core(inst: Instance) -> Core:
    mode = inst.opts.mode
    if mode == "1":
        return ForwardCore(inst)
    if mode == "0":
        try:
            sock = listen_tcp(inst.spec.tunnel, inst.resolver.listen_ip(inst.spec.tunnel.host))
        except (ListenError, OSError) as exc:
            inst.log.debug("Single-end listen failed (%s): using dual-end mode", exc)
            return DualClientCore(inst)
        return ForwardCore(inst, tcp_listener=sock)
    return DualClientCore(inst)


class DualClientCore(TunnelCore):
    mode = 2

    def __init__(self, inst: Instance) -> None:
        super().__init__(inst)
        self.server_ip = ""
        self.ctx: Any = None
        self.engine: Any = None  # QuicEngine when the server asks for QUIC
        self.quic: Any = None

    def _start(self) -> None:
        opts, spec, log = self.opts, self.inst.spec, self.log
        tunnel = spec.tunnel
        try:
            ip = self.inst.resolver.resolve(tunnel.host or "127.0.0.1")[0]
        except OSError as exc:
            raise CoreError("tunnel address %s: %s" % (tunnel, exc)) from None
        self.server_ip = ip
        sock = socket.socket(family_of(ip), socket.SOCK_STREAM)
        try:
            sock.settimeout(opts.tcp_dial_timeout)
            sock.connect((ip, tunnel.port))
            tune_tcp(sock, opts.report_interval)
            sock.sendall(client_hello(self.key))
            sock.settimeout(opts.handshake_timeout)
            buf = b""
            while b"\n" not in buf:
                chunk = sock.recv(4096)
                if not chunk:
                    raise CoreError("tunnel handshake: connection closed by the server "
                                    "(wrong tunnel key?)")
                buf += chunk
                if len(buf) > MAX_LINE:
                    raise CoreError("tunnel handshake: reply too long")
            line, _, self.leftover = buf.partition(b"\n")
            try:
                reply = read_reply(line + b"\n", self.key)
            except RemoteProtocolError as exc:
                raise CoreError("tunnel handshake: %s" % exc) from None
            sock.settimeout(None)
        except socket.timeout:
            sock.close()
            raise CoreError("tunnel handshake with %s: timed out" % tunnel) from None
        except OSError as exc:
            sock.close()
            raise CoreError("tunnel %s: %s" % (tunnel, exc.strerror or exc)) from None
        except CoreError:
            sock.close()
            raise
        self.control = sock
        self.peer = format_addr(sock.getpeername())
        self.flow, self.tls_code, self.npg = reply.flow, reply.tls, reply.npg
        log.info("Tunnel signal <- : %s <- %s", reply.encode(), self.peer)
        log.info("Tunnel handshaked: %s <-> %s", format_addr(sock.getsockname()), self.peer)
        connector = self._dial_pool
        if reply.quic:
            connector = self._start_quic(reply.max)
        elif self.tls_code != "0":
            from ..net.tls import client_context  # pyOpenSSL costs ~12 MB: load it only when used

            self.ctx = client_context(self.tls_code)
        adaptive = Adaptive(opts.min, reply.max, opts.min_pool_interval, opts.max_pool_interval)
        self.pool = ClientPool(log, connector, adaptive, report_every=opts.report_interval)
        self.spawn_task(self.pool.run)
        if self.flow == "+":
            self.open_user_listeners(spec.targets[0])
        self.start_control()

    def _start_quic(self, server_max: int) -> Any:
        """Start the QUIC thread and its connections; return the pool connector."""
        from ..pool.quic import QuicConnector, connection_count
        from ..quic.stream import QuicEngine
        from ..quic.thread import make_configuration

        opts = self.opts
        self.engine = QuicEngine(self.log, opts.report_interval)
        self.engine.on_failure = lambda why: self.fail(CoreError("QUIC: %s" % why))
        self.engine.start()
        from ..quic.thread import DATAGRAM_SIZE

        # larger datagrams only towards an npgevent server: quic-go would drop them
        size = opts.quic_datagram_size if self.npg >= 1 else DATAGRAM_SIZE
        config = make_configuration(True, 3 * opts.report_interval, self.tls_code,
                                    server_name=self.inst.spec.tunnel.host, datagram_size=size)
        self.quic = QuicConnector(self.engine, self.server_ip, self.inst.spec.tunnel.port, config,
                                  connection_count(server_max), opts.tcp_dial_timeout, POOL_ID_TIMEOUT,
                                  self.log)
        self.quic.start()
        return self.quic.connect

    def _close(self) -> None:
        super()._close()
        if self.quic is not None:
            self.quic.close()
        if self.engine is not None:
            self.engine.stop()

    def _dial_pool(self) -> PoolConn:
        """One pool connection: TCP, TLS for codes 1/2, then the server's 4-byte id."""
        opts = self.opts
        host = self.inst.spec.tunnel.host
        sock = socket.socket(family_of(self.server_ip), socket.SOCK_STREAM)
        try:
            sock.settimeout(opts.tcp_dial_timeout)
            sock.connect((self.server_ip, self.inst.spec.tunnel.port))
            tune_tcp(sock, opts.report_interval)
            stream: Any = sock
            if self.ctx is not None:
                from ..net.tls import TLSStream

                stream = TLSStream.client(sock, self.ctx, host)
                stream.handshake(opts.handshake_timeout, verify_name=host if self.tls_code == "2" else "")
            sock.settimeout(POOL_ID_TIMEOUT)
            cid = read_exact(stream, 4).hex()
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        return PoolConn(cid, stream, sock)
