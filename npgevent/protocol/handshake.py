"""The control-connection handshake (sans-IO), and how npgevent peers find each other.

1. The client sends ``encode(key)``: the key XORed with itself, i.e. ``len(key)``
   zero bytes in base64 (``AAAAAAAA`` for an 8-byte key).
2. The server decodes the line with its own key and compares it with its key
   (Go's rule: any key of the same length passes, since the line is all zeros).
3. The server answers ``encode("np://<quic>@<max>/<flow>#<tls>")``, e.g.
   ``np://0@1024/-#0``; the client takes quic, max, flow (``-``: the server
   receives user traffic, ``+``: the client does) and the TLS code from it.

**Extensions between npgevent peers** (``docs/protocol-extensions.md``): an
npgevent client ends its key line with ``\\r\\n`` instead of ``\\n``.  Go's
base64 decoder ignores the ``\\r``, so a Go server accepts the line unchanged
and never knows.  An npgevent server that sees the ``\\r`` adds
``?npg=<level>`` to its reply URL; a Go client would ignore a query, but it
never receives one, because only npgevent clients send the ``\\r``.  Level 1
means UDP datagrams are length-framed on pool connections; level 2 adds TCP sessions framed
on TLS pool connections, which go back to the pool after the session
(:mod:`npgevent.protocol.sessionframe`).  Both ends use the lower of their levels.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from ..errors import LocalProtocolError, RemoteProtocolError
from .signals import decode_line, encode_line

#: the extension level this npgevent speaks (1: UDP length framing, 2: reused TLS pool connections)
EXTENSION_LEVEL = 2


def reuses_pool(level: int, tls: str, quic: bool) -> bool:
    """Whether TCP sessions are framed and their pool connections reused: extension level 2,
    on TLS pools only (plain TCP sessions splice raw bytes; a QUIC stream costs no handshake)."""
    return level >= 2 and tls != "0" and not quic


def client_hello(key: bytes, extensions: bool = True) -> bytes:
    """The client's first line; with ``extensions`` it ends in ``\\r\\n`` (npgevent marker)."""
    return encode_line(key, key, crlf=extensions)


@dataclass(frozen=True)
class Hello:
    """What the server learnt from the client's first line."""

    key_ok: bool
    npgevent: bool


def check_hello(line: bytes, key: bytes) -> Hello:
    """Apply Go's key check to the client's line; note whether it came from npgevent."""
    npg = line.endswith(b"\r\n")
    try:
        decoded = decode_line(line, key)
    except RemoteProtocolError:
        return Hello(False, npg)
    return Hello(decoded == key, npg)


@dataclass(frozen=True)
class Reply:
    """The server's handshake reply: ``np://<quic>@<max>/<flow>[?npg=N]#<tls>``."""

    quic: bool
    max: int
    flow: str  # "-" server receives (reverse), "+" client receives (forward)
    tls: str  # "0", "1", "2"
    npg: int = 0  # extension level agreed (0 with a Go peer)

    def encode(self) -> str:
        if self.flow not in ("-", "+") or self.tls not in ("0", "1", "2") or self.max <= 0:
            raise LocalProtocolError("bad handshake reply %r" % (self,))
        query = "?npg=%d" % self.npg if self.npg else ""
        return "np://%d@%d/%s%s#%s" % (1 if self.quic else 0, self.max, self.flow, query, self.tls)


def server_reply(reply: Reply, key: bytes) -> bytes:
    return encode_line(reply.encode(), key)


def parse_reply(text: str) -> Reply:
    """Parse the decoded reply the way the Go client does; RemoteProtocolError if unusable."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise RemoteProtocolError("parse tunnel URL failed: invalid control character in URL "
                                  "(wrong tunnel key?)")
    try:
        parts = urlsplit(text)
        user = parts.username or ""
        host = parts.hostname if parts.netloc.rpartition("@")[2] else ""
    except ValueError as exc:
        raise RemoteProtocolError("parse tunnel URL failed: %s (wrong tunnel key?)" % exc) from None
    netloc_host = parts.netloc.rpartition("@")[2]
    flow = parts.path.lstrip("/")
    if parts.scheme != "np" or not netloc_host or not flow or not parts.fragment:
        raise RemoteProtocolError("unusable tunnel reply %r (wrong tunnel key?)" % text[:64])
    if not (netloc_host.isascii() and netloc_host.isdigit() and len(netloc_host) <= 9):
        raise RemoteProtocolError("parse max pool capacity failed: %r" % netloc_host[:20])
    if flow not in ("-", "+"):
        raise RemoteProtocolError("unknown data flow %r in tunnel reply" % flow)
    if parts.fragment not in ("0", "1", "2"):
        raise RemoteProtocolError("unknown TLS code %r in tunnel reply" % parts.fragment)
    npg = 0
    values = parse_qs(parts.query).get("npg")
    if values and values[0].isascii() and values[0].isdigit() and len(values[0]) <= 9:
        npg = min(int(values[0]), EXTENSION_LEVEL)
    del host
    return Reply(quic=user == "1", max=int(netloc_host), flow=flow, tls=parts.fragment, npg=npg)


def read_reply(line: bytes, key: bytes) -> Reply:
    """Decode and parse the server's reply line with the client's key."""
    try:
        text = decode_line(line, key).decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError("parse tunnel URL failed: not UTF-8 (wrong tunnel key?)") from None
    return parse_reply(text)
