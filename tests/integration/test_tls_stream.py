"""TLSStream on loopback: the datagram path's read waits for the socket before it reads.

A UDP session through a tls>=1 tunnel reads one framed datagram at a time, and the next one is
hardly ever there yet.  An SSL read that finds nothing costs a read syscall and a WantReadError
raised through pyOpenSSL; reads wait first when nothing is decrypted inside and nothing is
on the socket (``TLSStream.drained``), and never when OpenSSL already holds decrypted bytes
(nothing more may come).  Framed sessions (npgevent.relay.framed and framedhub) over a real TLS
stream: one that starts with bytes read past the last session, and bulk both ways.
"""

from __future__ import annotations

from typing import Any

import gevent
import pytest
from gevent import socket
from helpers import read_frames, tcp_pair
from OpenSSL import SSL

from npgevent.net.certs import self_signed
from npgevent.net.tls import TLSStream
from npgevent.net.tlsctx import client_context, server_context
from npgevent.relay.hubread import HubReader

pytestmark = pytest.mark.timeout(30)


class CountingIO:
    """A stream's record reader (npgevent.net.tlsio.RecordIO) whose reads that found nothing
    are counted, and whose reads are counted in all."""

    def __init__(self, io: Any) -> None:
        self._io = io
        self.empty_reads = 0
        self.reads = 0

    def _count(self, read: Any, *args: Any) -> Any:
        self.reads += 1
        try:
            return read(*args)
        except SSL.WantReadError:
            self.empty_reads += 1
            raise

    def recv(self, n: int) -> bytes:
        return self._count(self._io.recv, n)

    def recv_into(self, buffer: Any, offset: int, n: int) -> int:
        return self._count(self._io.recv_into, buffer, offset, n)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._io, name)


@pytest.fixture
def pair():
    csock, ssock = tcp_pair()
    csock.settimeout(None)
    cert, key = self_signed("tls-stream-test")
    server = TLSStream.server(ssock, server_context(cert, key))
    client = TLSStream.client(csock, client_context("1"))
    handshakes = [gevent.spawn(server.handshake, 5), gevent.spawn(client.handshake, 5)]
    gevent.joinall(handshakes, raise_error=True, timeout=10)
    server.sendall(b"hello")  # behind the server's session tickets: reading it consumes them
    assert client.recv(16) == b"hello"
    counting = CountingIO(client._io)
    client._io = counting  # type: ignore[assignment]
    yield server, client, counting
    for stream in (server, client):
        stream.close()


def _later(stream: TLSStream, data: bytes) -> gevent.Greenlet:
    def send() -> None:
        gevent.sleep(0.05)
        stream.sendall(data)

    return gevent.spawn(send)


def test_datagram_read_waits_first_instead_of_failing_a_read(pair):
    server, client, counting = pair
    for i in range(5):
        sender = _later(server, b"datagram %d" % i)
        assert client.recv(4096) == b"datagram %d" % i
        sender.join()
    assert counting.empty_reads == 0


def test_recv_and_recv_into_wait_first_instead_of_failing_a_read(pair):
    server, client, counting = pair
    for i in range(3):
        sender = _later(server, b"datagram %d" % i)
        assert client.recv(4096) == b"datagram %d" % i
        sender.join()
    assert counting.empty_reads == 0

    # recv_into gathers the records already here into one chunk, and stops at the last one
    # without the read that would find nothing
    for i in range(4):
        server.sendall(b"record %d;" % i)
    gevent.sleep(0.05)
    buf = bytearray(4096)
    n = client.recv_into(buf)
    assert bytes(buf[:n]) == b"record 0;record 1;record 2;record 3;"
    assert counting.empty_reads == 0
    assert counting.reads > 3  # the reads went through the counted reader


def test_bulk_records_are_gathered_without_asking_the_socket_after_each_full_one(pair, monkeypatch):
    """After a full record (16 KiB of plaintext) more usually follows: recv_into reads on
    instead of asking the socket (FIONREAD, a syscall) whether anything is there.  Four full
    records and a short one: one read, at most two questions (before the first record, after
    the short one)."""
    from npgevent.net import tls

    server, client, counting = pair
    asked: list[int] = []

    def has_input(fd: int) -> bool:
        asked.append(fd)
        return real(fd)

    real = tls.has_input
    monkeypatch.setattr(tls, "has_input", has_input)
    payload = bytes(range(256)) * (4 * 64) + b"tail"  # 4 x 16 KiB + 4 bytes
    server.sendall(payload)
    gevent.sleep(0.05)
    buf = bytearray(1 << 17)
    n = client.recv_into(buf)
    assert bytes(buf[:n]) == payload
    assert len(asked) <= 2
    assert counting.empty_reads == 0


def test_a_burst_that_ends_on_a_full_record_is_returned_at_once(pair):
    """Exactly two full records and nothing after them: the read that finds nothing ends the
    gathering (WantRead after bytes were read), it does not wait, and the next data comes
    through."""
    server, client, counting = pair
    payload = b"r" * (2 * 16384)
    server.sendall(payload)
    gevent.sleep(0.05)
    buf = bytearray(1 << 17)
    with gevent.Timeout(2):
        n = client.recv_into(buf)
    assert n == len(payload) and bytes(buf[:n]) == payload
    assert counting.empty_reads <= 1
    sender = _later(server, b"next")
    with gevent.Timeout(2):
        n = client.recv_into(buf)
    sender.join()
    assert bytes(buf[:n]) == b"next"


