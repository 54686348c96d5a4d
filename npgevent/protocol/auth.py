"""Authentication between npgevent peers (sans-IO): handshake, session keys, control
cipher and pool proofs.  docs/security.md explains the why; this is the how.

**Handshake.** The client's first line is a marker: ``AAAA…\\r\\n`` (Go's key line, ending in
``\\r``; an auth=1 client, so that a Go server still answers) or :data:`AUTH_ONLY` (an auth=2
client: a Go server's base64 decoder rejects it, so no Go server ever answers with its
key-revealing reply).  An npgevent server with ``auth`` >= 1 then runs a mutual
challenge-response over fresh nonces from both sides::

    S -> C  "NPA1 " b64(sn) "\\n"                                  sn: 32 random bytes
    C -> S  b64(cn) " " b64(HMAC(ak, "client" | sn | cn)) "\\n"     cn: 32 random bytes
    S -> C  b64(HMAC(ak, "server" | sn | cn | reply)) " " reply "\\n"

``reply`` is everything the handshake settles: the NodePass reply URL (QUIC, pool size, flow,
TLS code, extension level) and the fingerprint of the server's TLS certificate.  The client
proves first (so the server says nothing keyed to a stranger) and the server's proof covers
both nonces and the reply, so nothing can be replayed, reflected or altered.  Nothing sent
lets anyone compute the key; a passive listener who records a handshake can still test
guesses of a weak key offline (HMAC-SHA256 per guess): use a long random key.

**Session keys** come from the key and both nonces (HKDF-SHA256, the transcript hashed into
``info``): one ChaCha20-Poly1305 key per direction for control lines, one for pool proofs.

**Control lines** (:class:`ControlCipher`): ``b64(ChaCha20-Poly1305(msg)) "\\n"`` with the
line's sequence number as the nonce, one counter per direction: a forged, replayed, reordered
or altered line fails to open.

**Pool proofs** (:class:`PoolProver`, :class:`PoolVerifier`): before a pool connection (or a
QUIC pool stream) gets its id, the client sends a fresh 8-byte counter and
``HMAC(pool key, counter)`` cut to 16 bytes; the server accepts each counter once (a sliding
window, as IPsec's anti-replay), so a proof cannot be reused on another connection.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from ..errors import RemoteProtocolError
from .aead import ChaCha20Poly1305, InvalidTag

AUTH_ONLY = b"NPA1\r\n"  # an auth=2 client's first line (a Go server refuses it: not base64)
CHALLENGE = b"NPA1 "
NONCE = 32
PROOF = 32
POOL_PROOF = 24  # 8-byte counter + 16-byte tag
MAX_AUTH_LINE = 512
_LABEL = b"npgevent-auth-v1"
WINDOW = 8192  # pool counters accepted out of order, behind the highest seen


class AuthError(RemoteProtocolError):
    """The peer failed to prove the key (or sent a malformed authentication line)."""


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def _unb64(text: bytes, size: int, what: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise AuthError("malformed %s" % what) from None
    if len(raw) != size:
        raise AuthError("malformed %s" % what)
    return raw


def _hkdf(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869), with the standard library (the AEAD is in :mod:`.aead`)."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def auth_key(key: bytes) -> bytes:
    return _hkdf(key, _LABEL, b"handshake", 32)


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"|".join(parts), hashlib.sha256).digest()


@dataclass(frozen=True)
class SessionKeys:
    c2s: bytes  # control lines client -> server
    s2c: bytes  # control lines server -> client
    pool: bytes  # pool membership proofs

    @classmethod
    def derive(cls, key: bytes, sn: bytes, cn: bytes, reply: bytes) -> SessionKeys:
        info = _LABEL + b" session " + hashlib.sha256(sn + cn + reply).digest()
        raw = _hkdf(key, sn + cn, info, 96)
        return cls(raw[:32], raw[32:64], raw[64:])


def is_marker(line: bytes) -> bool:
    """An npgevent client's first line: Go's key line ending in ``\\r\\n``, or AUTH_ONLY."""
    return line.endswith(b"\r\n")


class ServerAuth:
    """The server's side of the handshake, one instance per attempt."""

    def __init__(self, key: bytes) -> None:
        self._ak = auth_key(key)
        self._key = key
        self.sn = os.urandom(NONCE)
        self.cn = b""
        self.keys: SessionKeys | None = None

    def challenge(self) -> bytes:
        return CHALLENGE + _b64(self.sn) + b"\n"

    def check_client(self, line: bytes) -> None:
        """The client's proof line; AuthError unless it proves the key."""
        parts = line.strip().split(b" ")
        if len(parts) != 2:
            raise AuthError("malformed authentication line")
        cn = _unb64(parts[0], NONCE, "client nonce")
        proof = _unb64(parts[1], PROOF, "client proof")
        if not hmac.compare_digest(proof, _mac(self._ak, b"client", self.sn, cn)):
            raise AuthError("the client did not prove the key")
        self.cn = cn

    def finish(self, reply: str) -> bytes:
        """The last line: the server's proof over both nonces and *reply* (what was settled)."""
        assert self.cn, "check_client first"
        text = reply.encode()
        if b"\n" in text or b"\r" in text:
            raise ValueError("reply has a line break")
        self.keys = SessionKeys.derive(self._key, self.sn, self.cn, text)
        return _b64(_mac(self._ak, b"server", self.sn, self.cn, text)) + b" " + text + b"\n"


