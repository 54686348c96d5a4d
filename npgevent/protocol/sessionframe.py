"""TCP sessions framed on a reusable pool connection (sans-IO; extension level 2).

NodePass ends a session by closing its pool connection, so every session costs the client a
new one: for a TLS pool a TCP connect and a TLS handshake at both ends, the largest share of
a short session's CPU.  Between two npgevent peers at extension level 2 (negotiated, see
:mod:`npgevent.protocol.handshake`; TLS pools only, where the bytes pass through Python
anyway) a TCP session's bytes are framed instead, each direction ends with a terminal frame,
and once both ends have sent theirs and read the other's the connection goes back to both
pools under the same id.

A frame is a 4-byte header, a type byte and a 3-byte big-endian length, then the payload::

    00 LL LL LL <payload>     DATA: 1 to 16,777,215 bytes of the session
    01 00 00 00               EOF: this direction ended normally (a half-close: the other
                              direction carries on until it ends too)
    02 00 00 00               ABORT: this end's socket failed, timed out or was refused:
                              stop sending, close your socket, answer with your terminal

Every direction carries exactly one terminal frame (EOF or ABORT) as its last frame.  A
header of any other shape is a protocol error: the connection is closed, not reused.
:class:`FrameReader` parses frames in a buffer the caller reads into and hands out a data
frame's bytes as soon as they arrive (a frame is never buffered whole).
"""

from __future__ import annotations

import struct

from ..errors import RemoteProtocolError

HEADER = 4
DATA, EOF, ABORT = 0, 1, 2
NEED = -1  # the reader needs more bytes
MAX_DATA = (1 << 24) - 1
EOF_FRAME = bytes((EOF, 0, 0, 0))
ABORT_FRAME = bytes((ABORT, 0, 0, 0))
_LEN = struct.Struct("!I")


class FrameError(RemoteProtocolError):
    """The peer sent a header that is no frame of this protocol."""


def pack_data_header(buf: bytearray, n: int) -> None:
    """Write the DATA header for *n* payload bytes into ``buf[:4]`` (payload at ``buf[4:]``)."""
    if not 0 < n <= MAX_DATA:
        raise ValueError("a data frame carries 1 to %d bytes, not %d" % (MAX_DATA, n))
    _LEN.pack_into(buf, 0, n)  # type 0 in the high byte


def data_frame(payload: bytes) -> bytes:
    """One DATA frame (tests and small writes)."""
    buf = bytearray(HEADER + len(payload))
    pack_data_header(buf, len(payload))
    buf[HEADER:] = payload
    return bytes(buf)


class FrameReader:
    """Incremental frame parser over its own buffer (see module docstring).

    Read into :meth:`room`, report the count with :meth:`filled`, then call :meth:`next`
    until it returns ``(NEED, None)``.  A DATA view points into the buffer: use it before the
    next :meth:`room`.  After a terminal frame :meth:`rest` returns what followed it (on the
    dialling side: the start of the next session, which the peer may send at once).
    """

    __slots__ = ("_buf", "_view", "end", "left", "start")

    def __init__(self, size: int = 65536) -> None:
        self._buf = bytearray(max(size, HEADER))
        self._view = memoryview(self._buf)
        self.start = 0  # first byte not parsed yet
        self.end = 0  # end of the bytes read
        self.left = 0  # payload bytes of the current data frame still to come

    def room(self) -> memoryview:
        """Where the next read goes (all parsed bytes are released first)."""
        start, end = self.start, self.end
        if start == end:
            self.start = self.end = 0
        elif start:  # a partial header (the only thing ever left unparsed): to the front
            self._buf[: end - start] = self._buf[start:end]
            self.start, self.end = 0, end - start
        return self._view[self.end :]

    def filled(self, n: int) -> None:
        self.end += n

    def feed(self, data: bytes) -> None:
        """Copy *data* in (tests and the leftovers of a probe); it must fit in :meth:`room`."""
        room = self.room()
        if len(data) > len(room):
            raise ValueError("%d bytes do not fit the reader's buffer" % len(data))
        room[: len(data)] = data
        self.filled(len(data))

    def next(self) -> tuple[int, memoryview | None]:
        """The next event: ``(DATA, bytes)``, ``(EOF, None)``, ``(ABORT, None)`` or
        ``(NEED, None)``; raises :class:`FrameError` on a malformed header."""
        start, end = self.start, self.end
        if not self.left:
            if end - start < HEADER:
                return NEED, None
            buf = self._buf
            kind = buf[start]
            length = (buf[start + 1] << 16) | (buf[start + 2] << 8) | buf[start + 3]
            start = self.start = start + HEADER
            if kind != DATA:
                if kind in (EOF, ABORT) and not length:
                    return kind, None
                raise FrameError("bad session frame header %s" % bytes(buf[start - HEADER : start]).hex())
            if not length:
                raise FrameError("empty session data frame")
            self.left = length
        if start == end:
            return NEED, None
        take = min(end - start, self.left)
        self.start = start + take
        self.left -= take
        return DATA, self._view[start : start + take]

    def rest(self) -> bytes:
        """The bytes read past the last event returned."""
        return bytes(self._view[self.start : self.end])

    def reset(self) -> None:
        """Forget everything read (the reader serves the next session)."""
        self.start = self.end = self.left = 0
