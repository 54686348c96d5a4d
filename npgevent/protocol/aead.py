"""ChaCha20-Poly1305 (RFC 8439) for the authenticated control lines, taken from the OpenSSL
that Python's own ``hashlib`` has already loaded.

Why not ``cryptography`` alone: importing its AEAD maps a second, statically linked OpenSSL
and its Rust bindings, some 7 MB of RSS in every authenticated tunnel (a fifth of an idle
tls=0 tunnel end, whose goal is 32 MB). The process already holds libcrypto: ``_hashlib``
is linked against it, and ``dlsym`` on ``_hashlib``'s handle finds libcrypto's symbols.
Seven EVP functions through :mod:`ctypes` do the job, each result checked. Where they can't
be had (a Python without a shared OpenSSL, an OpenSSL without ChaCha20) the same class runs
on ``cryptography`` instead. tests/unit/test_aead.py holds both to RFC 8439's test vector
and to each other.

An object keys one cipher context per direction when it is made and frees them when it is
collected; each message then only sets its nonce.  A ctypes call costs ~2 us here, and a
seal or an open takes five: ~15 us, against ~2 us through ``cryptography``.  So once the
process has loaded ``cryptography`` anyway (a tls=1/2 or QUIC tunnel: pyOpenSSL and aioquic
need it), an object moves to ``cryptography``'s class for its next message; the two give
the same bytes, and each message carries its own nonce.
"""

from __future__ import annotations

import ctypes
import sys
import weakref
from typing import Any

KEY = 32
NONCE = 12
TAG = 16
MAX_DATA = 1 << 20  # far above any control line; keeps every length inside a C int

_GET_TAG = 0x10  # EVP_CTRL_AEAD_GET_TAG
_SET_TAG = 0x11  # EVP_CTRL_AEAD_SET_TAG


class InvalidTag(ValueError):
    """The sealed message was forged, altered, cut, or opened with the wrong key or nonce."""


