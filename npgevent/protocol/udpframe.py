"""UDP datagrams on a byte stream (sans-IO).

With a Go peer a datagram is written raw on its pool connection and the far end
treats every read as one datagram (so boundaries can merge, NodePass's flaw).
Between two npgevent peers (extension level 1, see
:mod:`npgevent.protocol.handshake`) each datagram is framed as a 2-byte
big-endian length followed by the payload, so boundaries survive and
datagrams up to 65,535 bytes pass intact.
"""

from __future__ import annotations

import struct

from ..errors import LocalProtocolError

MAX_DATAGRAM = 0xFFFF
_LEN = struct.Struct("!H")
BATCH_BYTES = 16384  # a batch this large is written at once: one full TLS record


def frame(datagram: bytes) -> bytes:
    """Length-prefix one datagram."""
    if len(datagram) > MAX_DATAGRAM:
        raise LocalProtocolError("datagram of %d bytes is too large to frame" % len(datagram))
    return _LEN.pack(len(datagram)) + datagram


class FrameBatch:
    """Framed datagrams gathered for one write on a pool connection: what one wake-up of a
    reader delivers goes out in one ``send`` (one TLS record up to 16 KiB) instead of one per
    datagram.  :meth:`add` says when the batch has reached :data:`BATCH_BYTES` (write it
    then: a batch holds at most that plus one datagram); :meth:`take` empties it."""

    __slots__ = ("_parts", "size")

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.size = 0  # bytes framed and not yet taken

    def add(self, datagram: bytes) -> bool:
        """Frame *datagram* into the batch; True once the batch should be written."""
        if len(datagram) > MAX_DATAGRAM:
            raise LocalProtocolError("datagram of %d bytes is too large to frame" % len(datagram))
        self._parts += (_LEN.pack(len(datagram)), datagram)
        self.size += 2 + len(datagram)
        return self.size >= BATCH_BYTES

    def take(self) -> bytes:
        """The framed bytes gathered (``b""`` if none), in order; the batch is empty after."""
        if not self._parts:
            return b""
        out = b"".join(self._parts)
        self._parts.clear()
        self.size = 0
        return out


class Deframer:
    """Incremental decoder: ``feed(bytes)`` returns the complete datagrams."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        if buf or type(data) is not bytes:
            buf += data
            src: bytes | bytearray = buf
        else:
            src = data  # nothing held (the usual case): slice the datagrams out of the read itself
        out: list[bytes] = []
        pos, end = 0, len(src)
        while end - pos >= 2:
            (size,) = _LEN.unpack_from(src, pos)
            if end - pos - 2 < size:
                break
            out.append(bytes(src[pos + 2 : pos + 2 + size]))  # a slice of bytes is not copied again
            pos += 2 + size
        if src is buf:
            if pos:
                del buf[:pos]
        elif pos < end:
            buf += memoryview(data)[pos:]
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete datagram held."""
        return len(self._buf)
