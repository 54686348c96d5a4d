"""Socket options and listeners shared by every core.

Relayed TCP sockets get ``TCP_NODELAY`` (Go's default) and keepalive; UDP
sockets get large buffers so a burst of datagrams is not dropped on loopback.
Listeners are created here so that "address already in use" becomes one clear
error line, and UDP listeners never set ``SO_REUSEADDR`` (which would let two
processes share a UDP port silently).
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import socket as _stdsocket
import termios
from typing import Any

from gevent import socket

from ..url import HostPort
from .lightsock import PLAIN

UDP_BUFFER = 4 * 1024 * 1024
#: a UDP listener's receive buffer: a burst from many new sources waits here while their sessions
#: open (a limit, not an allocation: the kernel charges only what is queued)
LISTEN_UDP_BUFFER = 16 * 1024 * 1024
_SO_RCVBUFFORCE = getattr(_stdsocket, "SO_RCVBUFFORCE", 33)
_SO_SNDBUFFORCE = getattr(_stdsocket, "SO_SNDBUFFORCE", 32)
_TCP_INFO = getattr(_stdsocket, "TCP_INFO", None)  # Linux: the first byte is the TCP state
_TCP_ESTABLISHED = 1
_KEEPIDLE = hasattr(_stdsocket, "TCP_KEEPIDLE")
_PEEK_NOWAIT = int(_stdsocket.MSG_PEEK | _stdsocket.MSG_DONTWAIT)  # an enum OR costs ~1 us a call


class ListenError(OSError):
    """A listener could not be opened; ``str()`` is one readable line."""

    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(message)
        self.errno = code
        self.strerror = message
        self.message = message

    def __str__(self) -> str:
        return self.message


def connect_numeric(sock: socket.socket, address: tuple[Any, ...], timeout: float | None) -> None:
    """Connect a gevent TCP socket to a numeric *address* within *timeout* (seconds; the
    socket is left without one): one ``connect(2)``, a wait for the socket to become
    writable unless it is connected already, then ``SO_ERROR``.  gevent's ``connect()`` does
    the same with more around it (an address check that may resolve, a second
    ``connect(2)``): per connection that matters at thousands of connections a second."""
    connect_finish(sock, connect_start(sock._sock, address), timeout)


def connect_start(raw: Any, address: tuple[Any, ...]) -> int:
    """The non-blocking half of a connect, safe in a hub callback: ``connect(2)`` on the raw
    socket; 0 when it is connected already, else the errno (EINPROGRESS or EINTR: still
    connecting, for :func:`connect_finish`; anything else: it failed)."""
    err = raw.connect_ex(address)
    if err == errno.EINPROGRESS and established(raw):
        return 0  # loopback and local targets: the handshake ran inside connect(2)
    return int(err)


def connect_finish(sock: socket.socket, err: int, timeout: float | None) -> None:
    """Finish a connect that :func:`connect_start` left at *err*: wait (in a greenlet) up to
    *timeout* for one under way, then raise ``OSError`` if it failed."""
    if err in (errno.EINPROGRESS, errno.EINTR):
        sock.settimeout(timeout)
        try:
            sock._wait(sock._write_event)  # raises socket.timeout("timed out") at the deadline
        finally:
            sock.settimeout(None)
        err = sock._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


def established(raw: Any) -> bool:
    """Whether a connecting TCP socket is already connected (one ``getsockopt``, ~0.7 us): on
    loopback the kernel completes the handshake before a non-blocking ``connect(2)`` returns
    EINPROGRESS, and waiting for writability would cost a trip through the hub, a timer and
    two greenlet switches per connection for nothing."""
    if _TCP_INFO is None:
        return False
    try:
        return raw.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)[0] == _TCP_ESTABLISHED
    except OSError:
        return False


def tune_tcp(sock: socket.socket, keepalive: float = 15.0) -> None:
    raw = getattr(sock, "_sock", sock)  # gevent's setsockopt is a Python call around this one
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if _KEEPIDLE:
            secs = max(1, int(keepalive))
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, secs)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, secs)
    except OSError:
        pass  # not a TCP socket (tests hand in socketpairs) or already closed


def tune_udp(sock: socket.socket, size: int = UDP_BUFFER) -> None:
    for force, plain in ((_SO_RCVBUFFORCE, socket.SO_RCVBUF), (_SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            try:
                sock.setsockopt(socket.SOL_SOCKET, plain, size)
            except OSError:
                pass


def send_all(stream: Any, data: Any) -> None:
    """``stream.sendall(data)``, with one non-blocking ``send`` first on a plain gevent socket:
    gevent's ``sendall`` asks the kernel for SO_SNDBUF on every call (a syscall per small
    write); a datagram frame or a short reply nearly always fits the send buffer at once."""
    if type(stream) in PLAIN:
        try:
            sent = stream._sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        data = memoryview(data)[sent:]
    stream.sendall(data)


def can_write_nowait(stream: Any) -> bool:
    """Whether :func:`write_nowait` can write to *stream* (else it returns None)."""
    return type(stream) in PLAIN or hasattr(stream, "send_nowait")


def write_nowait(stream: Any, data: bytes) -> int | None:
    """Write what fits now, from a hub callback: the count written (0 if nothing fits: then
    the caller must write all of *data* again, which a TLS stream needs), or None if *stream*
    can't be written without possibly waiting (nothing was written)."""
    if type(stream) in PLAIN:
        try:
            return stream._sock.send(data)
        except BlockingIOError:
            return 0
    own = getattr(stream, "send_nowait", None)
    return None if own is None else own(data)