class ClientAuth:
    """The client's side of the handshake."""

    def __init__(self, key: bytes) -> None:
        self._ak = auth_key(key)
        self._key = key
        self.sn = b""
        self.cn = os.urandom(NONCE)
        self.keys: SessionKeys | None = None

    def answer(self, challenge: bytes) -> bytes:
        """The server's challenge line -> our proof line (AuthError if it is not one)."""
        if not challenge.startswith(CHALLENGE):
            raise AuthError("not an authentication challenge")
        self.sn = _unb64(challenge[len(CHALLENGE):].strip(), NONCE, "server nonce")
        return _b64(self.cn) + b" " + _b64(_mac(self._ak, b"client", self.sn, self.cn)) + b"\n"

    def check_server(self, line: bytes) -> str:
        """The server's last line -> the settled reply text; AuthError unless it proves the key."""
        proof_text, sep, text = line.strip().partition(b" ")
        if not sep or not text:
            raise AuthError("malformed authentication reply")
        proof = _unb64(proof_text, PROOF, "server proof")
        if not hmac.compare_digest(proof, _mac(self._ak, b"server", self.sn, self.cn, text)):
            raise AuthError("the server did not prove the key")
        self.keys = SessionKeys.derive(self._key, self.sn, self.cn, text)
        try:
            return text.decode("ascii")
        except UnicodeDecodeError:
            raise AuthError("authentication reply is not ASCII") from None


class ControlCipher:
    """Control lines sealed with ChaCha20-Poly1305, one sequence number per direction."""

    def __init__(self, send_key: bytes, recv_key: bytes) -> None:
        self._send = ChaCha20Poly1305(send_key)
        self._recv = ChaCha20Poly1305(recv_key)
        self._send_seq = 0
        self._recv_seq = 0

    @staticmethod
    def _nonce(seq: int) -> bytes:
        return b"\0\0\0\0" + struct.pack(">Q", seq)

    def seal_line(self, message: bytes) -> bytes:
        sealed = self._send.encrypt(self._nonce(self._send_seq), message)
        self._send_seq += 1
        return _b64(sealed) + b"\n"

    def open_line(self, line: bytes) -> bytes:
        """The message of the next line; RemoteProtocolError if it was forged, replayed,
        reordered or altered (the expected sequence number does not move then)."""
        try:
            sealed = base64.b64decode(line.strip(), validate=True)
            message = self._recv.decrypt(self._nonce(self._recv_seq), sealed)
        except (binascii.Error, ValueError, InvalidTag):
            raise RemoteProtocolError("control line failed authentication (forged, replayed or "
                                      "altered)") from None
        self._recv_seq += 1
        return message


class PoolProver:
    """The client's pool proofs: a fresh counter and its MAC for every pool connection."""

    def __init__(self, pool_key: bytes) -> None:
        self._key = pool_key
        self._next = 0

    def proof(self) -> bytes:
        self._next += 1
        counter = struct.pack(">Q", self._next)
        return counter + hmac.new(self._key, counter, hashlib.sha256).digest()[:16]


class PoolVerifier:
    """The server's check: a valid MAC over a counter not seen before (sliding window)."""

    def __init__(self, pool_key: bytes) -> None:
        self._key = pool_key
        self._highest = 0
        self._seen: set[int] = set()  # counters within WINDOW of the highest

    def check(self, blob: bytes) -> bool:
        if len(blob) != POOL_PROOF:
            return False
        counter = blob[:8]
        if not hmac.compare_digest(blob[8:], hmac.new(self._key, counter, hashlib.sha256).digest()[:16]):
            return False
        (n,) = struct.unpack(">Q", counter)
        if n <= self._highest - WINDOW or n in self._seen:
            return False  # too old to tell, or replayed
        self._seen.add(n)
        if n > self._highest:
            self._highest = n
            floor = n - WINDOW
            if len(self._seen) > 2 * WINDOW:
                self._seen = {c for c in self._seen if c > floor}
        return True
