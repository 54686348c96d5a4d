"""TCP sessions framed on reusable pool connections (extension level 2): the codec, in memory,
and the two control signals that go with it."""

from __future__ import annotations

import random

import pytest

from npgevent.protocol.handshake import reuses_pool
from npgevent.protocol.sessionframe import (
    ABORT,
    ABORT_FRAME,
    DATA,
    EOF,
    EOF_FRAME,
    HEADER,
    MAX_DATA,
    NEED,
    FrameError,
    FrameReader,
    data_frame,
    pack_data_header,
)
from npgevent.protocol.signals import Launch, Level, Unknown, parse_signal


def _events(reader: FrameReader) -> list[tuple[int, bytes | None]]:
    out: list[tuple[int, bytes | None]] = []
    while True:
        kind, data = reader.next()
        if kind == NEED:
            return out
        out.append((kind, bytes(data) if data is not None else None))
        if kind in (EOF, ABORT):
            return out


def _parse(wire: bytes, steps: list[int], size: int = 64) -> tuple[bytes, int | None, bytes]:
    """Feed *wire* in pieces of the given sizes; return the data, the terminal and the rest."""
    reader = FrameReader(size)
    data, terminal, pos, i = bytearray(), None, 0, 0
    while pos < len(wire) and terminal is None:
        room = reader.room()
        n = min(steps[i % len(steps)], len(room), len(wire) - pos)
        i += 1
        room[:n] = wire[pos:pos + n]
        reader.filled(n)
        pos += n
        for kind, chunk in _events(reader):
            if kind == DATA:
                assert chunk
                data += chunk
            else:
                terminal = kind
    return bytes(data), terminal, reader.rest() + wire[pos:]


@pytest.mark.parametrize("terminal", [EOF_FRAME, ABORT_FRAME])
def test_any_chunking_gives_the_same_data_terminal_and_rest(terminal):
    payloads = [b"a", b"hello" * 30, bytes(range(256)) * 3, b"z"]
    after = b"\x00\x00\x00\x05next!"  # the next session's first frame
    wire = b"".join(data_frame(p) for p in payloads) + terminal + after
    rng = random.Random(7)
    for steps in ([1], [2], [3], [4], [5], [1000], [rng.randint(1, 70) for _ in range(50)]):
        data, kind, rest = _parse(wire, steps)
        assert data == b"".join(payloads)
        assert kind == (EOF if terminal == EOF_FRAME else ABORT)
        assert rest == after


def test_a_data_frame_is_handed_out_as_it_arrives_not_buffered_whole():
    reader = FrameReader(16)
    big = data_frame(b"x" * 100)
    got = bytearray()
    pos = 0
    while pos < len(big):  # a 16-byte buffer carries a 104-byte frame
        room = reader.room()
        n = min(len(room), len(big) - pos)
        room[:n] = big[pos:pos + n]
        reader.filled(n)
        pos += n
        for kind, chunk in _events(reader):
            assert kind == DATA
            got += chunk
    assert got == b"x" * 100 and reader.left == 0


@pytest.mark.parametrize("header", [b"\x03\x00\x00\x00", b"\x01\x00\x00\x01", b"\x02\x00\x01\x00",
                                    b"\x00\x00\x00\x00", b"\xff\xff\xff\xff"])
def test_a_header_of_any_other_shape_is_refused(header):
    reader = FrameReader()
    reader.feed(data_frame(b"ok") + header)
    assert reader.next()[0] == DATA
    with pytest.raises(FrameError):
        reader.next()


def test_data_header_limits():
    buf = bytearray(HEADER + 5)
    pack_data_header(buf, 5)
    assert bytes(buf[:HEADER]) == b"\x00\x00\x00\x05"
    pack_data_header(buf, MAX_DATA)
    assert bytes(buf[:HEADER]) == b"\x00\xff\xff\xff"
    for bad in (0, MAX_DATA + 1):
        with pytest.raises(ValueError):
            pack_data_header(buf, bad)


def test_framed_launch_and_level_signals():
    launch = Launch(False, "127.0.0.1:5000", "0a0b0c0d", framed=True)
    assert launch.encode() == "np://127.0.0.1:5000/0a0b0c0d#3"
    assert parse_signal(launch.encode()) == launch
    assert parse_signal("np://[::1]:5/0a0b0c0d#3") == Launch(False, "[::1]:5", "0a0b0c0d", True)
    assert Launch(False, "1.2.3.4:5", "0a0b0c0d").encode().endswith("#1")  # Go's, unchanged
    assert parse_signal("np:#n2") == Level(2) and Level(2).encode() == "np:#n2"
    for text in ("np:#n", "np:#nx", "np:#n2x", "np:#n-1", "np:#n1234567890", "np://a/b#n2", "np:#n\uff12"):
        assert isinstance(parse_signal(text), Unknown), text


def test_only_tls_pools_at_level_2_reuse_their_connections():
    assert reuses_pool(2, "1", False) and reuses_pool(2, "2", False)
    assert not reuses_pool(1, "1", False)  # an older npgevent peer
    assert not reuses_pool(0, "2", False)  # a Go peer
    assert not reuses_pool(2, "0", False)  # plain TCP sessions splice raw bytes
    assert not reuses_pool(2, "1", True)  # a QUIC stream costs no handshake
