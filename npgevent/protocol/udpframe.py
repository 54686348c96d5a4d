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


def frame(datagram: bytes) -> bytes:
    """Length-prefix one datagram."""
    if len(datagram) > MAX_DATAGRAM:
        raise LocalProtocolError("datagram of %d bytes is too large to frame" % len(datagram))
    return _LEN.pack(len(datagram)) + datagram


class Deframer:
    """Incremental decoder: ``feed(bytes)`` returns the complete datagrams."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        if not buf and type(data) is bytes:  # nothing held (the usual case): slice the read itself
            return self._feed_fresh(data)
        buf += data
        out: list[bytes] = []
        pos = 0
        while len(buf) - pos >= 2:
            (size,) = _LEN.unpack_from(buf, pos)
            if len(buf) - pos - 2 < size:
                break
            out.append(bytes(buf[pos + 2 : pos + 2 + size]))
            pos += 2 + size
        if pos:
            del buf[:pos]
        return out

    def _feed_fresh(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        pos, end = 0, len(data)
        while end - pos >= 2:
            (size,) = _LEN.unpack_from(data, pos)
            if end - pos - 2 < size:
                break
            out.append(data[pos + 2 : pos + 2 + size])
            pos += 2 + size
        if pos < end:
            self._buf += memoryview(data)[pos:]
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete datagram held."""
        return len(self._buf)
