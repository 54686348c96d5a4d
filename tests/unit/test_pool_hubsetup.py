"""Plain-TCP pool set-up in hub callbacks (npgevent.pool.hubsetup), over real loopback sockets."""

from __future__ import annotations

import contextlib
import logging
import os
import time

import gevent
import pytest
from gevent import socket
from gevent.event import AsyncResult
from helpers import LogCapture, free_port, recv_all, tcp_pair, wait_until

from npgevent.log import ROOT, InstanceLog
from npgevent.pool import hubsetup
from npgevent.pool.base import Adaptive
from npgevent.pool.tcp import ClientPool, PoolConn

pytestmark = pytest.mark.timeout(30)


class Outcome:
    """Collects the one callback a set-up makes, and where it ran."""

    def __init__(self) -> None:
        self.result: AsyncResult = AsyncResult()
        self.calls = 0
        self.in_hub: bool | None = None

    def done(self, sock: socket.socket, data: bytes) -> None:
        self._record(("done", sock, data))

    def fail(self, exc: BaseException) -> None:
        self._record(("fail", exc))

    def _record(self, value: tuple) -> None:
        self.calls += 1
        self.in_hub = gevent.getcurrent() is gevent.get_hub()
        self.result.set(value)

    def get(self, timeout: float = 5.0) -> tuple:
        return self.result.get(timeout=timeout)


@pytest.fixture
def pair():
    """A connected loopback pair: (the peer's end, the end being set up)."""
    near, far = tcp_pair()
    yield near, far
    near.close()
    far.close()


def test_dial_sends_the_proof_and_reads_the_id_in_the_hub(listener):
    proof = os.urandom(24)
    seen = AsyncResult()

    def server() -> None:
        conn, _ = listener.accept()
        got = b""
        while len(got) < 24:
            got += conn.recv(24 - len(got))
        seen.set(got)
        conn.sendall(b"\x01\x02")  # the id in two pieces: the set-up waits for the rest
        gevent.sleep(0.05)
        conn.sendall(b"\x03\x04")
        gevent.sleep(0.2)
        conn.close()

    g = gevent.spawn(server)
    out, owner = Outcome(), set()
    hubsetup.dial(socket.AF_INET, listener.getsockname(), proof, 5, 5, 15, out.done, out.fail, owner)
    assert len(owner) == 1  # in progress
    kind, sock, cid = out.get()
    assert (kind, cid) == ("done", b"\x01\x02\x03\x04")
    assert seen.get(timeout=5) == proof
    assert out.in_hub is True  # no greenlet of its own: the callbacks run in the hub
    assert owner == set()
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    sock.close()
    g.join(timeout=5)
    assert out.calls == 1


def test_dial_to_a_closed_port_fails_once():
    out = Outcome()
    hubsetup.dial(socket.AF_INET, ("127.0.0.1", free_port()), b"", 5, 5, 15, out.done, out.fail)
    kind, exc = out.get()
    assert kind == "fail" and isinstance(exc, ConnectionRefusedError)
    gevent.sleep(0.05)
    assert out.calls == 1


def test_dial_without_a_socket_to_spare_fails_and_does_not_raise(monkeypatch):
    """EMFILE under load: the refill loop that called dial() must not die of it."""
    def no_socket(*_a, **_k):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(hubsetup.lightsock, "tcp_socket", no_socket)
    out = Outcome()
    assert hubsetup.dial(socket.AF_INET, ("127.0.0.1", 9), b"", 5, 5, 15, out.done, out.fail) is None
    kind, exc = out.get(timeout=1)
    assert kind == "fail" and exc.errno == 24


def test_dial_times_out_when_no_id_comes(listener):
    accepted = []
    g = gevent.spawn(lambda: accepted.append(listener.accept()[0]))
    out = Outcome()
    started = time.monotonic()
    hubsetup.dial(socket.AF_INET, listener.getsockname(), b"", 5, 0.3, 15, out.done, out.fail)
    kind, exc = out.get()
    assert kind == "fail" and isinstance(exc, socket.timeout)
    assert 0.25 <= time.monotonic() - started < 3
    g.join(timeout=5)
    accepted[0].settimeout(5)
    assert recv_all(accepted[0]) == b""  # the set-up closed its socket
    accepted[0].close()


