"""NodePass control-channel framing and signals (sans-IO).

A control message travels as ``base64std(xor(message, key)) + "\\n"``; ``xor``
XORs byte *i* with ``key[i % len(key)]``.  The receiver strips one trailing
``\\n``, base64-decodes (like Go, ignoring ``\\r``/``\\n`` inside) and XORs
with its own key.

After the handshake every message is a URL with scheme ``np``:

=================================  ====================================================
``np:#i`` / ``np:#o``               ping / pong
``np:#f``                           flush the idle pool on both sides
``np://<user addr>/<id>#1``         TCP launch: take pool connection *id*, dial, relay
``np://<user addr>/<id>#2``         UDP launch
``np://<peer addr>/<id>#v``         TLS verify: log the certificate fingerprint of *id*
``np://<user addr>/<id>#3``         npgevent, extension level 2: TCP launch whose session
                                    is framed, and *id* goes back to the pool after it
``np:#n<level>``                    npgevent: the client's extension level (its first
                                    line, sent only to a server that announced level 2)
=================================  ====================================================

Nothing here touches a socket: :class:`LineDecoder` takes bytes and returns
decoded signals (or the error for a bad line, which callers log and skip, as Go
does); :func:`encode_line` turns a message into bytes to send.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import LocalProtocolError, RemoteProtocolError

#: longest control line accepted; a longer one is dropped as garbage
MAX_LINE = 64 * 1024


def xor(data: bytes, key: bytes) -> bytes:
    """XOR *data* with the repeated *key* (an empty key leaves data unchanged)."""
    if not key:
        return bytes(data)
    n = len(data)
    reps = key * (n // len(key) + 1)
    return (int.from_bytes(data, "big") ^ int.from_bytes(reps[:n], "big")).to_bytes(n, "big")


def encode_line(message: bytes | str, key: bytes, crlf: bool = False) -> bytes:
    """One framed control line (``crlf=True`` ends it with ``\\r\\n``, see handshake)."""
    raw = message.encode() if isinstance(message, str) else message
    return base64.b64encode(xor(raw, key)) + (b"\r\n" if crlf else b"\n")


def decode_line(line: bytes, key: bytes) -> bytes:
    """Decode one framed line (with or without its newline) as Go does."""
    if line.endswith(b"\n"):
        line = line[:-1]
    # Go's base64 decoder skips \r and \n; anything else outside the alphabet is an error
    body = line.replace(b"\r", b"").replace(b"\n", b"")
    try:
        raw = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise RemoteProtocolError("undecodable control line (%d bytes)" % len(line)) from None
    return xor(raw, key)


# -- signals ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ping:
    def encode(self) -> str:
        return "np:#i"


@dataclass(frozen=True)
class Pong:
    def encode(self) -> str:
        return "np:#o"


@dataclass(frozen=True)
class Flush:
    def encode(self) -> str:
        return "np:#f"


@dataclass(frozen=True)
class Launch:
    """TCP (``#1``) or UDP (``#2``) launch naming pool connection *cid*; a *framed* TCP launch
    (``#3``, npgevent peers only) relays in :mod:`.sessionframe`'s frames."""

    udp: bool
    addr: str
    cid: str
    framed: bool = False

    def encode(self) -> str:
        _check_cid(self.cid)
        return "np://%s/%s#%s" % (self.addr, self.cid, "2" if self.udp else "3" if self.framed else "1")


@dataclass(frozen=True)
class Level:
    """``np:#n<level>``: an npgevent client's extension level (:mod:`.handshake`)."""

    level: int

    def encode(self) -> str:
        return "np:#n%d" % self.level


@dataclass(frozen=True)
class Verify:
    """TLS verify (``#v``): both sides log the certificate fingerprint seen on *cid*."""

    addr: str
    cid: str

    def encode(self) -> str:
        _check_cid(self.cid)
        return "np://%s/%s#v" % (self.addr, self.cid)


@dataclass(frozen=True)
class Unknown:
    """A well-formed ``np`` URL with a fragment we do not know: ignored, as in Go."""

    text: str

    def encode(self) -> str:
        return self.text


Signal = Ping | Pong | Flush | Launch | Level | Verify | Unknown


def _check_cid(cid: str) -> None:
    if not cid or "/" in cid or "#" in cid:
        raise LocalProtocolError("bad pool connection id %r" % cid)


_CONTROL_CHAR = re.compile("[\x00-\x1f\x7f]")  # one C scan per line, not a Python step per character


def parse_signal(text: str) -> Signal:
    """Parse a decoded control message; raise RemoteProtocolError if it is not an np URL."""
    if _CONTROL_CHAR.search(text):
        raise RemoteProtocolError("control message with control characters")
    if not text.startswith("np:"):
        raise RemoteProtocolError("control message is not an np: URL: %r" % text[:64])
    frag = text.rpartition("#")[2] if "#" in text else ""
    if frag == "i":
        return Ping()
    if frag == "o":
        return Pong()
    if frag == "f":
        return Flush()
    if frag in ("1", "2", "3", "v"):
        plain = _PLAIN.match(text) if text.isascii() else None
        if plain is not None:  # what urlsplit would find, without its ~10 us of rules
            addr, cid = plain.group(1), plain.group(2)
        else:
            addr, cid = _by_urlsplit(text)
        if frag == "v":
            return Verify(addr, cid)
        return Launch(frag == "2", addr, cid, frag == "3")
    level = frag[1:]
    if frag[:1] == "n" and level.isascii() and level.isdigit() and len(level) <= 9 and text == "np:#" + frag:
        return Level(int(level))
    return Unknown(text)


#: a launch or verify signal in its plain form, ``np://<addr>/<id>#<1|2|3|v>`` in ASCII with no
#: ``/?#[]`` in the address and no ``/?#`` in the id: urlsplit's netloc and path are then
#: exactly these two parts (its other rules apply to brackets, non-ASCII, queries and
#: slashes, which take the urlsplit path)
_PLAIN = re.compile(r"np://([^/?#\[\]]+)/([^/?#]+)#[123v]\Z")


def _by_urlsplit(text: str) -> tuple[str, str]:
    """The address and id of a launch or verify signal, by urlsplit's rules (Go parses the
    signal with ``url.Parse``)."""
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise RemoteProtocolError("bad signal URL %r: %s" % (text[:64], exc)) from None
    addr, cid = parts.netloc, parts.path.lstrip("/")
    if not addr or not cid:
        raise RemoteProtocolError("signal %r lacks an address or an id" % text[:64])
    return addr, cid


class LineDecoder:
    """Incremental control-line decoder: ``feed(bytes)`` -> signals and per-line errors.

    A line longer than :data:`MAX_LINE` is discarded up to its newline and
    reported as one error; decoding errors never stop the decoder.
    """

    def __init__(self, key: bytes, opener: Callable[[bytes], bytes] | None = None) -> None:
        """*opener* turns a line into its message (default: Go's XOR with *key*); an
        authenticated channel passes its :meth:`~npgevent.protocol.auth.ControlCipher.open_line`."""
        self.key = key
        self.open = opener or (lambda line: decode_line(line, key))
        self._buf = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> list[Signal | RemoteProtocolError]:
        out: list[Signal | RemoteProtocolError] = []
        self._buf += data
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > MAX_LINE:
                    if not self._discarding:
                        out.append(RemoteProtocolError("control line over %d bytes" % MAX_LINE))
                    self._discarding = True
                    del self._buf[:]
                return out
            line = bytes(self._buf[: nl + 1])
            del self._buf[: nl + 1]
            if self._discarding:
                self._discarding = False
                continue
            if len(line) > MAX_LINE:
                out.append(RemoteProtocolError("control line over %d bytes" % MAX_LINE))
                continue
            try:
                out.append(parse_signal(self.open(line).decode("utf-8", "strict")))
            except UnicodeDecodeError:
                out.append(RemoteProtocolError("control message is not UTF-8"))
            except RemoteProtocolError as exc:
                out.append(exc)
