"""The QUIC thread's own asyncio loop and UDP sockets, built from original (unpatched) pieces.

:class:`NativeLoop` is an asyncio selector loop whose self-pipe is a real socketpair (a
gevent one would hand the thread's wake-ups to the hub) and whose datagram transports
drain the socket: :class:`DrainingTransport` reads every ready datagram (up to
:data:`DRAIN`) per wake-up where asyncio reads one, so a burst of packets costs one loop
iteration, its events reach gevent in one batch and each connection answers it once.
"""

from __future__ import annotations

import _socket
import asyncio
from asyncio import selector_events
from collections.abc import Callable
from typing import Any

from gevent import monkey

RealSocket = monkey.get_original("socket", "socket")


def _real_socketpair() -> tuple[Any, Any]:
    """A socketpair of the standard library's own socket class.  ``socket.socketpair``, even
    the original function, wraps its ends in the module's ``socket`` class, which
    ``monkey.patch_all()`` made gevent's: such a socket made in this thread starts a second
    gevent hub (a libev loop and its epoll descriptor) there, and every wake-up of the loop
    would go through gevent's socket methods."""
    a, b = _socket.socketpair()
    return RealSocket(fileno=a.detach()), RealSocket(fileno=b.detach())


UDP_BUFFER = 4 << 20
DRAIN = 64  # datagrams read per wake-up of a UDP socket, at most


class DrainingTransport(selector_events._SelectorDatagramTransport):  # type: ignore[name-defined]
    """Reads every datagram that is ready (up to :data:`DRAIN`) per wake-up, where asyncio reads
    one.  Fewer loop iterations per packet, and the events of one burst (say, both packets of a
    Go peer's raw datagram that quic-go cut in two) reach gevent in one batch."""

    def _read_ready(self) -> None:
        sock, protocol = self._sock, self._protocol
        try:
            for _ in range(DRAIN):
                if self._conn_lost:
                    return
                try:
                    data, addr = sock.recvfrom(self.max_size)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    protocol.error_received(exc)
                    return
                protocol.datagram_received(data, addr)
        finally:
            after = self._loop.after_read
            if after is not None:
                after()


class NativeLoop(asyncio.SelectorEventLoop):
    """An asyncio loop whose self-pipe is a real socketpair (not a gevent one) and whose
    datagram transports drain the socket, then call :attr:`after_read` (the QUIC thread
    sends the answers to the burst there)."""

    after_read: Callable[[], None] | None = None

    def _make_datagram_transport(self, sock: Any, protocol: Any, address: Any = None, waiter: Any = None,
                                 extra: Any = None) -> Any:
        return DrainingTransport(self, sock, protocol, address, waiter, extra)

    def _make_self_pipe(self) -> None:
        self._ssock, self._csock = _real_socketpair()
        self._ssock.setblocking(False)
        self._csock.setblocking(False)
        # the same bookkeeping as asyncio's own _make_self_pipe (private asyncio API)
        self._internal_fds += 1  # type: ignore[attr-defined]
        self._add_reader(self._ssock.fileno(), self._read_from_self)  # type: ignore[attr-defined]


def tune(sock: Any) -> None:
    import socket as std

    for opt in (std.SO_RCVBUF, std.SO_SNDBUF):
        try:
            sock.setsockopt(std.SOL_SOCKET, opt, UDP_BUFFER)
        except OSError:
            pass
