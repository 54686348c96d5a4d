"""The sans-IO control codec against Go NodePass v1.11.0 captures (tests/data/vectors)."""

from __future__ import annotations

import json
import random

import pytest
from helpers import DATA
from hypothesis import given, settings
from hypothesis import strategies as st

from npgevent.errors import RemoteProtocolError
from npgevent.protocol.handshake import (
    EXTENSION_LEVEL,
    Reply,
    check_hello,
    client_hello,
    parse_reply,
    read_reply,
    server_reply,
)
from npgevent.protocol.signals import (
    MAX_LINE,
    Flush,
    Launch,
    LineDecoder,
    Ping,
    Pong,
    Unknown,
    Verify,
    _by_urlsplit,
    decode_line,
    encode_line,
    parse_signal,
    xor,
)
from npgevent.url import fnv1a32_hex, parse_url

VECTORS = sorted(p.stem for p in (DATA / "vectors").glob("*.json"))


def vec(name):
    return json.loads((DATA / "vectors" / (name + ".json")).read_text())


def control_lines(v, direction):
    raw = v["connections"][0][direction + "_raw"].encode()
    return [line + b"\n" for line in raw.split(b"\n")[:-1]]


@pytest.mark.parametrize("name", VECTORS)
def test_every_captured_line_decodes_to_the_recorded_text(name):
    v = vec(name)
    key = v["key"].encode()
    for direction in ("c2s", "s2c"):
        got = [decode_line(line, key).decode() for line in control_lines(v, direction)]
        assert got == v["connections"][0][direction + "_decoded"]


@pytest.mark.parametrize("name", VECTORS)
def test_encoding_reproduces_go_bytes(name):
    v = vec(name)
    key = v["key"].encode()
    c2s = control_lines(v, "c2s")
    s2c = control_lines(v, "s2c")
    decoded_c2s = v["connections"][0]["c2s_decoded"]
    if not name.startswith("wrongkey"):
        # the client's first line is the key XORed with itself: all zeros
        assert client_hello(key, extensions=False) == c2s[0]
        for text, line in zip(decoded_c2s[1:], c2s[1:], strict=True):
            assert encode_line(text, key) == line
    for text, line in zip(v["connections"][0]["s2c_decoded"], s2c, strict=True):
        assert encode_line(text, v["key"].encode()) == line


@pytest.mark.parametrize("name", ["rev_tls0_key-secret", "fwd_tls0_defaultkey", "rev_tls1_key-secret"])
def test_server_reply_byte_exact(name):
    v = vec(name)
    key = v["key"].encode()
    reply = parse_reply(v["connections"][0]["s2c_decoded"][0])
    assert server_reply(reply, key) == control_lines(v, "s2c")[0]
    assert read_reply(control_lines(v, "s2c")[0], key) == reply


def test_reply_fields():
    assert parse_reply("np://0@4/-#0") == Reply(False, 4, "-", "0")
    assert parse_reply("np://1@1024/+#1") == Reply(True, 1024, "+", "1")
    assert parse_reply("np://0@1024/-?npg=1#2") == Reply(False, 1024, "-", "2", npg=1)
    assert parse_reply("np://0@1024/-?npg=9#0").npg == EXTENSION_LEVEL == 2  # capped at what we speak
    assert Reply(False, 1024, "-", "0", npg=1).encode() == "np://0@1024/-?npg=1#0"


@pytest.mark.parametrize("bad", ["np://0@4/-", "np://0@/-#0", "np://0@4/#0", "np://0@x/-#0", "http://0@4/-#0",
                                 "np://0@4/*#0", "np://0@4/-#7", "NP\x1a\x0f"])
def test_reply_errors(bad):
    with pytest.raises(RemoteProtocolError):
        parse_reply(bad)


def test_default_keys_in_vectors():
    v = vec("fwd_tls0_defaultkey")
    assert fnv1a32_hex(str(v["tunnel_port"])) == v["key"]
    assert parse_url(v["client_url"]).key == v["key"]


def test_key_check_follows_go_rule():
    key = b"secret"
    assert check_hello(b"AAAAAAAA\n", key).key_ok
    assert check_hello(b"AAAAAAAA\r\n", key) == check_hello(b"AAAAAAAA\r\n", key)
    assert check_hello(b"AAAAAAAA\r\n", key).npgevent
    assert not check_hello(b"AAAAAAAA\n", key).npgevent
    # any key of the same length passes (NodePass's flaw), another length fails
    assert check_hello(client_hello(b"SECRET"), key).key_ok
    assert not check_hello(control_lines(vec("wrongkey_difflen"), "c2s")[0], key).key_ok
    assert not check_hello(b"%%%garbage\n", key).key_ok
    assert not check_hello(b"\n", key).key_ok


def test_same_length_wrong_key_cannot_read_the_reply():
    v = vec("wrongkey_samelen")
    with pytest.raises(RemoteProtocolError, match="invalid control character"):
        read_reply(control_lines(v, "s2c")[0], b"SECRET")