def test_close_notify_met_while_gathering_records_is_the_next_reads_eof(pair):
    """The peer's data and its close_notify arrive together, and the peer keeps the TCP
    connection open (a half-close through a tunnel): recv_into meets the close_notify while
    gathering records after the data; the next read must report the end, not wait on a socket
    that will stay silent."""
    server, client, _counting = pair
    server.sendall(b"last words")
    server.shutdown(socket.SHUT_WR)  # close_notify only: no FIN
    gevent.sleep(0.05)
    buf = bytearray(4096)
    assert bytes(buf[: client.recv_into(buf)]) == b"last words"
    with gevent.Timeout(2):
        assert client.recv_into(buf) == 0
        assert client.recv(100) == b""


def test_hub_reader_of_a_tls_stream_makes_no_failing_read(pair):
    server, client, counting = pair
    got: list[bytes] = []
    serving = gevent.spawn(HubReader(client, got.append, 65536).serve)
    try:
        for i in range(5):
            server.sendall(b"datagram %d" % i)
            gevent.sleep(0.02)
        server.shutdown(socket.SHUT_RDWR)
        serving.join(timeout=5)
    finally:
        serving.kill()
    assert serving.successful()
    assert got == [b"datagram %d" % i for i in range(5)]
    assert counting.empty_reads == 0


def test_bytes_openssl_already_holds_are_returned_without_waiting(pair):
    server, client, _counting = pair
    server.sendall(b"first record, read in two pieces")
    assert client.recv(5) == b"first"
    # the rest of the record is decrypted inside OpenSSL, not on the socket: waiting on the
    # socket here would block until the timeout
    with gevent.Timeout(2):
        assert client.recv(4096) == b" record, read in two pieces"


def test_a_plain_socket_reads_as_before():
    a, b = socket.socketpair()
    try:
        _later_plain = gevent.spawn_later(0.05, b.sendall, b"plain")
        assert a.recv(100) == b"plain"
        _later_plain.join()
    finally:
        a.close()
        b.close()


def test_hub_reader_takes_up_what_openssl_already_decrypted(pair):
    """A callback reads at most READS_PER_WAKEUP chunks; the rest of a record sits decrypted
    inside OpenSSL, where no socket event announces it: a follow-up callback must take it."""
    server, client, _counting = pair
    got = bytearray()
    record = bytes(range(200))
    reader = HubReader(client, got.extend, 4)  # 16 reads of 4 bytes per wake-up: 64 of 200
    serving = gevent.spawn(reader.serve)
    server.sendall(record)
    with gevent.Timeout(5):
        while len(got) < len(record):
            gevent.sleep(0.01)
    assert bytes(got) == record
    server.shutdown(socket.SHUT_RDWR)  # close_notify: the reader ends cleanly
    serving.join(timeout=5)
    assert serving.successful()


def _read_frames(stream: TLSStream) -> tuple[bytes, int]:
    from npgevent.protocol.sessionframe import FrameReader

    return read_frames(stream, FrameReader(1 << 16))


def _local_pair() -> tuple[socket.socket, socket.socket]:
    near, far = tcp_pair()
    near.settimeout(10)
    return near, far


def test_a_framed_session_starts_with_what_was_read_past_the_last_one(pair):
    """A reused connection hands the next session the bytes read past the last one's end
    (``unread``): the relay starts with them, in hub callbacks, with nothing more on the
    socket."""
    from npgevent.protocol.sessionframe import EOF, EOF_FRAME, data_frame
    from npgevent.relay.framed import relay_framed

    server, client, _counting = pair
    user, local = _local_pair()
    try:
        client.unread(data_frame(b"early bytes") + EOF_FRAME)
        acct = [0, 0]
        g = gevent.spawn(relay_framed, client, local, acct, 0, 1)
        assert user.recv(100) == b"early bytes" and user.recv(100) == b""
        user.sendall(b"reply")
        user.shutdown(socket.SHUT_WR)
        assert _read_frames(server) == (b"reply", EOF)
        assert g.get(timeout=10) == ("EOF", b"")
        assert acct == [5, 11]
    finally:
        user.close()
        local.close()


def _send_frames(stream: TLSStream, data: bytes) -> None:
    from npgevent.protocol.sessionframe import EOF_FRAME, data_frame

    for pos in range(0, len(data), 60000):
        stream.sendall(data_frame(data[pos:pos + 60000]))
    stream.sendall(EOF_FRAME)


def _talk(user: socket.socket, data: bytes) -> bytes:
    user.sendall(data)
    user.shutdown(socket.SHUT_WR)
    got = bytearray()
    while chunk := user.recv(1 << 16):
        got += chunk
    return bytes(got)


def test_framed_sessions_over_tls_both_ways_byte_exact(pair):
    """Bulk both ways at once over a real TLS stream: the relay starts in the hub and hands
    over to the pumps (short writes, full chunks); every byte arrives once, in order."""
    from npgevent.protocol.sessionframe import EOF
    from npgevent.relay.framed import relay_framed

    server, client, _counting = pair
    for round_ in range(3):
        user, local = _local_pair()
        try:
            down = bytes((i * 7 + round_) & 0xFF for i in range(3 << 20))
            up = bytes((i * 13 + round_) & 0xFF for i in range(2 << 20))
            g = gevent.spawn(relay_framed, client, local, [0, 0], 0, 1)

            sender = gevent.spawn(_send_frames, server, down)
            talker = gevent.spawn(_talk, user, up)
            assert _read_frames(server) == (up, EOF)
            assert talker.get(timeout=20) == down
            sender.get(timeout=10)
            assert g.get(timeout=10) == ("EOF", b"")
        finally:
            user.close()
            local.close()
