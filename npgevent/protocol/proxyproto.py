"""PROXY protocol v1 header (sans-IO).

``PROXY TCP4 <src ip> <dst ip> <src port> <dst port>\\r\\n``; ``TCP6`` when either
address is IPv6 (an IPv4 address is then written IPv4-mapped, which every
PROXY v1 parser accepts).  *src* is the user's address, *dst* the target
connection's remote address, as NodePass writes it.
"""

from __future__ import annotations

import ipaddress

from ..errors import LocalProtocolError


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        ip = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        raise LocalProtocolError("PROXY header needs IP addresses, got %r" % host) from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def proxy_v1(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    """Build the PROXY v1 line for a connection from *src* to *dst*."""
    s, d = _ip(src[0]), _ip(dst[0])
    for port in (src[1], dst[1]):
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise LocalProtocolError("PROXY header needs ports from 0 to 65535, got %r" % (port,))
    if s.version == 4 and d.version == 4:
        family = "TCP4"
        s_txt, d_txt = str(s), str(d)
    else:
        family = "TCP6"
        s_txt = str(s) if s.version == 6 else "::ffff:" + str(s)
        d_txt = str(d) if d.version == 6 else "::ffff:" + str(d)
    return ("PROXY %s %s %s %d %d\r\n" % (family, s_txt, d_txt, src[1], dst[1])).encode("ascii")


def parse_proxy_v1(line: bytes) -> tuple[str, tuple[str, int], tuple[str, int]]:
    """Parse a PROXY v1 line (used by tests and diagnostics)."""
    if not line.endswith(b"\r\n") or len(line) > 107:
        raise ValueError("not a PROXY v1 line")
    parts = line[:-2].decode("ascii").split(" ")
    if len(parts) != 6 or parts[0] != "PROXY" or parts[1] not in ("TCP4", "TCP6"):
        raise ValueError("not a PROXY v1 line")
    return parts[1], (parts[2], int(parts[4])), (parts[3], int(parts[5]))
