"""gevent TCP sockets made and closed with less around them, for connections by the thousand.

A relayed connection has two sockets, the user's (accepted) and the target's (dialled), and
at thousands of connections a second their gevent objects count: gevent's ``socket``
builds itself through ``__init__`` (its mixin's and its own, a hub lookup, the default
timeout) and closes through a detour that lets greenlets waiting on the socket fail first
(``cancel_waits_close_and_then``, a ``closing_fd`` check, a placeholder socket object). Made
from an accepted descriptor and closed, one costs ~17 us here against ~6 us for the stdlib
socket alone.

:class:`LightSocket` is gevent's socket, changed in two places only: :func:`wrap` fills
its fields directly from a stdlib socket (the same values gevent's ``__init__`` sets), and
:meth:`LightSocket.close` closes at once when nothing can be waiting on the socket (no
watcher started or holding a callback, no ``makefile`` reference), and takes gevent's way
otherwise.  ~11 us per socket.  Every other method is gevent's, so the socket goes wherever a
gevent socket goes (the greenlet relay, a TLS wrapper, ``sendall`` that waits).

Should a gevent release rename the fields this relies on, :data:`USABLE` is False and
:func:`wrap` builds a plain gevent socket instead.
"""

from __future__ import annotations

import _socket
from typing import Any

import gevent
from gevent import socket
from gevent.server import StreamServer

try:  # the placeholder gevent leaves in a closed socket (private: checked, see USABLE)
    from gevent._socket3 import _closedsocket
except ImportError:  # pragma: no cover - a gevent without it builds plain sockets
    _closedsocket = None

_FIELDS = {"hub", "timeout", "_read_event", "_write_event", "_sock", "_io_refs", "_closed"}
_SOCK_CLASS = getattr(socket.socket, "_gevent_sock_class", _socket.socket)


def _slots(cls: type) -> set[str]:
    return {name for klass in cls.__mro__ for name in getattr(klass, "__slots__", ())}


#: gevent's socket has the fields :func:`wrap` fills (checked once, at import)
USABLE = _closedsocket is not None and _FIELDS.issubset(_slots(socket.socket))


class LightSocket(socket.socket):
    """gevent's socket with a direct construction (:func:`wrap`) and a direct close."""

    __slots__ = ()

    def close(self) -> None:
        me: Any = self  # gevent's fields (its stubs show the stdlib socket)
        r, w = me._read_event, me._write_event
        if (me._io_refs <= 0 and r is not None and w is not None
                and not (r.active or w.active or getattr(r, "callback", 1) is not None
                         or getattr(w, "callback", 1) is not None)):
            me._closed = True
            me._read_event = me._write_event = None
            r.close()
            w.close()
            raw, me._sock = me._sock, _CLOSED
            raw.close()
            return
        super().close()


_CLOSED = _closedsocket(_socket.AF_INET, _socket.SOCK_STREAM, 0, -1, "closed") if USABLE else None

#: the classes of plain gevent sockets (no TLS wrapper, no other I/O): code that reads and
#: writes the stdlib socket under one directly, or splices it, asks ``type(sock) in PLAIN``
PLAIN: tuple[type, ...] = (socket.socket, LightSocket)


def wrap(raw: Any) -> socket.socket:
    """A gevent socket that takes over the stdlib socket *raw* (an ``_socket.socket`` of
    gevent's own class: see :func:`tcp_socket` and :func:`accepted`), made non-blocking."""
    raw.setblocking(False)
    if not USABLE:
        return socket.socket(raw.family, raw.type, raw.proto, fileno=raw.detach())
    sock: Any = LightSocket.__new__(LightSocket)
    sock._closed = False
    sock._sock = raw
    sock._io_refs = 0
    hub = sock.hub = gevent.get_hub()
    fd = raw.fileno()
    io = hub.loop.io
    sock._read_event = io(fd, 1)
    sock._write_event = io(fd, 2)
    sock.timeout = _socket.getdefaulttimeout()
    return sock


def tcp_socket(family: int) -> socket.socket:
    """A new TCP socket of *family*, as ``gevent.socket.socket(family, SOCK_STREAM)``."""
    return wrap(_SOCK_CLASS(family, _socket.SOCK_STREAM))


def accepted(fd: int, family: int, kind: int, proto: int) -> socket.socket:
    """The gevent socket for a descriptor that ``accept`` returned."""
    return wrap(_SOCK_CLASS(family, kind, proto, fd))


def accept(listener: Any) -> tuple[socket.socket, Any] | None:
    """gevent ``StreamServer.do_read``'s accept on the listening gevent socket *listener*,
    with the connection's socket made here: (socket, address), or None if nothing waits."""
    try:
        fd, address = listener._accept()
    except BlockingIOError:
        if not listener.timeout:
            return None
        raise
    return accepted(fd, listener.family, listener.type, listener.proto), address


class LightStreamServer(StreamServer):
    """gevent's ``StreamServer`` whose accepted connections are made as :class:`LightSocket`."""

    def do_read(self) -> tuple[socket.socket, Any] | None:
        return accept(self.socket)
