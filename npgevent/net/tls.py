"""A TLS connection over a gevent socket, with the socket methods the relay needs.

:class:`TLSStream` wraps a connected gevent socket in an ``OpenSSL.SSL.Connection`` (from a
context of :mod:`npgevent.net.tlsctx`) and offers ``recv_into``, ``sendall``, ``shutdown``,
``close``, ``settimeout``, plus the non-blocking reads and writes of hub callbacks.  The OS
socket stays non-blocking; ``WantRead``/``WantWrite`` wait on the gevent socket's own
watchers, so closing the socket wakes any waiter.  ``shutdown(SHUT_WR)`` sends close_notify
and leaves reading open (TLS 1.3 half-close).  Records are read and written through
:mod:`npgevent.net.tlsio` (OpenSSL's calls without pyOpenSSL's wrapping around each).
"""

from __future__ import annotations

import os
import time
from typing import Any, Literal

from gevent import socket
from gevent.socket import wait_read, wait_write

from .certs import fingerprint
from .pyopenssl import SSL
from .sockopt import has_input, peek
from .tlsctx import reason
from .tlsio import RecordIO

MAX_RECORD = 16384  # the most plaintext one TLS record carries (RFC 8446 5.1)


class TLSError(OSError):
    """A TLS handshake or record failure, as one readable line."""


