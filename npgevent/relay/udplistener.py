"""The UDP listener of a session table, and the kernel's count of what it dropped.

:class:`UdpListener` is a gevent ``DatagramServer`` that reads datagrams of up to 64 KiB
(gevent's default is 8 KiB) and hands each to its owner in the reading callback itself
(``spawn=None``: no greenlet per datagram, order kept); at the end of every wake-up it calls
*after*, where sessions that gathered datagrams write them
(:meth:`~npgevent.relay.udp.SessionTable.flush`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from gevent import socket
from gevent.server import DatagramServer

from ..net.sockopt import has_input

MAX_DATAGRAM = 65535


class UdpListener(DatagramServer):
    """A DatagramServer reading full-size datagrams, handled inline.

    gevent reads until a read fails (a syscall and an exception per wake-up); this one stops
    when no other datagram is queued (:func:`~npgevent.net.sockopt.has_input`).
    """

    def __init__(self, sock: socket.socket, handle: Callable[[bytes, Any], None],
                 after: Callable[[], None] | None = None) -> None:
        super().__init__(sock, handle=handle, spawn=None)
        self._after = after  # at the end of every wake-up: sessions write what they gathered
        self._recvfrom = sock._sock.recvfrom  # non-blocking stdlib socket under the gevent one
        self._fd = sock.fileno()
        self._drained = False
        self.more_queued = False  # during a handle: another datagram is queued behind it

    def do_read(self) -> tuple[bytes, Any] | None:
        if self._drained:  # the last read took the last datagram: back to the loop
            self._drained = False
            return None
        try:
            data, addr = self._recvfrom(MAX_DATAGRAM)
        except BlockingIOError:
            return None
        except ConnectionRefusedError:
            return None  # ICMP from an earlier sendto: not fatal for a listener
        try:
            self._drained = not has_input(self._fd)
        except OSError:
            pass  # read on: the next read reports what is wrong
        return data, addr

    def do_handle(self, *args: Any) -> None:
        self._handle(*args)  # inline: gevent's wrapper would also call do_close (a no-op) per datagram

    def _do_read(self) -> None:
        """The watcher's callback.  gevent's loop asks ``full()``, resets its error back-off and
        goes through :meth:`do_handle` for every datagram, and calls :meth:`do_read` once more
        after the last; this one reads, handles and stops where the socket is drained.  A read
        error goes to gevent's loop, which reports it and backs off (or closes, if fatal)."""
        try:
            self._read_some()
        finally:
            if self._after is not None:
                self._after()

    def _read_some(self) -> None:
        handle = self._handle
        for _ in range(self.max_accept):
            try:
                got = self.do_read()
            except OSError:
                super()._do_read()
                return
            if got is None:
                return
            self.more_queued = not self._drained
            try:
                handle(*got)
            except Exception:  # a bug: reported, and the listener carries on
                self.loop.handle_error((got[1], self), *sys.exc_info())
            if self._drained:
                self._drained = False
                return


def kernel_drops(inode: int) -> int:
    """The kernel's count of datagrams dropped on the socket with *inode* (its receive buffer
    was full), from /proc/net/udp and udp6; 0 where that is not available."""
    if not inode:
        return 0
    needle = " %d " % inode
    for name in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(name) as fh:
                for line in fh:
                    if needle in line:
                        return int(line.split()[-1])
        except (OSError, ValueError):
            continue
    return 0
