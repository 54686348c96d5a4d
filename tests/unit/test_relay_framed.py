"""A TCP session on a reusable pool connection (npgevent.relay.framed) and the pool's side of
reuse (lend, finish), over real loopback sockets.  The peer end of the pool connection is
scripted here: it writes frames and reads what the relay writes."""

from __future__ import annotations

import socket as stdsocket
import struct

import gevent
import gevent.event
import pytest
from gevent import socket
from helpers import tcp_pair

from npgevent.log import InstanceLog
from npgevent.pool.base import Adaptive
from npgevent.pool.tcp import ClientPool, IdlePool, PoolConn
from npgevent.protocol.sessionframe import (
    ABORT,
    ABORT_FRAME,
    DATA,
    EOF,
    EOF_FRAME,
    NEED,
    FrameReader,
    data_frame,
)
from npgevent.relay import framed
from npgevent.relay.framed import relay_framed

pytestmark = pytest.mark.timeout(30)


class Peer:
    """The far end of a pool connection, speaking frames by hand."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = FrameReader(4096)

    def send(self, *frames: bytes) -> None:
        self.sock.sendall(b"".join(frames))

    def read_session(self, timeout: float = 5.0) -> tuple[bytes, int]:
        """The relay's data up to its terminal frame, and which terminal it was."""
        data = bytearray()
        with gevent.Timeout(timeout):
            while True:
                kind, chunk = self.reader.next()
                if kind == DATA:
                    data += chunk
                elif kind == NEED:
                    room = self.reader.room()
                    n = self.sock.recv_into(room, len(room))
                    assert n, "pool connection closed before the terminal frame"
                    self.reader.filled(n)
                else:
                    return bytes(data), kind


def _rst(sock: socket.socket) -> None:
    sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.fixture
def ends():
    pool_near, pool_far = tcp_pair()  # the relay's pool stream / the scripted peer
    local_near, local_far = tcp_pair()  # the user (or target) / the relay's local socket
    for s in (pool_near, pool_far, local_near, local_far):
        s.settimeout(None)
    yield Peer(pool_far), pool_near, local_near, local_far
    for s in (pool_near, pool_far, local_near, local_far):
        s.close()


def _run(pool_sock, local_far, **kw) -> gevent.Greenlet:
    acct = [0, 0]
    g = gevent.spawn(relay_framed, pool_sock, local_far, acct, 0, 1, **kw)
    g.acct = acct
    return g


def test_a_session_both_ways_then_the_connection_is_clean_with_the_next_sessions_bytes(ends):
    peer, pool_sock, user, local = ends
    g = _run(pool_sock, local)
    peer.send(data_frame(b"request"))
    assert user.recv(100) == b"request"
    user.sendall(b"response" * 1000)
    user.shutdown(socket.SHUT_WR)
    data, kind = peer.read_session()
    assert (data, kind) == (b"response" * 1000, EOF)
    peer.send(data_frame(b"tail"), EOF_FRAME, data_frame(b"next session"))
    reason, leftover = g.get(timeout=5)
    assert reason == "EOF"
    assert leftover == b"\x00\x00\x00\x0cnext session"  # the next session's frame, kept
    assert user.recv(100) == b"tail" and user.recv(100) == b""  # the peer's EOF: a half-close
    assert g.acct == [8000, 11]  # read from the local socket, written to it


def test_half_close_the_other_direction_goes_on_until_it_ends(ends):
    peer, pool_sock, user, local = ends
    g = _run(pool_sock, local)
    peer.send(data_frame(b"question"), EOF_FRAME)  # the peer is done sending
    assert user.recv(100) == b"question" and user.recv(100) == b""
    gevent.sleep(0.1)
    assert not g.ready()
    user.sendall(b"late answer")
    user.close()
    assert peer.read_session() == (b"late answer", EOF)
    assert g.get(timeout=5) == ("EOF", b"")