class TLSStream:
    """A TLS connection over a gevent socket with the socket methods the relay needs."""

    __slots__ = ("_fd", "_io", "_pending", "_retry", "conn", "sock")

    def __init__(self, sock: socket.socket, conn: SSL.Connection) -> None:
        self.sock = sock
        self.conn = conn
        self._io = RecordIO(conn)  # the record reads and writes (npgevent.net.tlsio)
        self._pending = b""
        self._fd = sock.fileno()
        # a read met something other than "nothing yet" (close_notify, an alert, a write OpenSSL
        # needs): from then on every read asks OpenSSL first instead of waiting for the socket
        self._retry = False

    @classmethod
    def server(cls, sock: socket.socket, ctx: SSL.Context) -> TLSStream:
        conn = SSL.Connection(ctx, sock)
        conn.set_accept_state()
        return cls(sock, conn)

    @classmethod
    def client(cls, sock: socket.socket, ctx: SSL.Context, server_name: str = "",
               session: SSL.Session | None = None) -> TLSStream:
        """A client stream; with *session* (a ticket from an earlier connection to the same
        server, same *ctx*) the handshake offers TLS 1.3 resumption."""
        conn = SSL.Connection(ctx, sock)
        if server_name and not _is_ip(server_name):
            conn.set_tlsext_host_name(server_name.encode("idna"))
        if session is not None:
            conn.set_session(session)
        conn.set_connect_state()
        return cls(sock, conn)

    @property
    def resumed(self) -> bool:
        """True when the handshake resumed a session (no certificate, no signature)."""
        try:
            from OpenSSL._util import lib  # pyOpenSSL has no public SSL_session_reused

            return bool(lib.SSL_session_reused(self.conn._ssl))
        except (ImportError, AttributeError):
            return False

    def session(self) -> SSL.Session | None:
        """The session to resume next time (holds the server's ticket once data was read)."""
        return self.conn.get_session()

    # -- handshake --------------------------------------------------------------------
    def handshake(self, timeout: float, verify_name: str = "") -> None:
        """Complete the handshake within *timeout*; with *verify_name*, check the peer's name."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TLSError("TLS handshake timeout")
            try:
                self.conn.do_handshake()
                break
            except SSL.WantReadError:
                wait_read(self.sock.fileno(), timeout=left, timeout_exc=TLSError("TLS handshake timeout"))
            except SSL.WantWriteError:
                wait_write(self.sock.fileno(), timeout=left, timeout_exc=TLSError("TLS handshake timeout"))
            except SSL.SysCallError as exc:
                detail = exc.args[1] if len(exc.args) > 1 else exc
                raise TLSError("TLS handshake failed: %s" % detail) from None
            except SSL.Error as exc:
                raise TLSError("TLS handshake failed: %s" % reason(exc)) from None
        if verify_name:
            self._verify_name(verify_name)

    def _verify_name(self, name: str) -> None:
        from service_identity import VerificationError
        from service_identity.pyopenssl import verify_hostname, verify_ip_address

        try:
            if _is_ip(name):
                verify_ip_address(self.conn, name)
            else:
                verify_hostname(self.conn, name)
        except VerificationError as exc:
            raise TLSError("TLS certificate does not match %s: %s" % (name, exc)) from None

    # -- socket-like API ----------------------------------------------------------------
    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """Fill *buffer* with as many decrypted records as are ready (at least one byte),
        reading straight into it."""
        want = min(nbytes or len(buffer), len(buffer))
        if self._pending:
            data = self.recv(want)
            buffer[: len(data)] = data
            return len(data)
        sock, io = self.sock, self._io
        if self.drained():  # the read would fail: wait for the socket first
            sock._wait(sock._read_event)
        n = 0
        # a TLS record carries at most 16 KiB: take what is already here without blocking,
        # so the relay writes one large chunk instead of one per record
        while n < want:
            try:
                got = io.recv_into(buffer, n, want - n)
            except SSL.Error as exc:
                if n:
                    if not isinstance(exc, SSL.WantReadError):
                        self._retry = True  # EOF, an alert or a needed write: the next read reports it
                    break
                outcome = self._failed_read(exc)
                if outcome == b"":
                    return 0  # the end
                self._wait(outcome is False)
                continue
            if not got:
                break
            n += got
            if got < MAX_RECORD and self.drained():
                break  # after a full record, more usually follows: read on (a miss is WantRead)
        return n

    def recv(self, n: int) -> bytes:
        sock = self.sock
        if self.drained():  # the read would fail: wait for the socket first
            sock._wait(sock._read_event)
        while True:
            data = self._read_once(n)
            if data is not None and data is not False:
                return data
            self._wait(data is False)

    def _wait(self, for_write: bool) -> None:
        """Wait until OpenSSL can go on: the socket readable, or writable (*for_write*)."""
        sock = self.sock
        if for_write:
            wait_write(sock.fileno(), timeout=sock.timeout)
        else:
            sock._wait(sock._read_event)

    def _read_once(self, n: int) -> bytes | Literal[False] | None:
        """One read without waiting: the bytes (``b""`` at the end), None if OpenSSL needs to
        read the socket first, False if it needs to write first."""
        if self._pending:
            data, self._pending = self._pending[:n], self._pending[n:]
            return data
        try:
            return self._io.recv(n)
        except SSL.Error as exc:
            return self._failed_read(exc)

    def _failed_read(self, exc: SSL.Error) -> Literal[b"", False] | None:
        """What a read that raised *exc* means (as :meth:`_read_once` returns it), or the
        error to raise."""
        if isinstance(exc, SSL.WantReadError):
            return None
        if isinstance(exc, SSL.WantWriteError):
            return False
        self._retry = True  # the end or a failure: every later read reports it at once
        if isinstance(exc, SSL.ZeroReturnError):
            return b""
        if isinstance(exc, SSL.SysCallError):
            if exc.args and exc.args[0] == -1:
                return b""  # peer closed without close_notify: treat as EOF
            raise _oserror(exc) from None
        raise TLSError("TLS error: %s" % reason(exc)) from None

    def recv_nowait(self, n: int) -> bytes | None:
        """What is ready, without waiting: ``None`` if nothing is, ``b""`` at the end (for
        :class:`~npgevent.relay.hubread.HubReader`: it runs in a hub callback)."""
        data = self._read_once(n)
        if data is False:
            raise TLSError("TLS read needs a write first")  # never waits in the hub
        return data

    def recv_into_nowait(self, buffer: Any) -> int | None:
        """Read what is ready into *buffer* without waiting (a hub callback's read): the count,
        ``None`` if nothing is, ``0`` at the end, ``-1`` if OpenSSL must write first (which
        only a greenlet can wait for)."""
        if self._pending:
            n = min(len(buffer), len(self._pending))
            buffer[:n] = self._pending[:n]
            self._pending = self._pending[n:]
            return n
        try:
            return self._io.recv_into(buffer, 0, len(buffer))
        except SSL.Error as exc:
            outcome = self._failed_read(exc)
        if outcome is None:
            return None
        return -1 if outcome is False else 0

    def send_nowait(self, data: bytes) -> int:
        """What :func:`~npgevent.net.sockopt.write_nowait` needs: the bytes written without
        waiting; 0 means none, and the same bytes must be offered again (OpenSSL may hold part
        of a record)."""
        try:
            return self._io.send(data)
        except (SSL.WantWriteError, SSL.WantReadError):
            return 0
        except SSL.SysCallError as exc:
            raise _oserror(exc) from None
        except SSL.Error as exc:
            raise TLSError("TLS error: %s" % reason(exc)) from None

    def drained(self) -> bool:
        """A read now would find nothing: nothing decrypted inside, no bytes on the socket, and
        no outcome (EOF, an error) met by an earlier read and still to be reported.  OpenSSL
        reads a record's header and then exactly its body, so no undecrypted record hides
        inside it.  Checking (~1.3 us) spares the read that fails: a syscall and a
        WantReadError raised through pyOpenSSL (~4 us)."""
        return not self._retry and not self.has_buffered() and not has_input(self._fd)

    def has_buffered(self) -> bool:
        """Decrypted bytes are waiting inside (no socket event will announce them)."""
        return bool(self._pending) or self._io.pending() > 0

    def sendall(self, data: Any, flags: int = 0) -> None:
        view = memoryview(data).cast("B")
        io, sock = self._io, self.sock
        total = len(view)
        off = 0
        while off < total:
            try:
                off += io.send(view[off : off + 65536])
            except SSL.WantWriteError:
                sock._wait(sock._write_event)
            except SSL.WantReadError:
                wait_read(sock.fileno(), timeout=sock.timeout)
            except SSL.SysCallError as exc:
                raise _oserror(exc) from None
            except SSL.Error as exc:
                raise TLSError("TLS error: %s" % reason(exc)) from None

    def shutdown(self, how: int) -> None:
        """SHUT_WR sends close_notify (reading stays open); SHUT_RDWR also shuts the socket."""
        for _ in range(8):
            try:
                self.conn.shutdown()
                break
            except SSL.WantWriteError:
                self.sock._wait(self.sock._write_event)
            except SSL.WantReadError:
                break  # close_notify is out; we do not wait for the peer's
            except SSL.Error:
                break
        if how != socket.SHUT_WR:
            self.sock.shutdown(how)

    def close(self) -> None:
        # mark the connection as shut down before it is freed: OpenSSL would otherwise flag
        # its session "not resumable" (a truncation guard of older TLS) and spoil the ticket
        # the next pool connection resumes from; nothing is sent
        try:
            self.conn.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)
        except SSL.Error:
            pass
        self.sock.close()

    def settimeout(self, value: float | None) -> None:
        self.sock.settimeout(value)

    def fileno(self) -> int:
        return int(self.sock.fileno())

    def getpeername(self) -> Any:
        return self.sock.getpeername()

    def getsockname(self) -> Any:
        return self.sock.getsockname()

    # -- pool support -------------------------------------------------------------------
    def probe(self) -> bool:
        """Non-blocking liveness check of an idle connection (False = closed by the peer).

        Processes post-handshake messages (session tickets); application data
        that arrives is kept and returned by the next ``recv``; a connection holding such
        data counts as alive even if the peer's close_notify followed it.
        """
        if self._pending:
            return True
        try:
            waiting = peek(self.sock)
        except OSError:
            return False
        if waiting is None:
            return True
        if not waiting:
            return False
        try:
            data = self._io.recv(65536)
        except SSL.WantReadError:
            return True
        except (SSL.ZeroReturnError, SSL.SysCallError):
            return False
        except SSL.Error:
            return False
        self._pending += data
        return True

    def unread(self, data: bytes) -> None:
        """Put *data* back in front of what the next read returns (the start of the next
        session on a reused pool connection, read past the last one's end)."""
        self._pending = data + self._pending

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def peer_fingerprint(self) -> str:
        cert = self.conn.get_peer_certificate(as_cryptography=True)
        return fingerprint(cert) if cert is not None else ""

    def local_fingerprint(self) -> str:
        cert = self.conn.get_certificate(as_cryptography=True)
        return fingerprint(cert) if cert is not None else ""


def _oserror(exc: SSL.SysCallError) -> OSError:
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) and exc.args[0] > 0 else 0
    return OSError(code, os.strerror(code) if code else str(exc))


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False
