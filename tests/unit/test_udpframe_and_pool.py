"""UDP framing, the adaptive pool rules and the idle pool (with real socketpairs)."""

from __future__ import annotations

import gevent
import pytest
from gevent import socket
from hypothesis import given, settings
from hypothesis import strategies as st

from npgevent.errors import LocalProtocolError
from npgevent.log import InstanceLog
from npgevent.pool.base import Adaptive
from npgevent.pool.tcp import ClientPool, IdlePool, PoolConn
from npgevent.protocol.udpframe import Deframer, frame


def test_frames_survive_any_chunking():
    datagrams = [b"", b"a", b"x" * 65535, b"\x00\x01" * 100]
    wire = b"".join(frame(d) for d in datagrams)
    for step in (1, 2, 3, 1000, len(wire)):
        for kind in (bytes, bytearray):  # a read's bytes are sliced directly; anything else is copied
            d = Deframer()
            out = []
            for i in range(0, len(wire), step):
                out += d.feed(kind(wire[i:i + step]))
            assert out == datagrams and d.pending == 0
            assert all(type(x) is bytes for x in out)
    with pytest.raises(LocalProtocolError):
        frame(b"x" * 65536)


def test_adaptive_rules():
    a = Adaptive(min_capacity=4, max_capacity=6, min_interval=0.1, max_interval=1.0)
    assert (a.capacity, a.interval) == (4, 0.1)
    assert a.need(idle=1, pending=1) == 2
    a.update(idle=4, created=4)  # all idle (>80%): slower; created 100%: grow
    assert (a.capacity, a.interval) == (5, 0.2)
    a.update(idle=5, created=5)
    a.update(idle=6, created=6)
    assert a.capacity == 6  # not above max
    a.update(idle=0, created=0)  # starved (<20% idle): faster; created nothing: shrink
    assert (a.capacity, round(a.interval, 3)) == (5, 0.3)
    for _ in range(20):
        a.update(idle=0, created=0)
    assert (a.capacity, a.interval) == (4, 0.1)  # not below min / floor
    assert Adaptive(64, 4, 0.1, 1.0).capacity == 4  # min above the server's max


def _conn(cid):
    a, b = socket.socketpair()
    return PoolConn(cid, a, a), b


def test_take_any_skips_dead_and_unclean():
    pool = IdlePool(InstanceLog("none"))
    dead, dead_peer = _conn("00000001")
    unclean, unclean_peer = _conn("00000002")
    good, good_peer = _conn("00000003")
    for c in (good, unclean, dead):  # take_any tries the newest first
        pool.add(c)
    dead_peer.close()
    unclean_peer.sendall(b"early")
    assert pool.take_any(1) is good
    assert pool.active == 0
    good.close()
    good_peer.close()
    unclean_peer.close()


def test_take_clean_leaves_connections_holding_data_and_drops_dead_ones():
    pool = IdlePool(InstanceLog("none"))
    good, good_peer = _conn("00000001")
    dead, dead_peer = _conn("00000002")
    used, used_peer = _conn("00000003")
    for c in (good, dead, used):
        pool.add(c)
    dead_peer.close()
    used_peer.sendall(b"a user's datagram")
    assert pool.take_clean(newest=True) is good
    assert list(pool.idle) == ["00000003"]  # still there for the launch signal naming it
    assert pool.take_clean(newest=False) is None
    assert pool.claim("00000003") is used
    for s in (good, used, good_peer, used_peer):
        s.close()


def test_take_by_id_waits_for_arrival_and_counts_misses():
    pool = IdlePool(InstanceLog("none"))
    conn, peer = _conn("0000abcd")
    waiter = gevent.spawn(pool.take, "0000abcd", 2)
    gevent.sleep(0.05)
    pool.add(conn)
    assert waiter.get(timeout=2) is conn
    assert pool.take("ffffffff", 0.05) is None
    assert pool.errors == 1
    conn.close()
    peer.close()


def test_take_any_waits_then_times_out_and_close_wakes_waiters():
    pool = IdlePool(InstanceLog("none"))
    assert pool.take_any(0.05) is None
    waiter = gevent.spawn(pool.take_any, 5)
    gevent.sleep(0.05)
    pool.close()
    assert waiter.get(timeout=1) is None


def test_flush_and_sweep():
    pool = IdlePool(InstanceLog("none"))
    pairs = [_conn("%08x" % i) for i in range(4)]
    for c, _ in pairs:
        pool.add(c)
    pairs[0][1].close()
    assert pool.sweep(strict=False) == 1
    assert pool.active == 3
    pool.errors = 5
    pool.flush()
    assert pool.active == 0 and pool.errors == 0
    for _, peer in pairs[1:]:
        peer.settimeout(1)
        assert peer.recv(1) == b""
        peer.close()