def test_a_short_id_then_close_fails_with_what_arrived(listener):
    def server() -> None:
        conn, _ = listener.accept()
        conn.sendall(b"\x01\x02")
        conn.close()

    g = gevent.spawn(server)
    out = Outcome()
    hubsetup.dial(socket.AF_INET, listener.getsockname(), b"", 5, 5, 15, out.done, out.fail)
    kind, exc = out.get()
    assert kind == "fail" and isinstance(exc, ConnectionResetError)
    assert "after 2 of 4 bytes" in str(exc)
    g.join(timeout=5)


def test_admit_reads_a_proof_written_in_pieces(pair):
    near, far = pair
    out = Outcome()
    hubsetup.admit(far, 24, 5, out.done, out.fail)
    proof = os.urandom(24)
    for piece in (proof[:1], proof[1:10], proof[10:]):
        near.sendall(piece)
        gevent.sleep(0.02)
    kind, sock, data = out.get()
    assert (kind, sock, data) == ("done", far, proof)
    assert out.in_hub is True


def test_admit_times_out_and_closes_a_silent_connection(pair):
    near, far = pair
    out = Outcome()
    hubsetup.admit(far, 24, 0.2, out.done, out.fail)
    near.sendall(b"x" * 10)  # less than a proof, then nothing
    kind, exc = out.get()
    assert kind == "fail" and isinstance(exc, socket.timeout)
    near.settimeout(5)
    assert recv_all(near) == b""  # closed by the set-up


def test_cancel_ends_a_set_up_and_nothing_runs_later(pair):
    near, far = pair
    out, owner = Outcome(), set()
    setup = hubsetup.admit(far, 24, 5, out.done, out.fail, owner)
    setup.cancel()
    kind, exc = out.get()
    assert kind == "fail" and isinstance(exc, hubsetup.Cancelled)
    assert owner == set()
    with contextlib.suppress(OSError):
        near.sendall(os.urandom(24))  # too late: nobody reads it, no second callback
    gevent.sleep(0.1)
    setup.cancel()  # twice is harmless
    assert out.calls == 1


def test_a_socket_closed_under_the_set_up_fails_it(pair):
    _near, far = pair
    out = Outcome()
    hubsetup.admit(far, 24, 5, out.done, out.fail)
    gevent.sleep(0)  # the watcher is active
    far.close()  # gevent's cancel_wait throws into the set-up
    kind, _exc = out.get()
    assert kind == "fail"
    assert out.calls == 1


def test_a_failing_callback_does_not_reach_the_hub(pair, monkeypatch):
    near, far = pair
    reported = []
    monkeypatch.setattr(gevent.get_hub(), "handle_error", lambda *a: reported.append(a))

    def done(_sock, _data):
        raise RuntimeError("the owner's bug")

    hubsetup.admit(far, 4, 5, done, lambda _e: None)
    near.sendall(b"abcd")
    gevent.sleep(0.1)
    assert reported and isinstance(reported[0][2], RuntimeError)
    near.sendall(b"more")  # the loop runs on
    gevent.sleep(0.05)


def id_server(listener: socket.socket, held: list[socket.socket], answered: int = 1 << 30,
              delay: float = 0.0) -> gevent.Greenlet:
    """A pool server's id half: accepts, keeps every connection in *held*, and gives the
    first *answered* their 4-byte id (each after *delay*)."""
    def serve() -> None:
        n = 0
        while True:
            conn, _ = listener.accept()
            held.append(conn)
            n += 1
            if n <= answered:
                gevent.spawn_later(delay, conn.sendall, b"%04d" % n)

    return gevent.spawn(serve)