_FIONREAD = array.array("i", [0])  # filled and read with nothing in between: hub thread only


def has_input(fd: int) -> bool:
    """Whether socket *fd* holds input (``FIONREAD``: the bytes queued on a TCP socket, the
    size of the next datagram on a UDP one), for readers that would otherwise read until a
    read fails: a failed read costs a syscall and an exception (~2.5 us), this ~0.5 us, and it
    does not raise on a live socket.  An empty datagram reads as none: the level-triggered
    watcher brings it next loop turn.  Not for the QUIC thread (one buffer per process)."""
    fcntl.ioctl(fd, termios.FIONREAD, _FIONREAD)
    return _FIONREAD[0] > 0


def peek(sock: socket.socket) -> bytes | None:
    """One byte of *sock* without consuming it and without blocking: ``None`` if nothing
    has arrived, ``b""`` if the peer closed; raises OSError (a reset)."""
    try:
        return bytes(sock._sock.recv(1, _PEEK_NOWAIT))
    except BlockingIOError:
        return None


def bind_address(hp: HostPort) -> tuple[int, tuple[str, int]]:
    """(family, sockaddr) for listening on *hp* (empty host = all interfaces)."""
    host = hp.host
    if host == "":
        return socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET, ("::", hp.port)
    if ":" in host:
        return socket.AF_INET6, (host, hp.port)
    if host.lower() == "localhost":
        return socket.AF_INET, ("127.0.0.1", hp.port)
    return socket.AF_INET, (host, hp.port)


#: set in a worker process (npgevent.workers): listeners join the instance's SO_REUSEPORT group
REUSE_PORT = False


def probe_local(hp: HostPort, resolve_ip: str | None = None) -> None:
    """ListenError unless this host can listen on *hp* (bound with SO_REUSEPORT, not listening,
    closed at once: workers sharing the address are not disturbed)."""
    global REUSE_PORT
    saved, REUSE_PORT = REUSE_PORT, True
    try:
        sock = _open(hp, socket.SOCK_STREAM, resolve_ip, listen=False)
    finally:
        REUSE_PORT = saved
    sock.close()


def _open(hp: HostPort, kind: int, resolve_ip: str | None, listen: bool = True) -> socket.socket:
    family, addr = bind_address(hp)
    if resolve_ip is not None:
        family = socket.AF_INET6 if ":" in resolve_ip else socket.AF_INET
        addr = (resolve_ip, hp.port)
    proto = "tcp" if kind == socket.SOCK_STREAM else "udp"
    try:
        sock = socket.socket(family, kind)
    except OSError as exc:
        raise ListenError(exc.errno, "listen %s %s: %s" % (proto, hp, exc.strerror)) from None
    try:
        if family == socket.AF_INET6 and addr[0] == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if REUSE_PORT:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
        if not listen:
            return sock
        if kind == socket.SOCK_STREAM:
            # accepted sockets inherit TCP_NODELAY and keepalive from the listener:
            # set once here instead of four syscalls per connection
            tune_tcp(sock)
            sock.listen(socket.SOMAXCONN)
        else:
            tune_udp(sock, LISTEN_UDP_BUFFER)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            reason = "address already in use"
        elif exc.errno == errno.EADDRNOTAVAIL:
            reason = "cannot assign requested address (not an address of this host)"
        raise ListenError(exc.errno, "listen %s %s: %s" % (proto, hp, reason)) from None
    return sock


def listen_tcp(hp: HostPort, ip: str | None = None) -> socket.socket:
    """A listening TCP socket on *hp* (*ip*: an already-resolved host address)."""
    return _open(hp, socket.SOCK_STREAM, ip)


def listen_udp(hp: HostPort, ip: str | None = None) -> socket.socket:
    """A bound UDP socket on *hp*."""
    return _open(hp, socket.SOCK_DGRAM, ip)


def format_addr(addr: tuple) -> str:
    """``ip:port`` / ``[v6]:port`` of a socket address (as Go prints it)."""
    host, port = unmap(addr[0]), addr[1]
    if ":" in host:
        return "[%s]:%d" % (host.split("%", 1)[0], port)
    return "%s:%d" % (host, port)


def unmap(host: str) -> str:
    """``::ffff:1.2.3.4`` (an IPv4 peer on a dual-stack socket) -> ``1.2.3.4``."""
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host
