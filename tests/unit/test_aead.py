"""ChaCha20-Poly1305 for the control lines (npgevent.protocol.aead): the process's own
libcrypto through ctypes, and the ``cryptography`` fallback, each against RFC 8439 and
against each other; tampering fails; an authenticated tunnel never imports ``cryptography``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305 as Reference

from npgevent.errors import RemoteProtocolError
from npgevent.protocol import aead
from npgevent.protocol.auth import ControlCipher

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]

# RFC 8439, 2.8.2
KEY = bytes(range(0x80, 0xA0))
NONCE = bytes.fromhex("070000004041424344454647")
AAD = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
PLAIN = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
         b"the future, sunscreen would be it.")
SEALED = bytes.fromhex(
    "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6"
    "3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36"
    "92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
    "3ff4def08e4b7a9de576d26586cec64b6116"
    "1ae10b594f09e26a7e902ecbd0600691")


@pytest.fixture(params=["native", "fallback"])
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "native":
        if not aead.native():
            pytest.skip("this Python's hashlib is not linked against a shared OpenSSL")
        # this test process has loaded cryptography (the reference): keep the objects on ctypes
        monkeypatch.setattr(aead, "_cryptography_loaded", lambda: False)
    else:
        monkeypatch.setattr(aead, "_EVP", None)
    return str(request.param)


def _backend(box: aead.ChaCha20Poly1305) -> str:
    return "ctypes" if box._impl is None else "cryptography"


def test_rfc8439_vector(impl: str) -> None:
    box = aead.ChaCha20Poly1305(KEY)
    assert box.encrypt(NONCE, PLAIN, AAD) == SEALED
    assert box.decrypt(NONCE, SEALED, AAD) == PLAIN
    assert _backend(box) == ("ctypes" if impl == "native" else "cryptography")


def test_moves_to_cryptography_once_the_process_has_loaded_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ctypes call costs ~2 us: a tls=1 or QUIC tunnel, which loads cryptography anyway,
    seals its control lines with cryptography's class from its next message on; lines sealed
    before and after the move open on either side, in sequence."""
    if not aead.native():
        pytest.skip("this Python's hashlib is not linked against a shared OpenSSL")
    loaded = [False]
    monkeypatch.setattr(aead, "_cryptography_loaded", lambda: loaded[0])
    a, b = ControlCipher(b"1" * 32, b"2" * 32), ControlCipher(b"2" * 32, b"1" * 32)
    first = a.seal_line(b"np://one")
    assert _backend(a._send) == _backend(b._recv) == "ctypes"
    loaded[0] = True  # pyOpenSSL is imported for the first TLS pool connection
    assert b.open_line(first) == b"np://one"
    assert _backend(b._recv) == "cryptography" and _backend(a._send) == "ctypes"
    second = a.seal_line(b"np://two")
    assert _backend(a._send) == "cryptography"
    assert b.open_line(second) == b"np://two"
    with pytest.raises(RemoteProtocolError):
        b.open_line(first)  # replayed across the move: still refused
    assert _backend(aead.ChaCha20Poly1305(KEY)) == "cryptography"  # new objects start there


def test_agrees_with_cryptography_over_many_messages_on_one_object(impl: str) -> None:
    key = os.urandom(32)
    box, ref = aead.ChaCha20Poly1305(key), Reference(key)
    for i in range(600):
        nonce, msg, aad = os.urandom(12), os.urandom(i % 300), os.urandom(i % 3)
        sealed = box.encrypt(nonce, msg, aad)
        assert sealed == ref.encrypt(nonce, msg, aad or None)
        assert box.decrypt(nonce, sealed, aad) == msg
        if i % 5 == 0:  # a failed open in between leaves nothing behind for the next one
            bad = bytearray(sealed)
            bad[i % len(bad)] ^= 0x01
            with pytest.raises(aead.InvalidTag):
                box.decrypt(nonce, bytes(bad), aad)


def test_messages_of_every_length_leave_no_garbage(impl: str) -> None:
    """No reference cycle per message: control lines of changing lengths once made a ctypes
    array type each (a cycle, freed only by the collector's passes)."""
    import gc

    box = aead.ChaCha20Poly1305(KEY)
    box.decrypt(NONCE, box.encrypt(NONCE, b"warm", AAD), AAD)
    gc.collect()
    gc.disable()
    try:
        for n in range(200):
            assert box.decrypt(NONCE, box.encrypt(NONCE, b"m" * n, AAD), AAD) == b"m" * n
        assert gc.collect() == 0
    finally:
        gc.enable()


@pytest.mark.parametrize("how", ["flip ciphertext", "flip tag", "cut", "short", "wrong nonce",
                                 "wrong aad", "wrong key", "empty"])
def test_tampering_fails(impl: str, how: str) -> None:
    box = aead.ChaCha20Poly1305(KEY)
    sealed, nonce, aad, opener = SEALED, NONCE, AAD, box
    if how == "flip ciphertext":
        sealed = bytes([sealed[0] ^ 0x80]) + sealed[1:]
    elif how == "flip tag":
        sealed = sealed[:-1] + bytes([sealed[-1] ^ 0x01])
    elif how == "cut":
        sealed = sealed[:40] + sealed[-16:]
    elif how == "short":
        sealed = sealed[-15:]
    elif how == "wrong nonce":
        nonce = bytes(12)
    elif how == "wrong aad":
        aad = b""
    elif how == "wrong key":
        opener = aead.ChaCha20Poly1305(bytes(32))
    elif how == "empty":
        sealed = b""
    with pytest.raises(aead.InvalidTag):
        opener.decrypt(nonce, sealed, aad)


def test_empty_message_and_bad_sizes(impl: str) -> None:
    box = aead.ChaCha20Poly1305(KEY)
    sealed = box.encrypt(NONCE, b"")
    assert len(sealed) == aead.TAG and sealed == Reference(KEY).encrypt(NONCE, b"", None)
    assert box.decrypt(NONCE, sealed) == b""
    with pytest.raises(ValueError, match="nonce must be 12 bytes"):
        box.encrypt(b"short", b"x")
    with pytest.raises(ValueError, match="key must be 32 bytes"):
        aead.ChaCha20Poly1305(b"k" * 16)
    with pytest.raises(ValueError, match="longer than"):
        box.encrypt(NONCE, bytes(aead.MAX_DATA + 1))


def test_control_lines_replay_and_forgery_fail(impl: str) -> None:
    a, b = ControlCipher(b"1" * 32, b"2" * 32), ControlCipher(b"2" * 32, b"1" * 32)
    first, second = a.seal_line(b"np://one"), a.seal_line(b"np://two")
    assert b.open_line(first) == b"np://one"
    with pytest.raises(RemoteProtocolError):
        b.open_line(first)  # replayed
    assert b.open_line(second) == b"np://two"
    with pytest.raises(RemoteProtocolError):
        b.open_line(b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n")  # forged


def test_authenticated_control_lines_do_not_import_cryptography() -> None:
    """cryptography's AEAD costs ~7 MB of RSS; a tls=0 tunnel must not load it."""
    if not aead.native():
        pytest.skip("this Python's hashlib is not linked against a shared OpenSSL")
    code = ("import sys; from npgevent.protocol.auth import ControlCipher; "
            "a = ControlCipher(b'1' * 32, b'2' * 32); b = ControlCipher(b'2' * 32, b'1' * 32); "
            "assert b.open_line(a.seal_line(b'hello')) == b'hello'; "
            "print(sorted(m for m in sys.modules if m.startswith('cryptography')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=30, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
