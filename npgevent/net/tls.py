"""TLS for pool connections (and the master API) with pyOpenSSL on gevent sockets.

* Certificates, fingerprints and PEM files are in :mod:`npgevent.net.certs`.
* :class:`ServerTLS` holds the server side: code 1 (self-signed) or 2 (the
  ``crt``/``key`` PEM files, re-read every ``NP_RELOAD_INTERVAL`` when a new
  connection arrives; live connections keep the context they started with; a
  file that cannot be loaded at start falls back to code 1 with an error log).
* :func:`client_context` builds the client side: code 1 without verification,
  code 2 verifying against the system roots (``SSL_CERT_FILE`` is honoured, as
  Go does) and the URL's host name or IP.
* :class:`TLSStream` wraps a connected gevent socket in an
  ``OpenSSL.SSL.Connection`` and offers the socket methods the relay uses
  (``recv_into``, ``sendall``, ``shutdown``, ``close``, ``settimeout``).  The
  OS socket stays non-blocking; ``WantRead``/``WantWrite`` wait on the gevent
  socket's own watchers, so closing the socket wakes any waiter.
  ``shutdown(SHUT_WR)`` sends close_notify and leaves reading open (TLS 1.3
  half-close).
"""

from __future__ import annotations

import os
import time
from typing import Any, Literal

from cryptography import x509
from gevent import socket
from gevent.socket import wait_read, wait_write
from OpenSSL import SSL

from ..log import InstanceLog
from .certs import common_name, fingerprint, load_pem_pair, self_signed
from .sockopt import has_input, peek


def _base_context() -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)  # an idle pool connection keeps no record buffers
    return ctx


def server_context(cert: x509.Certificate, key: Any) -> SSL.Context:
    ctx = _base_context()
    ctx.use_certificate(cert)
    ctx.use_privatekey(key)
    ctx.check_privatekey()
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    return ctx


class ServerTLS:
    """The server's TLS certificate and context for codes 1 and 2 (see module doc)."""

    def __init__(self, code: str, crt: str, key: str, reload_interval: float, log: InstanceLog) -> None:
        self.log = log
        self.crt, self.key = crt, key
        self.cert: x509.Certificate
        self.pkey: Any
        self.context: SSL.Context
        self.reload_interval = reload_interval
        self.code = code
        self._loaded_at = 0.0
        self._mtimes: tuple[float, float] = (0.0, 0.0)
        if code == "2":
            try:
                self._load_files()
                log.info("TLS code-2: %s with TLS 1.3", common_name(self.cert) or crt)
                return
            except (OSError, ValueError, SSL.Error) as exc:
                log.error("TLS code-2: cannot load crt=%s key=%s (%s): falling back to code-1",
                          crt, key, _reason(exc))
                self.code = "1"
        self.cert, self.pkey = self_signed()
        self.context = server_context(self.cert, self.pkey)
        log.info("TLS code-1: RAM cert with TLS 1.3")

    def _load_files(self) -> None:
        cert, pkey = load_pem_pair(self.crt, self.key)
        ctx = server_context(cert, pkey)
        self.cert, self.pkey, self.context = cert, pkey, ctx
        self._loaded_at = time.monotonic()
        self._mtimes = (os.path.getmtime(self.crt), os.path.getmtime(self.key))

    def current(self) -> SSL.Context:
        """The context for a new connection (reloading code-2 files when due)."""
        if self.code == "2" and time.monotonic() - self._loaded_at >= self.reload_interval:
            self._loaded_at = time.monotonic()
            try:
                mtimes = (os.path.getmtime(self.crt), os.path.getmtime(self.key))
                if mtimes != self._mtimes:
                    old = fingerprint(self.cert)
                    self._load_files()
                    self.log.info("TLS cert reloaded: %s %s (was %s)", common_name(self.cert) or self.crt,
                                  fingerprint(self.cert), old)
            except (OSError, ValueError, SSL.Error) as exc:
                self.log.error("TLS cert reload failed (%s): keeping the current certificate", _reason(exc))
        return self.context

    def reload_now(self) -> bool:
        """Re-read the code-2 files at once (SIGHUP); on failure keep the current pair.
        True when a new certificate is in use."""
        if self.code != "2":
            return False
        old = fingerprint(self.cert)
        try:
            self._load_files()
        except (OSError, ValueError, SSL.Error) as exc:
            self.log.error("TLS cert reload failed (%s): keeping the current certificate", _reason(exc))
            return False
        if fingerprint(self.cert) == old:
            self.log.info("TLS cert reloaded: unchanged (%s)", old)
            return False
        self.log.info("TLS cert reloaded: %s %s (was %s)", common_name(self.cert) or self.crt,
                      fingerprint(self.cert), old)
        return True

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)


def client_context(code: str) -> SSL.Context:
    """Client side: code 1 trusts anything, code 2 verifies against the system roots."""
    ctx = _base_context()
    if code == "2":
        ctx.set_verify(SSL.VERIFY_PEER, lambda _c, _x, _e, _d, ok: bool(ok))
        ctx.set_default_verify_paths()
        cafile = os.environ.get("SSL_CERT_FILE")
        if cafile and os.path.exists(cafile):
            ctx.load_verify_locations(cafile)
    else:
        ctx.set_verify(SSL.VERIFY_NONE, lambda *_a: True)
    return ctx


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return "%s: %s" % (exc.strerror, exc.filename or "")
    if isinstance(exc, SSL.Error) and exc.args and exc.args[0]:
        try:
            return "; ".join(str(e[2]) for e in exc.args[0])
        except (TypeError, IndexError):
            pass
    return str(exc) or type(exc).__name__


