"""TLS record I/O without pyOpenSSL's wrapping (npgevent.net.tlsio), in memory.

Two pyOpenSSL connections over memory BIOs; each test runs with the direct OpenSSL calls and
with pyOpenSSL's public methods (the fallback), and both must give the same bytes and raise
the same exceptions: data, a read straight into a buffer at an offset, nothing to read, the
peer's close_notify, a damaged record, reads larger than the scratch buffer."""

from __future__ import annotations

import pytest
from OpenSSL import SSL

from npgevent.net import tlsio
from npgevent.net.certs import self_signed
from npgevent.net.tlsctx import client_context, server_context

pytestmark = pytest.mark.timeout(30)


def _shuttle(src: SSL.Connection, dst: SSL.Connection) -> int:
    moved = 0
    while True:
        try:
            data = src.bio_read(65536)
        except SSL.WantReadError:
            return moved
        dst.bio_write(data)
        moved += len(data)


def _flush(a: SSL.Connection, b: SSL.Connection) -> None:
    while _shuttle(a, b) + _shuttle(b, a):
        pass


@pytest.fixture(params=[True, False], ids=["direct", "pyopenssl"])
def pair(request):
    cert, key = self_signed("tlsio-test")
    server = SSL.Connection(server_context(cert, key), None)
    server.set_accept_state()
    client = SSL.Connection(client_context("1"), None)
    client.set_connect_state()
    for _ in range(10):
        for conn in (client, server):
            try:
                conn.do_handshake()
            except SSL.WantReadError:
                pass
        _flush(client, server)
    ios = tlsio.RecordIO(server), tlsio.RecordIO(client)
    if not request.param:
        for io in ios:
            io.direct = False
    elif not ios[0].direct:
        pytest.skip("this pyOpenSSL lacks the private names tlsio uses")
    # the server's session tickets: the client reads them before any data
    with pytest.raises(SSL.WantReadError):
        ios[1].recv(10)
    return server, client, ios[0], ios[1]


def test_the_installed_pyopenssl_takes_the_direct_path():
    cert, key = self_signed("tlsio-test")
    assert tlsio.RecordIO(SSL.Connection(server_context(cert, key), None)).direct


def test_bytes_written_are_read_back(pair):
    server, client, sio, cio = pair
    assert cio.send(b"ping" * 100) == 400
    assert cio.send(memoryview(bytearray(b"-tail"))[1:]) == 4
    _flush(client, server)
    assert sio.pending() == 0  # nothing decrypted yet: the records wait in the BIO
    assert sio.recv(5) == b"pingp"
    assert sio.pending() == 395  # the rest of the first record, decrypted inside
    assert sio.recv(65536) == (b"ing" + b"ping" * 98)
    assert sio.recv(65536) == b"tail"
    with pytest.raises(SSL.WantReadError):
        sio.recv(65536)


def test_recv_into_writes_at_the_offset_and_no_further(pair):
    server, client, sio, cio = pair
    cio.send(b"abcdefgh")
    _flush(client, server)
    buf = bytearray(b"." * 12)
    assert sio.recv_into(buf, 2, 5) == 5
    assert bytes(buf) == b"..abcde....."
    assert sio.recv_into(buf, 10, 100) == 2  # capped at the buffer's end
    assert bytes(buf) == b"..abcde...fg"
    assert sio.recv_into(buf, 12, 100) == 0  # no room: no read
    assert sio.recv_into(buf, 0, 12) == 1
    assert bytes(buf[:1]) == b"h"
    with pytest.raises(SSL.WantReadError):
        sio.recv_into(buf, 0, 12)


def test_the_peers_close_notify_is_zero_return(pair):
    server, client, sio, cio = pair
    cio.send(b"last")
    client.shutdown()
    _flush(client, server)
    assert sio.recv(100) == b"last"
    with pytest.raises(SSL.ZeroReturnError):
        sio.recv(100)
    with pytest.raises(SSL.ZeroReturnError):
        sio.recv_into(bytearray(10), 0, 10)


def test_a_damaged_record_raises_pyopenssls_error(pair):
    server, client, sio, cio = pair
    cio.send(b"x" * 64)
    record = bytearray(client.bio_read(65536))
    record[-1] ^= 0xFF  # the AEAD tag
    server.bio_write(bytes(record))
    with pytest.raises(SSL.Error) as info:
        sio.recv(100)
    assert not isinstance(info.value, (SSL.WantReadError, SSL.ZeroReturnError))
    with pytest.raises(SSL.Error):  # the connection stays failed
        sio.recv(100)


def test_reads_larger_than_the_scratch_buffer_and_large_writes(pair):
    server, client, sio, cio = pair
    data = bytes(range(256)) * 1024  # 256 KiB: 16 records
    sent = 0
    while sent < len(data):
        sent += cio.send(data[sent : sent + 65536])
    _flush(client, server)
    got = bytearray()
    while len(got) < len(data):
        got += sio.recv(tlsio.SCRATCH_SIZE * 2)  # pyOpenSSL's own buffer, either way
    assert bytes(got) == data


def test_nothing_written_goes_to_pyopenssl(pair):
    _server, client, _sio, cio = pair
    with pytest.raises(SSL.Error):  # SSL_write of nothing: what pyOpenSSL makes of it
        client.send(b"")
    with pytest.raises(SSL.Error):
        cio.send(b"")
