"""UDP segmentation offload for the QUIC thread: a run of datagrams per system call.

*Sending* (GSO, ``UDP_SEGMENT``, Linux 4.18+): one ``sendmsg`` carries a run of datagrams
for one address, all of one size but the last, which may be shorter; the kernel cuts the run
into those datagrams as late as it can (on loopback, not at all before the receiver).
*Receiving* (GRO, ``UDP_GRO``, Linux 5.0+): the kernel hands a run of same-size datagrams
from one sender to one ``recvmsg``, with the size in a control message, and :func:`split`
cuts it again.  On the wire each datagram is what a ``sendto`` of its own would have sent,
so a peer, Go's quic-go included, sees no difference.

aioquic hands over a burst of packets at a time (a dozen under a bulk transfer); sent and
read one per call, each packet costs a system call and a trip through the kernel's UDP and
IP layers on both ends.  Where the kernel refuses (an old kernel, a path that cannot take a run,
a segment larger than the path allows), :class:`~npgevent.quic.loop.DrainingTransport`
sends that run again one datagram at a time and stops asking for offload on that socket.

This module is sans-IO but for :func:`enable_gro`: grouping, control messages, splitting.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator, Sequence
from typing import Any

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
#: datagrams per GSO send, at most (the kernel's UDP_MAX_SEGMENTS)
MAX_SEGMENTS = 64
#: bytes per GSO send, at most (IPv4's largest UDP payload, 65,507, with room to spare)
MAX_BYTES = 65000
#: room for the largest datagram, or run of datagrams, one ``recvmsg`` can return
RECV_SIZE = 65536
#: room for the GRO control message (an int)
ANC_SIZE = socket.CMSG_SPACE(4) if hasattr(socket, "CMSG_SPACE") else 24
#: what a socket answers when segmentation offload cannot be used on it
UNSUPPORTED = frozenset(
    code for code in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP,
                      getattr(errno, "ENOTSUP", errno.EOPNOTSUPP), errno.EMSGSIZE))

_SEGMENT = struct.Struct("=H")
_GRO = struct.Struct("=i")


def runs(datagrams: Sequence[tuple[bytes, Any]]) -> Iterator[tuple[list[bytes], Any, int]]:
    """Group consecutive *datagrams* (``(data, addr)`` pairs, in sending order) into runs one
    GSO send can carry: ``(run, addr, size)``, every datagram of *run* *size* bytes long but
    the last, which may be shorter, at most :data:`MAX_SEGMENTS` and :data:`MAX_BYTES`.  The
    order of the datagrams is kept.  A run of one is sent as it is."""
    run: list[bytes] = []
    run_addr: Any = None
    size = total = 0
    for data, addr in datagrams:
        n = len(data)
        if run and (addr != run_addr or n > size or len(run[-1]) != size
                    or len(run) >= MAX_SEGMENTS or total + n > MAX_BYTES):
            yield run, run_addr, size
            run = []
        if not run:
            run_addr, size, total = addr, n, 0
        run.append(data)
        total += n
    if run:
        yield run, run_addr, size


def segment_cmsg(size: int) -> list[tuple[int, int, bytes]]:
    """The control message that makes one ``sendmsg`` a run of *size*-byte datagrams."""
    return [(SOL_UDP, UDP_SEGMENT, _SEGMENT.pack(size))]


def gro_size(ancdata: Sequence[tuple[int, int, bytes]]) -> int:
    """The segment size of a run the kernel coalesced (GRO), or 0 for a single datagram."""
    for level, kind, value in ancdata:
        if level == SOL_UDP and kind == UDP_GRO and len(value) >= _GRO.size:
            return int(_GRO.unpack_from(value)[0])
    return 0


def split(data: bytes, size: int) -> list[bytes]:
    """The datagrams of a coalesced run: *size* bytes each, the last what is left."""
    if size <= 0 or len(data) <= size:
        return [data]
    return [data[i:i + size] for i in range(0, len(data), size)]


def enable_gro(sock: Any) -> bool:
    """Ask the kernel to coalesce received runs on *sock*; False where it cannot."""
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except (OSError, AttributeError):
        return False
    return True
