"""TLS record reads and writes on a pyOpenSSL connection, without its per-call wrapping.

pyOpenSSL's ``Connection.send`` and ``recv`` wrap every ``SSL_write`` and ``SSL_read`` in
Python: a check of the buffer's type, a new receive buffer of the full requested size for
every read (64 KiB for a relay's read), and after every call, successful or not,
``SSL_get_error`` and three checks for errors left by handshake callbacks.  ``recv_into``
reads into such a new buffer and copies.  A 514-byte record written and read in one
process: 17.6-18.0 us through pyOpenSSL, 9.5-9.9 us with the same OpenSSL calls made
directly, 3.1-3.2 us for the same bytes on a plain socket pair (bench/README.md).

:class:`RecordIO` makes those calls directly through the cffi library pyOpenSSL itself is
built on: writes from the caller's buffer, reads into one scratch buffer per process (copied
out before anything else can run) or straight into the caller's buffer.  Only a call that
returns nothing (``<= 0``) goes back to pyOpenSSL, to its own ``_raise_ssl_error`` on the
same result at once, so every failure raises exactly what pyOpenSSL's method would:
``WantReadError``, ``WantWriteError``, ``ZeroReturnError``, ``SysCallError``, ``Error``.

The names used are pyOpenSSL's private ones (``OpenSSL._util``, ``Connection._ssl``,
``Connection._raise_ssl_error``), stable for years; where a release lacks one, a
:class:`RecordIO` calls the public methods instead (:attr:`RecordIO.direct` is False).
The scratch buffer belongs to the gevent thread (greenlets and hub callbacks, which never
switch inside a read); the QUIC thread has no TLS records of its own to read.
"""

from __future__ import annotations

from typing import Any

from .pyopenssl import SSL

#: the largest read served from the scratch buffer (a relay reads 64 KiB at most)
SCRATCH_SIZE = 1 << 16
_MAX_WRITE = (1 << 31) - 1  # SSL_write's length is an int

try:
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib

    _read, _write, _pending = _lib.SSL_read, _lib.SSL_write, _lib.SSL_pending
    _from_buffer, _buffer = _ffi.from_buffer, _ffi.buffer
    _scratch = _ffi.new("char[]", SCRATCH_SIZE)
    _AVAILABLE = True
except (ImportError, AttributeError):  # another pyOpenSSL: the public methods
    _AVAILABLE = False


class RecordIO:
    """``send``, ``recv``, ``recv_into`` and ``pending`` of one ``SSL.Connection``."""

    __slots__ = ("_conn", "_fail", "_ssl", "direct")

    def __init__(self, conn: SSL.Connection) -> None:
        self._conn = conn
        self._ssl = getattr(conn, "_ssl", None)
        self._fail = getattr(conn, "_raise_ssl_error", None)
        self.direct = _AVAILABLE and self._ssl is not None and self._fail is not None

    def send(self, data: Any) -> int:
        """Write from *data* (bytes-like, not empty): the count written, or pyOpenSSL's
        exception (a ``Want*Error`` means: offer the same bytes again)."""
        n = len(data)
        if not self.direct or not 0 < n <= _MAX_WRITE:
            return int(self._conn.send(data))
        with _from_buffer(data) as ptr:
            written = _write(self._ssl, ptr, n)
        if written > 0:
            return int(written)
        self._fail(self._ssl, written)  # type: ignore[misc]  # raises
        return 0

    def recv(self, size: int) -> bytes:
        """Up to *size* decrypted bytes (``Want*Error``, ``ZeroReturnError``... as pyOpenSSL)."""
        if not self.direct or not 0 < size <= SCRATCH_SIZE:
            return bytes(self._conn.recv(size))
        got = _read(self._ssl, _scratch, size)
        if got > 0:
            return _buffer(_scratch, got)[:]
        self._fail(self._ssl, got)  # type: ignore[misc]  # raises
        return b""

    def recv_into(self, buffer: Any, offset: int, size: int) -> int:
        """Read up to *size* bytes into writable *buffer* at *offset*, without a copy."""
        size = min(size, len(buffer) - offset)
        if size <= 0:
            return 0
        if not self.direct:
            data = self._conn.recv(size)
            buffer[offset : offset + len(data)] = data
            return len(data)
        with _from_buffer(buffer, require_writable=True) as ptr:
            got = _read(self._ssl, ptr + offset, size)
        if got > 0:
            return int(got)
        self._fail(self._ssl, got)  # type: ignore[misc]  # raises
        return 0

    def pending(self) -> int:
        """Decrypted bytes held inside OpenSSL."""
        if not self.direct:
            return int(self._conn.pending())
        return int(_pending(self._ssl))