def test_client_pool_refills_in_the_hub_and_close_cancels_dials(listener):
    """ClientPool with hub dials: ids arrive, connections are pooled; close() ends dials the
    server never answered, closing their sockets, without logging a failure."""
    answered = 3
    held: list[socket.socket] = []
    g = id_server(listener, held, answered)
    log = InstanceLog("debug")
    capture = LogCapture()
    logging.getLogger(ROOT).addHandler(capture)

    def hub_dial(on_conn, on_fail, in_progress):
        hubsetup.dial(socket.AF_INET, listener.getsockname(), b"", 5, 60, 15,
                      lambda sock, cid: on_conn(PoolConn(cid.hex(), sock, sock)), on_fail, in_progress)

    pool = ClientPool(log, lambda: None, Adaptive(5, 5, 0.1, 1.0), hub_dial=hub_dial)  # type: ignore[arg-type]
    runner = gevent.spawn(pool.run)
    try:
        deadline = time.monotonic() + 5
        while (pool.active < answered or len(pool.setups) < 2) and time.monotonic() < deadline:
            gevent.sleep(0.02)
        assert pool.active == answered and len(pool.setups) == 2 and pool.in_flight == 2
        pool.close()
        assert pool.setups == set() and pool.in_flight == 0
        for conn in held[answered:]:
            conn.settimeout(5)
            assert recv_all(conn) == b""  # the unanswered dials were closed
        gevent.sleep(0.05)
        assert capture.count("ERROR|dial failed") == 0, capture.lines
    finally:
        logging.getLogger(ROOT).removeHandler(capture)
        runner.kill()
        g.kill()
        pool.close()
        for conn in held:
            conn.close()


def test_client_pool_hub_dials_keep_to_the_concurrency_limit(listener):
    """As the greenlet pool did: at most *concurrency* dials in flight; the rest follow as
    dials finish, without waiting for the next interval."""
    accepted: list[socket.socket] = []
    g = id_server(listener, accepted, delay=0.05)  # each id after a while
    most = [0]

    def hub_dial(on_conn, on_fail, in_progress):
        hubsetup.dial(socket.AF_INET, listener.getsockname(), b"", 5, 60, 15,
                      lambda sock, cid: on_conn(PoolConn(cid.hex(), sock, sock)), on_fail, in_progress)
        most[0] = max(most[0], len(in_progress))

    # a long interval: only the finished dials can bring the rest in time
    pool = ClientPool(InstanceLog("debug"), lambda: None, Adaptive(8, 8, 30.0, 30.0),  # type: ignore[arg-type]
                      concurrency=2, hub_dial=hub_dial)
    runner = gevent.spawn(pool.run)
    try:
        deadline = time.monotonic() + 5
        while pool.active < 8 and time.monotonic() < deadline:
            gevent.sleep(0.02)
        assert pool.active == 8
        assert most[0] == 2
    finally:
        runner.kill()
        g.kill()
        pool.close()
        for conn in accepted:
            conn.close()


def test_settle_takes_an_id_already_on_the_socket_before_the_watcher_runs(listener):
    """A launch signal can name a pool connection whose id arrived in the same loop turn as the
    signal, not read yet: ``settle()`` reads it there and then, and the connection can be
    claimed without a job waiting for it."""
    pool = ClientPool(InstanceLog("debug"), lambda: None, Adaptive(1, 1, 30.0, 30.0))  # type: ignore[arg-type]
    conn = None
    try:
        pool.in_flight += 1
        hubsetup.dial(socket.AF_INET, listener.getsockname(), b"", 5, 60, 15,
                      lambda sock, cid: pool._dialled(PoolConn(cid.hex(), sock, sock)),
                      pool._dial_failed, pool.setups)
        conn, _ = listener.accept()
        wait_until(lambda: any(setup.need for setup in pool.setups), 5, 0.01, what="set-up reading its id")
        conn._sock.send(b"\x00\x00\x00\x07")  # on the socket now; the hub has not run since
        assert pool.claim("00000007") is None
        pool.settle()
        got = pool.claim("00000007")
        assert got is not None and pool.setups == set() and pool.in_flight == 0
        got.close()
    finally:
        pool.close()
        if conn is not None:
            conn.close()