def test_a_greenlet_round_that_fails_starts_no_more_dials_and_a_probe_leads_the_next():
    """A TLS round's dials start one after another; once one of them failed (the server is
    likely gone), the dials of that round not yet started stay off the wire, so a restarted
    server does not find them queued before the control connection.  The next interval sends
    one dial as a probe, alone; its success brings the rest at once."""
    calls: list[int] = []  # the dials in flight when each was made
    peers: list[socket.socket] = []

    def connector() -> PoolConn:
        calls.append(pool.in_flight)
        n = len(calls)
        if n == 1:
            raise ConnectionRefusedError(111, "Connection refused")
        gevent.sleep(0.01)  # a handshake: the next dial's greenlet runs meanwhile
        conn, peer = _conn("%08x" % n)
        peers.append(peer)
        return conn

    pool = ClientPool(InstanceLog("none"), connector, Adaptive(8, 8, 0.3, 0.3))
    runner = gevent.spawn(pool.run)
    try:
        gevent.sleep(0.1)  # the first round: one dial, failed; the other seven not made
        assert calls == [8]
        assert pool.in_flight == 0 and pool.active == 0
        with gevent.Timeout(5):
            while pool.active < 8:  # the next interval: the probe, then the rest at once
                gevent.sleep(0.02)
        assert len(calls) == 9
        assert calls[1] == 1  # the probe went alone
        assert max(calls[2:]) > 1  # the rest together, without waiting for another interval
    finally:
        runner.kill()
        pool.close()
        for peer in peers:
            peer.close()


def test_probes_go_one_at_a_time_while_the_server_does_not_answer():
    """A server that accepts and never answers (a Go server before its control connection
    arrives keeps pre-handshake connections in its backlog): one dial in flight at a time."""
    calls: list[int] = []

    def connector() -> PoolConn:
        calls.append(pool.in_flight)
        if len(calls) == 1:
            raise ConnectionResetError(104, "Connection reset by peer")
        gevent.sleep(0.25)  # waits for an answer that never comes
        raise TimeoutError("TLS handshake timeout")

    pool = ClientPool(InstanceLog("none"), connector, Adaptive(8, 8, 0.05, 0.05))
    runner = gevent.spawn(pool.run)
    try:
        gevent.sleep(1.0)  # twenty intervals
    finally:
        runner.kill()
        pool.close()
    assert 3 <= len(calls) <= 6, calls  # about one a quarter second, not eight an interval
    assert max(calls[1:]) == 1, calls


def test_a_frame_batch_is_the_frames_of_its_datagrams_in_order() -> None:
    from npgevent.protocol.udpframe import FrameBatch

    batch = FrameBatch()
    assert batch.take() == b"" and batch.size == 0
    datagrams = [b"", b"a", b"bc" * 300, bytes(range(256))]
    assert not any(batch.add(d) for d in datagrams)
    assert batch.size == sum(2 + len(d) for d in datagrams)
    out = batch.take()
    assert out == b"".join(frame(d) for d in datagrams)
    assert batch.size == 0 and batch.take() == b""
    assert Deframer().feed(out) == datagrams


def test_a_frame_batch_asks_to_be_written_at_a_full_record_and_refuses_oversize() -> None:
    from npgevent.protocol.udpframe import BATCH_BYTES, MAX_DATAGRAM, FrameBatch

    batch = FrameBatch()
    full = [batch.add(b"x" * 998) for _ in range(BATCH_BYTES // 1000)]
    assert not any(full)  # 16 x 1,000 bytes: just under a record
    assert batch.add(b"y" * 998)  # this one reaches it: write now
    assert len(batch.take()) == (BATCH_BYTES // 1000 + 1) * 1000
    with pytest.raises(LocalProtocolError):
        batch.add(b"z" * (MAX_DATAGRAM + 1))
    assert batch.size == 0  # nothing half-added
    assert batch.add(b"w" * MAX_DATAGRAM)  # the largest datagram alone fills a batch


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=20000), max_size=40), st.integers(1, 7))
def test_batches_written_whenever_full_deframe_to_the_datagrams(datagrams: list[bytes], cut: int) -> None:
    """Whatever the datagrams, writing a batch whenever it says so (and what is left at the
    end) gives a stream that deframes to the same datagrams, in order, read in any pieces."""
    from npgevent.protocol.udpframe import BATCH_BYTES, FrameBatch

    batch, writes = FrameBatch(), []
    for d in datagrams:
        if batch.add(d):
            writes.append(batch.take())
    writes.append(batch.take())
    assert all(len(w) < BATCH_BYTES + 2 + 20000 for w in writes)  # bounded: a record + one
    stream = b"".join(writes)
    deframer, got = Deframer(), []
    for i in range(0, len(stream), cut * 997):
        got += deframer.feed(stream[i : i + cut * 997])
    assert got == datagrams and deframer.pending == 0