def _signals_of(name, direction):
    v = vec(name)
    key = v["key"].encode()
    return [parse_signal(decode_line(line, key).decode()) for line in control_lines(v, direction)[1:]]


def test_signals_parsed():
    assert _signals_of("rev_tls0_key-secret", "s2c") == [
        Ping(), Pong(), Launch(False, "127.0.0.1:54276", "15569b6d"), Ping(), Pong()]
    assert _signals_of("rev_tls0_udp", "s2c")[2] == Launch(True, "127.0.0.1:32870", "8b56f747")
    assert _signals_of("rev_tls1_key-secret", "s2c")[5] == Verify("127.0.0.1:40056", "778c0f86")
    assert _signals_of("fwd_tls0_defaultkey", "c2s")[2] == Launch(False, "127.0.0.1:33458", "e819eddc")
    for sig in (Ping(), Pong(), Flush(), Launch(True, "[::1]:5", "0a0b0c0d"), Verify("1.2.3.4:5", "abcdef01")):
        assert parse_signal(sig.encode()) == sig
    assert isinstance(parse_signal("np://a/b#zz"), Unknown)


def test_signals_with_control_characters_are_rejected():
    # as Go's net/url: any byte below 0x20, or DEL, anywhere in the message
    for code in [*range(0x20), 0x7F]:
        for text in (chr(code) + "np:#i", "np:#" + chr(code) + "i", "np://1.2.3.4:5/ab" + chr(code) + "#1"):
            with pytest.raises(RemoteProtocolError, match="control characters"):
                parse_signal(text)
    assert parse_signal("np://1.2.3.4:5/ab~#1") == Launch(False, "1.2.3.4:5", "ab~")
    assert parse_signal("np://[::1]:5/\x80ab#1") == Launch(False, "[::1]:5", "\x80ab")


def _as_urlsplit_reads_it(text):
    """parse_signal as it was: every launch and verify signal through urlsplit."""
    frag = text.rpartition("#")[2] if "#" in text else ""
    if frag not in ("1", "2", "3", "v"):
        return parse_signal(text)
    addr, cid = _by_urlsplit(text)
    return Verify(addr, cid) if frag == "v" else Launch(frag == "2", addr, cid, frag == "3")


def _outcome(parse, text):
    try:
        return parse(text)
    except RemoteProtocolError:
        return "refused"


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet="ab1:.@ %~/?#[]\x80\xe9\uff0f\u2100", max_size=7),
       st.text(alphabet="ab1:.@ %~/?#[]\x80\xe9\uff0f\u2100", max_size=7),
       st.sampled_from(["1", "2", "3", "v", "#1", "x"]))
def test_signals_read_without_urlsplit_read_as_urlsplit_reads_them(addr, cid, frag):
    """Plain launch signals skip urlsplit (~10 us each); every signal must still come out as
    urlsplit reads it, refusals included: brackets, slashes, queries, non-ASCII (the NFKC
    check of the address), empty parts."""
    text = "np://%s/%s#%s" % (addr, cid, frag)
    assert _outcome(parse_signal, text) == _outcome(_as_urlsplit_reads_it, text)


@pytest.mark.parametrize("name", VECTORS)
def test_line_decoder_whole_bytewise_and_random_chunks(name):
    v = vec(name)
    key = v["key"].encode()
    for direction in ("c2s", "s2c"):
        raw = v["connections"][0][direction + "_raw"].encode()
        if not raw or name.startswith("wrongkey"):
            continue
        lines = raw.split(b"\n")[:-1]
        skip_first = 1  # the handshake line is not a signal
        body = b"\n".join(lines[skip_first:]) + b"\n" if len(lines) > skip_first else b""
        expected = [parse_signal(decode_line(ln + b"\n", key).decode()) for ln in lines[skip_first:]]
        whole = LineDecoder(key).feed(body)
        assert whole == expected
        d = LineDecoder(key)
        assert [s for i in range(len(body)) for s in d.feed(body[i:i + 1])] == expected
        rng = random.Random(len(body))
        d = LineDecoder(key)
        out, pos = [], 0
        while pos < len(body):
            n = rng.randint(1, 17)
            out += d.feed(body[pos:pos + n])
            pos += n
        assert out == expected


def test_decoder_survives_garbage_and_keeps_going():
    key = b"secret"
    d = LineDecoder(key)
    out = d.feed(b"!!!notbase64\n" + encode_line(b"\xff\xfe", key) + encode_line("hello", key)
                 + b"A" * (MAX_LINE + 10) + b"more\n" + encode_line("np:#i", key))
    assert [type(x).__name__ for x in out] == ["RemoteProtocolError"] * 4 + ["Ping"]
    assert "over 65536 bytes" in str(out[3])


def test_xor_repeats_key():
    assert xor(b"\x00" * 7, b"abc") == b"abcabca"
    assert xor(xor(b"payload", b"k3y"), b"k3y") == b"payload"