def test_a_local_reset_aborts_and_what_the_peer_still_sends_is_dropped(ends):
    peer, pool_sock, user, local = ends
    g = _run(pool_sock, local)
    peer.send(data_frame(b"first"))
    assert user.recv(100) == b"first"
    _rst(user)
    assert peer.read_session() == (b"", ABORT)
    peer.send(data_frame(b"x" * 50000), EOF_FRAME)  # sent before the peer saw the abort
    reason, leftover = g.get(timeout=5)
    assert leftover == b"", reason  # reusable: both terminals went
    assert "reset" in reason.lower()
    assert g.acct[1] == 5  # nothing of the dropped bytes was counted as delivered


def test_the_peers_abort_closes_the_local_socket_and_is_answered(ends):
    peer, pool_sock, user, local = ends
    g = _run(pool_sock, local)
    user.sendall(b"upload")
    peer.send(ABORT_FRAME)
    user.settimeout(5)
    assert user.recv(100) == b""  # the local side sees the end at once
    data, kind = peer.read_session()
    assert data in (b"", b"upload") and kind in (EOF, ABORT)
    reason, leftover = g.get(timeout=5)
    assert leftover == b"" and "aborted" in reason


def test_a_peer_that_never_answers_an_abort_leaves_the_connection_unusable(ends, monkeypatch):
    monkeypatch.setattr(framed, "DRAIN", 0.3)
    peer, pool_sock, user, local = ends
    g = _run(pool_sock, local)
    _rst(user)
    assert peer.read_session() == (b"", ABORT)
    reason, leftover = g.get(timeout=5)  # no terminal from the peer: DRAIN
    assert leftover is None and "no terminal frame" in reason


@pytest.mark.parametrize("garbage", [b"\x07\x00\x00\x00", b"\x00\x00\x00\x00", b"\x01\x00\x00\x09"])
def test_a_malformed_frame_leaves_the_connection_unusable(ends, garbage):
    peer, pool_sock, user, local = ends
    g = _run(pool_sock, local)
    peer.send(data_frame(b"ok"), garbage)
    reason, leftover = g.get(timeout=5)
    assert leftover is None and "frame" in reason
    assert user.recv(100) == b"ok"


def test_the_pool_connection_closing_mid_session_leaves_it_unusable(ends):
    peer, pool_sock, user, local = ends
    g = _run(pool_sock, local)
    peer.send(data_frame(b"partial"))
    assert user.recv(100) == b"partial"
    peer.sock.close()
    reason, leftover = g.get(timeout=5)
    assert leftover is None and "closed" in reason


def test_an_idle_session_ends_with_an_abort_and_stays_reusable(ends):
    peer, pool_sock, _user, local = ends
    g = _run(pool_sock, local, idle=0.3)
    assert peer.read_session() == (b"", ABORT)
    peer.send(EOF_FRAME)
    reason, leftover = g.get(timeout=5)
    assert (reason, leftover) == ("idle timeout", b"")
    assert pool_sock.gettimeout() is None  # back in the pool without the session's timeout


def test_the_peers_abort_stops_reading_a_local_sender_that_never_stops(ends):
    """The target streams forever (a download the user gave up): after the peer's ABORT the
    relay must stop reading it, send its terminal and end, not keep relaying what the
    socket still delivers after its shutdown."""
    peer, pool_sock, target, local = ends
    stop = gevent.event.Event()

    def stream_forever() -> None:
        try:
            while not stop.is_set():
                target.sendall(b"s" * 65536)
        except OSError:
            pass

    source = gevent.spawn(stream_forever)
    g = _run(pool_sock, local)
    try:
        gevent.sleep(0.1)
        peer.send(ABORT_FRAME)
        data, kind = peer.read_session(timeout=5)  # drains what was on its way
        assert kind in (EOF, ABORT) and len(data) > 0
        reason, leftover = g.get(timeout=5)
        assert leftover == b"" and "aborted" in reason
    finally:
        stop.set()
        source.kill()


