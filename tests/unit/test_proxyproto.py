"""PROXY protocol v1 header."""

import pytest

from npgevent.errors import LocalProtocolError
from npgevent.protocol.proxyproto import parse_proxy_v1, proxy_v1


def test_tcp4():
    assert proxy_v1(("192.0.2.1", 5555), ("198.51.100.2", 80)) == b"PROXY TCP4 192.0.2.1 198.51.100.2 5555 80\r\n"


def test_tcp6_and_mixed():
    assert proxy_v1(("2001:db8::1", 1), ("2001:db8::2", 2)) == b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n"
    assert proxy_v1(("192.0.2.1", 1), ("::1", 2)) == b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n"


def test_ipv4_mapped_peer_is_tcp4():
    assert proxy_v1(("::ffff:127.0.0.1", 7), ("127.0.0.1", 8)) == b"PROXY TCP4 127.0.0.1 127.0.0.1 7 8\r\n"


def test_rejects_names():
    with pytest.raises(LocalProtocolError):
        proxy_v1(("example.org", 1), ("127.0.0.1", 2))


def test_parse_round_trip():
    line = proxy_v1(("10.0.0.1", 1234), ("10.0.0.2", 443))
    assert parse_proxy_v1(line) == ("TCP4", ("10.0.0.1", 1234), ("10.0.0.2", 443))
    with pytest.raises(ValueError):
        parse_proxy_v1(b"GET / HTTP/1.1\r\n")
