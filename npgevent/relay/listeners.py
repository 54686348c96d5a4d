"""The user-facing listeners of a core: TCP and UDP on one address.

Single-end forwarding listens on the tunnel address, the receiving side of a
tunnel on its first target address; both open a gevent ``StreamServer`` (each
connection's handler on a parked worker greenlet, :class:`~npgevent.relay.runners.Sessions`)
and a UDP :class:`~npgevent.relay.udp.SessionTable`,
as ``notcp``/``noudp`` allow, and tear them down the same way.  Both count
every user session against ``slot=``: a connection over the limit is refused
at accept, in the hub (the UDP table does the same for new source addresses).
A core may see each TCP connection at accept and take it over there
(``tcp_start``: single-end forwarding relays from hub callbacks alone).  Accepted sockets are
:mod:`~npgevent.net.lightsock`'s (gevent sockets made and closed with less around them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gevent import socket
from gevent.server import StreamServer

from ..log import DEBUG, ERROR, InstanceLog
from ..net import lightsock
from ..net.sockopt import format_addr, listen_tcp, listen_udp
from ..settings import Options
from ..url import HostPort
from .limit import Slots
from .udp import SessionTable, UdpSession
from .udplistener import UdpListener


class _TcpServer(lightsock.LightStreamServer):
    """gevent's ``StreamServer`` (its accept loop and its back-off on errors) with each accepted
    connection handed to :meth:`Listeners._accepted` in the hub."""

    def __init__(self, sock: socket.socket, accepted: Callable[[socket.socket, Any], None]) -> None:
        super().__init__(sock, accepted, spawn=None)
        self._accepted = accepted

    def do_handle(self, sock: socket.socket, addr: Any) -> None:
        self._accepted(sock, addr)


class Listeners:
    def __init__(self, opts: Options, slots: Slots, log: InstanceLog, spawn: Callable[..., Any]) -> None:
        self.opts, self.slots, self.log, self.spawn = opts, slots, log, spawn
        self.tcp: StreamServer | None = None
        self.udp: UdpListener | None = None
        self.table: SessionTable | None = None
        self.tcp_start: Callable[[socket.socket, Any], bool] | None = None

    def open(
        self,
        where: HostPort,
        tcp_handler: Callable[[socket.socket, Any], None],
        udp_factory: Callable[[SessionTable, Any], UdpSession],
        ip: str | None = None,
        tcp_sock: socket.socket | None = None,
        udp_sock: socket.socket | None = None,
        tcp_start: Callable[[socket.socket, Any], bool] | None = None,
    ) -> None:
        """Start listening; sockets already bound (mode detection) are used, or closed if unwanted.

        Each TCP connection holds a slot from its accept.  *tcp_start*, if given, sees it
        first, in the hub: returning True it takes the connection over (its socket and slot
        go back through :meth:`end_tcp`); otherwise *tcp_handler* runs on a session job."""
        if not self.opts.notcp:
            self.tcp_handler, self.tcp_start = tcp_handler, tcp_start
            self.tcp = _TcpServer(tcp_sock or listen_tcp(where, ip), self._accepted)
            self.tcp.start()
        elif tcp_sock is not None:
            tcp_sock.close()
        if not self.opts.noudp:
            self.table = SessionTable(udp_factory, self.slots, self.opts.udp_read_timeout, self.log)
            self.udp = self.table.attach(udp_sock or listen_udp(where, ip))
            self.udp.start()
        elif udp_sock is not None:
            udp_sock.close()

    def _accepted(self, sock: socket.socket, addr: Any) -> None:
        """A new TCP connection, in the hub."""
        slots = self.slots
        if not slots.acquire_tcp():
            self.log.limited(ERROR, "tcp-slot", "TCP slot limit reached (%d): connection from %s refused",
                             slots.limit, format_addr(addr))
            sock.close()
            return
        try:
            start = self.tcp_start
            if start is None or not start(sock, addr):
                self.spawn(self.run_tcp, self.tcp_handler, sock, addr)
        except BaseException:
            self.end_tcp(sock)
            raise

    def run_tcp(self, handler: Callable[..., None], sock: socket.socket, addr: Any, *args: Any) -> None:
        """A session job: ``handler(sock, addr, *args)``, then the connection's end."""
        try:
            handler(sock, addr, *args)
        finally:
            self.end_tcp(sock)

    def end_tcp(self, sock: socket.socket) -> None:
        """A TCP connection's end: its socket closed, its slot released."""
        sock.close()
        self.slots.release_tcp()

    def report_drops(self) -> None:
        """One DEBUG line per report interval when UDP datagrams were dropped (never per datagram)."""
        if self.table is not None and self.log.enabled(DEBUG):
            summary = self.table.drops_report()
            if summary:
                self.log.debug("UDP datagrams dropped in the last interval: %s", summary)

    def stop_accepting(self) -> None:
        if self.tcp is not None:
            self.tcp.close()
        if self.udp is not None:
            self.udp.close()

    def close(self) -> None:
        self.stop_accepting()
        if self.table is not None:
            self.table.close()