def test_a_local_write_failing_after_our_eof_gives_the_connection_up(ends):
    peer, pool_sock, user, local = ends
    g = _run(pool_sock, local)
    user.sendall(b"request")
    user.shutdown(socket.SHUT_WR)
    assert peer.read_session() == (b"request", EOF)  # our EOF is out
    _rst(user)  # and now the user is gone
    gevent.sleep(0.05)
    for _ in range(40):  # the peer still streams: it can't be told to stop any more
        if g.ready():
            break
        try:
            peer.send(data_frame(b"z" * 60000))
        except OSError:
            break
    reason, leftover = g.get(timeout=5)
    assert leftover is None, reason


def test_local_writes_that_fail_abort_the_session(ends):
    peer, pool_sock, user, local = ends
    g = _run(pool_sock, local)
    _rst(user)
    gevent.sleep(0.05)
    peer.send(*[data_frame(b"y" * 60000)] * 20)  # into a reset socket
    assert peer.read_session()[1] == ABORT
    peer.send(EOF_FRAME)
    assert g.get(timeout=5)[1] == b""


def _conn(cid: str) -> tuple[PoolConn, socket.socket]:
    near, far = tcp_pair()
    near.settimeout(None)
    return PoolConn(cid, near, near), far


def test_a_lent_connection_comes_back_unless_flushed_or_over_the_limit():
    pool = IdlePool(InstanceLog("none"))
    pool.max_idle = 2
    conns = [_conn("%08x" % i) for i in range(4)]
    try:
        for conn, _ in conns:
            pool.lend(conn)
        assert pool.finish(conns[0][0], b"") and pool.finish(conns[1][0], b"", trim=True)
        assert not pool.finish(conns[2][0], b"", trim=True)  # two idle already: closed
        assert conns[2][0].sock.fileno() == -1
        assert pool.finish(conns[3][0], None) is False  # the session broke it: closed
        assert sorted(pool.idle) == ["00000000", "00000001"] and not pool.lent
        conn = pool.claim("00000000")
        pool.lend(conn)
        pool.flush()  # both ends flush: what is on a session now is closed after it
        assert not pool.finish(conn, b"") and conn.sock.fileno() == -1
    finally:
        pool.close()
        for conn, far in conns:
            conn.close()
            far.close()


def test_a_waiting_launch_gets_the_connection_as_it_comes_back():
    pool = IdlePool(InstanceLog("none"))
    conn, far = _conn("0a0b0c0d")
    try:
        pool.lend(conn)
        waiter = gevent.spawn(pool.take, "0a0b0c0d", 5)
        gevent.sleep(0.05)
        assert pool.finish(conn, b"")
        assert waiter.get(timeout=5) is conn and pool.errors == 0
    finally:
        pool.close()
        conn.close()
        far.close()


def test_the_client_refill_counts_lent_connections_up_to_half_its_capacity():
    dials: list[int] = []
    fars: list[socket.socket] = []

    def connector() -> PoolConn:
        dials.append(1)
        conn, far = _conn("%08x" % len(dials))
        fars.append(far)
        return conn

    pool = ClientPool(InstanceLog("none"), connector, Adaptive(8, 8, 0.05, 0.05))
    runner = gevent.spawn(pool.run)
    try:
        with gevent.Timeout(5):
            while pool.active < 8:
                gevent.sleep(0.01)
        start = len(dials)
        lent = []
        for _ in range(3):  # three sessions on the pool: they come back, no refill
            conn = pool.take_any(1)
            pool.lend(conn)
            lent.append(conn)
        gevent.sleep(0.3)
        assert len(dials) == start and pool.active == 5
        for _ in range(3):  # six lent: only four (half of 8) count, two are replaced
            conn = pool.take_any(1)
            pool.lend(conn)
            lent.append(conn)
        for _ in range(2):  # ...and two taken for good (single-use): replaced too
            pool.take_any(1).close()
        gevent.sleep(0.3)
        assert len(dials) - start == 4 and pool.active == 4, (len(dials) - start, pool.active)
        for conn in lent:
            pool.finish(conn, b"")
        assert pool.active == 10  # back above capacity: the receiving side trims, not this one
    finally:
        runner.kill()
        pool.close()
        for far in fars:
            far.close()