class TLSError(OSError):
    """A TLS handshake or record failure, as one readable line."""


class TLSStream:
    """A TLS connection over a gevent socket with the socket methods the relay needs."""

    __slots__ = ("_fd", "_pending", "_retry", "conn", "sock")

    def __init__(self, sock: socket.socket, conn: SSL.Connection) -> None:
        self.sock = sock
        self.conn = conn
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
                raise TLSError("TLS handshake failed: %s" % _reason(exc)) from None
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
        """Fill *buffer* with as many decrypted records as are ready (at least one byte)."""
        want = nbytes or len(buffer)
        data = self.recv(want)
        n = len(data)
        if not n:
            return 0
        buffer[:n] = data
        conn = self.conn
        # a TLS record carries at most 16 KiB: take what is already here without blocking,
        # so the relay writes one large chunk instead of one per record
        while n < want and not self.drained():
            try:
                more = conn.recv(want - n)
            except SSL.WantReadError:
                break  # nothing more now
            except SSL.Error:
                self._retry = True  # EOF, an alert or a needed write: the next recv reports it
                break
            if not more:
                break
            buffer[n : n + len(more)] = more
            n += len(more)
        return n

    def recv(self, n: int) -> bytes:
        sock = self.sock
        if self.drained():  # the read would fail: wait for the socket first
            sock._wait(sock._read_event)
        while True:
            data = self._read_once(n)
            if data is None:
                sock._wait(sock._read_event)
            elif data is False:
                wait_write(sock.fileno(), timeout=sock.timeout)
            else:
                return data

    def _read_once(self, n: int) -> bytes | Literal[False] | None:
        """One read without waiting: the bytes (``b""`` at the end), None if OpenSSL needs to
        read the socket first, False if it needs to write first."""
        if self._pending:
            data, self._pending = self._pending[:n], self._pending[n:]
            return data
        try:
            return self.conn.recv(n)
        except SSL.WantReadError:
            return None
        except SSL.WantWriteError:
            return False
        except SSL.ZeroReturnError:
            self._retry = True  # the end: every later read reports it at once, none waits
            return b""
        except SSL.SysCallError as exc:
            self._retry = True
            if exc.args and exc.args[0] == -1:
                return b""  # peer closed without close_notify: treat as EOF
            raise _oserror(exc) from None
        except SSL.Error as exc:
            self._retry = True
            raise TLSError("TLS error: %s" % _reason(exc)) from None

    def recv_nowait(self, n: int) -> bytes | None:
        """What is ready, without waiting: ``None`` if nothing is, ``b""`` at the end (for
        :class:`~npgevent.relay.hubread.HubReader`: it runs in a hub callback)."""
        data = self._read_once(n)
        if data is False:
            raise TLSError("TLS read needs a write first")  # never waits in the hub
        return data

    def send_nowait(self, data: bytes) -> int:
        """What :func:`~npgevent.net.sockopt.write_nowait` needs: the bytes written without
        waiting; 0 means none, and the same bytes must be offered again (OpenSSL may hold part
        of a record)."""
        try:
            return int(self.conn.send(data))
        except (SSL.WantWriteError, SSL.WantReadError):
            return 0
        except SSL.SysCallError as exc:
            raise _oserror(exc) from None
        except SSL.Error as exc:
            raise TLSError("TLS error: %s" % _reason(exc)) from None

    def drained(self) -> bool:
        """A read now would find nothing: nothing decrypted inside, no bytes on the socket, and
        no outcome (EOF, an error) met by an earlier read and still to be reported.  OpenSSL
        reads a record's header and then exactly its body, so no undecrypted record hides
        inside it.  Checking (~1.3 us) spares the read that fails: a syscall and a
        WantReadError raised through pyOpenSSL (~4 us)."""
        return not self._retry and not self.has_buffered() and not has_input(self._fd)

    def has_buffered(self) -> bool:
        """Decrypted bytes are waiting inside (no socket event will announce them)."""
        return bool(self._pending) or self.conn.pending() > 0

    def sendall(self, data: Any, flags: int = 0) -> None:
        view = memoryview(data).cast("B")
        conn, sock = self.conn, self.sock
        total = len(view)
        off = 0
        while off < total:
            try:
                off += conn.send(view[off : off + 65536])
            except SSL.WantWriteError:
                sock._wait(sock._write_event)
            except SSL.WantReadError:
                wait_read(sock.fileno(), timeout=sock.timeout)
            except SSL.SysCallError as exc:
                raise _oserror(exc) from None
            except SSL.Error as exc:
                raise TLSError("TLS error: %s" % _reason(exc)) from None

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
            data = self.conn.recv(65536)
        except SSL.WantReadError:
            return True
        except (SSL.ZeroReturnError, SSL.SysCallError):
            return False
        except SSL.Error:
            return False
        self._pending += data
        return True

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
