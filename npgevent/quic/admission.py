"""Who may open a QUIC connection on the tunnel's UDP port, decided before aioquic keeps state.

The tunnel's UDP port is public: anyone can send it anything, from any source
address (UDP sources can be forged).  aioquic's :class:`QuicServer` creates a
connection object of about 50 KB for every well-formed Initial and keeps it for
the idle timeout, and an exception while it parses a datagram escapes into the
event loop.  :class:`AdmittingServer` sits in front of it and, in this order:

1. drops every datagram whose source IP is not the tunnel client's (before the
   handshake, that is every datagram), without parsing it;
2. answers a first Initial with a stateless **Retry** (RFC 9000 section 8.1),
   so only a peer that receives packets at its source address gets a connection
   (quic-go follows Retry, so Go clients keep working);
3. caps the connections still handshaking, :data:`MAX_HANDSHAKING` in total and
   :data:`MAX_HANDSHAKING_PER_IP` per address; an Initial over a cap is dropped
   before aioquic sees it;
4. lets at most :data:`NEW_CONNECTION_RATE` long-header packets a second that
   would open a connection (their destination connection id is nobody's) reach the
   parser: answering one (a Retry, or a close for a bad token) costs ~100 us of
   Python, so a flood of forged Initials "from the client" would otherwise take the
   QUIC thread, and with it the tunnel's data, for as long as it lasts.  The tunnel
   opens one QUIC connection (its pool is streams), so the budget is far above
   what it needs; the excess is dropped after a look at its first bytes;
5. catches whatever aioquic raises for one datagram: counted, logged at a
   rate-limited DEBUG, never a crash of the QUIC thread.

The owner (:class:`~npgevent.quic.thread.QuicThread`) holds the admitted IP,
the counters and the handshaking table; this module only decides.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aioquic.asyncio.server import QuicServer
from aioquic.buffer import Buffer
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from ..net.sockopt import unmap
from ..relay.limit import RateLimiter

if TYPE_CHECKING:
    from .thread import QuicThread

#: connections that have not completed their handshake, in total and per source IP
MAX_HANDSHAKING = 64
MAX_HANDSHAKING_PER_IP = 16
#: long-header packets a second (and at once) that may open a connection
NEW_CONNECTION_RATE = 500
_SMALLEST_INITIAL = 1200  # RFC 9000: a client's Initial datagram is padded to at least this


def long_header_dcid(data: bytes) -> bytes | None:
    """The destination connection id of a long-header packet, or None if *data* is too short
    to hold one (RFC 9000 section 17.2: flags, 4-byte version, length, id)."""
    if len(data) < 6 or len(data) < 6 + data[5]:
        return None
    return data[6 : 6 + data[5]]


class AdmittingServer(QuicServer):
    """aioquic's server endpoint behind the admission rules of the module docstring."""

    def __init__(self, owner: QuicThread, **kw: Any) -> None:
        super().__init__(retry=True, **kw)
        self.owner = owner
        self.opening = RateLimiter(NEW_CONNECTION_RATE, burst=NEW_CONNECTION_RATE)

    def datagram_received(self, data: Any, addr: Any) -> None:
        owner = self.owner
        ip = unmap(str(addr[0]))  # as the server core wrote the admitted address
        allowed = owner.allowed_ip
        if allowed is not None and ip != allowed:
            owner.drop("foreign", "QUIC datagram from %s dropped: not the tunnel client" % ip)
            return
        try:
            first = data[0] if data else 0
            if not first & 0x80:  # a short header: route it by its connection id, parse it once
                if first & 0x40:  # the fixed bit (aioquic drops a packet without it)
                    cid_end = 1 + self._configuration.connection_id_length
                    protocol = self._protocols.get(data[1:cid_end]) if len(data) >= cid_end else None
                    if protocol is not None:
                        protocol.datagram_received(data, addr)
                return
            if long_header_dcid(data) not in self._protocols and not self.opening.try_take():
                owner.drop("flood", "QUIC datagram from %s dropped: over %d new-connection packets a "
                           "second" % (ip, NEW_CONNECTION_RATE))
                return
            if not self._may_create(data, ip):
                return
            owner.creating_ip = ip  # read by the protocol factory if aioquic creates a connection
            super().datagram_received(data, addr)
        except Exception as exc:
            owner.drop("error", "QUIC datagram from %s dropped: %s: %s" % (ip, type(exc).__name__, exc))
        finally:
            owner.creating_ip = ""

    def _may_create(self, data: bytes, ip: str) -> bool:
        """A long-header packet: False if it would create a connection over a cap."""
        try:
            cid_length = self._configuration.connection_id_length
            header = pull_quic_header(Buffer(data=data), host_cid_length=cid_length)
        except ValueError:
            self.owner.drop("malformed", "QUIC datagram from %s dropped: malformed header" % ip)
            return False
        if (header.packet_type != QuicPacketType.INITIAL or not header.token
                or len(data) < _SMALLEST_INITIAL or header.destination_cid in self._protocols):
            return True  # not a connection-creating packet (a first Initial gets a stateless Retry)
        owner = self.owner
        if owner.handshaking_total >= MAX_HANDSHAKING or owner.handshaking[ip] >= MAX_HANDSHAKING_PER_IP:
            owner.drop("busy", "QUIC connection from %s dropped: %d handshakes under way (cap %d, %d per "
                       "address)" % (ip, owner.handshaking_total, MAX_HANDSHAKING, MAX_HANDSHAKING_PER_IP))
            return False
        return True