class _Evp:
    """The libcrypto functions used, with their C signatures."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        vp, cp, ci = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
        ip = ctypes.POINTER(ci)

        def fn(name: str, restype: Any, *argtypes: Any) -> Any:
            f = getattr(lib, name)
            f.restype, f.argtypes = restype, list(argtypes)
            return f

        self.new = fn("EVP_CIPHER_CTX_new", vp)
        self.free = fn("EVP_CIPHER_CTX_free", None, vp)
        # EVP_CipherInit_ex(ctx, cipher, engine, key, iv, enc)
        self.init = fn("EVP_CipherInit_ex", ci, vp, vp, vp, cp, cp, ci)
        # EVP_CipherUpdate(ctx, out, &outl, in, inl); out NULL = associated data
        self.update = fn("EVP_CipherUpdate", ci, vp, vp, ip, cp, ci)
        self.final = fn("EVP_CipherFinal_ex", ci, vp, vp, ip)
        self.ctrl = fn("EVP_CIPHER_CTX_ctrl", ci, vp, ci, ci, vp)
        self.cipher = fn("EVP_chacha20_poly1305", vp)()
        if not self.cipher:
            raise OSError("this OpenSSL has no ChaCha20-Poly1305")


def _load() -> _Evp | None:
    try:
        import _hashlib

        return _Evp(ctypes.CDLL(_hashlib.__file__))
    except (ImportError, OSError, AttributeError):  # no shared OpenSSL, or too old
        return None


_EVP = _load()
_RUST = "cryptography.hazmat.bindings._rust"  # loaded by pyOpenSSL, aioquic, or the fallback


def _cryptography_loaded() -> bool:
    return _RUST in sys.modules


def _cryptography(key: bytes) -> Any:
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305 as Impl

    return Impl(key)


def _check(data: bytes, nonce: bytes, aad: bytes) -> None:
    if len(nonce) != NONCE:
        raise ValueError("nonce must be %d bytes, not %d" % (NONCE, len(nonce)))
    if len(data) > MAX_DATA or len(aad) > MAX_DATA:
        raise ValueError("message longer than %d bytes" % MAX_DATA)


class ChaCha20Poly1305:
    """``encrypt(nonce, data, aad)`` -> ciphertext + 16-byte tag; ``decrypt`` the reverse,
    raising :class:`InvalidTag` unless the tag proves the message (the API of
    ``cryptography``'s class of the same name). Not for use from two threads at once."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY:
            raise ValueError("key must be %d bytes, not %d" % (KEY, len(key)))
        self._key = bytes(key)
        self._impl: Any = None  # cryptography's object, once it is used
        if _EVP is None or _cryptography_loaded():
            self._impl = _cryptography(self._key)
            return
        # one context per direction, keyed once; each message only sets its nonce (which
        # also resets the MAC state), half the cost of keying a fresh context every time
        self._ctx: list[int] = []
        weakref.finalize(self, _free, _EVP, self._ctx)  # frees what was made, even if not both
        for enc in (0, 1):
            self._ctx.append(_keyed(_EVP, key, enc))
        self._n = ctypes.c_int(0)
        self._np = ctypes.pointer(self._n)

    def _adopt(self) -> Any:
        """cryptography's object if the process has loaded it since (else None: ctypes)."""
        if _cryptography_loaded():
            self._impl = _cryptography(self._key)
        return self._impl

    def encrypt(self, nonce: bytes, data: bytes, aad: bytes = b"") -> bytes:
        _check(data, nonce, aad)
        impl = self._impl or self._adopt()
        if impl is not None:
            return bytes(impl.encrypt(nonce, data, aad or None))
        out, addr = _buffer(len(data) + TAG)
        if not self._run(1, nonce, data, aad, addr):
            raise OSError("ChaCha20-Poly1305 failed in OpenSSL")
        return bytes(out)

    def decrypt(self, nonce: bytes, sealed: bytes, aad: bytes = b"") -> bytes:
        _check(sealed, nonce, aad)
        if len(sealed) < TAG:
            raise InvalidTag("sealed message shorter than its tag")
        impl = self._impl or self._adopt()
        if impl is not None:
            from cryptography.exceptions import InvalidTag as Bad

            try:
                return bytes(impl.decrypt(nonce, sealed, aad or None))
            except Bad:
                raise InvalidTag("authentication tag does not match") from None
        out, addr = _buffer(len(sealed))  # the body, and room for Final's nothing
        if not self._run(0, nonce, sealed, aad, addr):
            raise InvalidTag("authentication tag does not match")
        return bytes(memoryview(out)[:len(sealed) - TAG])

    def _run(self, enc: int, nonce: bytes, data: bytes, aad: bytes, out: int) -> bool:
        """One seal (enc=1: *data* -> the buffer at address *out* = ciphertext + tag) or open
        (enc=0: *data* = ciphertext + tag -> *out*); False if OpenSSL refuses (for an open: a
        bad tag)."""
        e = _EVP
        assert e is not None
        ctx = self._ctx[enc]
        body = len(data) if enc else len(data) - TAG
        n, np = self._n, self._np
        if e.init(ctx, None, None, None, nonce, enc) != 1:
            return False
        if not enc and e.ctrl(ctx, _SET_TAG, TAG, data[-TAG:]) != 1:
            return False
        if aad and e.update(ctx, None, np, aad, len(aad)) != 1:
            return False
        if body and (e.update(ctx, out, np, data, body) != 1 or n.value != body):
            return False
        # a stream cipher: Final writes nothing (the room after the body is the tag's); for an
        # open it is where the tag is checked; a seal's tag goes straight after the body
        tail = out + body
        if e.final(ctx, tail, np) != 1 or n.value != 0:
            return False
        return not enc or e.ctrl(ctx, _GET_TAG, TAG, tail) == 1


def _buffer(size: int) -> tuple[bytearray, int]:
    """A zeroed buffer of *size* bytes (at least one) and its address.  Not
    ``create_string_buffer``: that makes a ctypes array type per size, a type is a reference
    cycle, and the cache ctypes keeps of them holds only weak references, so a tunnel with
    control lines of changing lengths made a type per line, for the collector to free."""
    buf = bytearray(max(size, 1))
    return buf, ctypes.addressof(ctypes.c_char.from_buffer(buf))


def _keyed(e: _Evp, key: bytes, enc: int) -> int:
    ctx = e.new()
    if not ctx:
        raise MemoryError("EVP_CIPHER_CTX_new")
    if e.init(ctx, e.cipher, None, bytes(key), None, enc) != 1:
        e.free(ctx)
        raise OSError("ChaCha20-Poly1305 key setup failed in OpenSSL")
    return int(ctx)


def _free(e: _Evp, contexts: list[int]) -> None:
    for ctx in contexts:
        e.free(ctx)


def native() -> bool:
    """True when the AEAD runs on the process's own libcrypto (no ``cryptography`` import)."""
    return _EVP is not None
