"""The user-facing listeners of a core: TCP and UDP on one address.

Single-end forwarding listens on the tunnel address, the receiving side of a
tunnel on its first target address; both open a gevent ``StreamServer`` (each
connection's handler on a parked worker greenlet, :class:`~npgevent.relay.runners.Sessions`)
and a UDP :class:`~npgevent.relay.udp.SessionTable`,
as ``notcp``/``noudp`` allow, and tear them down the same way.  Both count
every user session against ``slot=``: a connection over the limit is refused
here (the UDP table does the same for new source addresses).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gevent import socket
from gevent.server import StreamServer

from ..log import DEBUG, ERROR, InstanceLog
from ..net.sockopt import format_addr, listen_tcp, listen_udp
from ..settings import Options
from ..url import HostPort
from .limit import Slots
from .udp import SessionTable, UdpListener, UdpSession


class Listeners:
    def __init__(self, opts: Options, slots: Slots, log: InstanceLog, spawn: Callable[..., Any]) -> None:
        self.opts, self.slots, self.log, self.spawn = opts, slots, log, spawn
        self.tcp: StreamServer | None = None
        self.udp: UdpListener | None = None
        self.table: SessionTable | None = None

    def open(
        self,
        where: HostPort,
        tcp_handler: Callable[[socket.socket, Any], None],
        udp_factory: Callable[[SessionTable, Any], UdpSession],
        ip: str | None = None,
        tcp_sock: socket.socket | None = None,
        udp_sock: socket.socket | None = None,
    ) -> None:
        """Start listening; sockets already bound (mode detection) are used, or closed if unwanted."""
        if not self.opts.notcp:
            self.tcp_handler = tcp_handler
            self.tcp = StreamServer(tcp_sock or listen_tcp(where, ip), self._tcp, spawn=self.spawn)
            self.tcp.start()
        elif tcp_sock is not None:
            tcp_sock.close()
        if not self.opts.noudp:
            self.table = SessionTable(udp_factory, self.slots, self.opts.udp_read_timeout, self.log)
            self.udp = self.table.attach(udp_sock or listen_udp(where, ip))
            self.udp.start()
        elif udp_sock is not None:
            udp_sock.close()

    def _tcp(self, sock: socket.socket, addr: Any) -> None:
        slots = self.slots
        if not slots.acquire_tcp():
            self.log.limited(ERROR, "tcp-slot", "TCP slot limit reached (%d): connection from %s refused",
                           slots.limit, format_addr(addr))
            return
        try:
            self.tcp_handler(sock, addr)
        finally:
            slots.release_tcp()

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
