"""Byte counters of one instance, as reported in the CHECK_POINT line.

The counters count bytes on the *target side* sockets, as NodePass does: RX is
what was read from the socket on the target address (the dialled target, or the
user connection accepted on the target address), TX what was written to it.
They live in a list so the relay's hot loop does one ``list[i] += n``.
"""

from __future__ import annotations

TCP_RX, TCP_TX, UDP_RX, UDP_TX = range(4)


class Traffic:
    __slots__ = ("bytes",)

    def __init__(self) -> None:
        self.bytes = [0, 0, 0, 0]

    @property
    def tcp_rx(self) -> int:
        return self.bytes[TCP_RX]

    @property
    def tcp_tx(self) -> int:
        return self.bytes[TCP_TX]

    @property
    def udp_rx(self) -> int:
        return self.bytes[UDP_RX]

    @property
    def udp_tx(self) -> int:
        return self.bytes[UDP_TX]
