"""A UDP session ends NP_UDP_READ_TIMEOUT after its last datagram, not up to twice that."""

from __future__ import annotations

import contextlib
import time

import gevent
import pytest
from gevent import socket
from helpers import (
    EchoPair,
    _BigDatagramServer,
    free_port,
    in_process,
    track_instances,
    tunnel_urls,
    udp_socket,
    wait_pool,
)

pytestmark = pytest.mark.timeout(60)
IDLE = 2.0


class AnswersOnce:
    """A UDP and TCP target that echoes only the datagram ``first``: later datagrams move the
    session's idle clock without an answer that would restart a read timer."""

    def __init__(self) -> None:
        self.pair = EchoPair()  # the TCP half keeps tunnel set-up checks happy
        self.pair.udp.close()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", self.pair.port))
        self.server = _BigDatagramServer(sock, self._handle)
        self.server.start()
        self.port = self.pair.port

    def _handle(self, data, addr):
        if data == b"first":
            self.server.sendto(data, addr)

    def close(self):
        self.server.close()
        self.pair.tcp.close()


def session_end_after_last(port: int, slots) -> float:
    """Send at 0 s and 0.95 s (the second moves the idle clock mid-period, unanswered); return
    how long after the second datagram the session's slot was released."""
    sock = udp_socket(timeout=5)
    try:
        sock.sendto(b"first", ("127.0.0.1", port))
        assert sock.recv(100) == b"first"
        gevent.sleep(0.95)
        sock.sendto(b"second", ("127.0.0.1", port))
        last = time.monotonic()
        while slots.udp and time.monotonic() - last < 3 * IDLE:
            gevent.sleep(0.02)
        assert slots.udp == 0, "session still open"
        return time.monotonic() - last
    finally:
        sock.close()


def test_single_end_session_expires_one_period_after_the_last_datagram():
    echo = AnswersOnce()
    port = free_port()
    try:
        with in_process("client://127.0.0.1:%d/127.0.0.1:%d" % (port, echo.port), udp_read_timeout="2s") as r:
            took = session_end_after_last(port, r.inst.slots)
            assert IDLE - 0.1 <= took <= IDLE + 0.5, took
    finally:
        echo.close()


def test_tunnel_dialling_side_expires_one_period_after_the_last_datagram():
    echo = AnswersOnce()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", "0", tport, uport, echo.port)
    try:
        with in_process(server_url, udp_read_timeout="2s") as s, \
                in_process(client_url, udp_read_timeout="2s") as c:
            wait_pool(lambda: s.core.pool.active, 2)
            took = session_end_after_last(uport, c.inst.slots)  # the client dials the target
            assert IDLE - 0.1 <= took <= IDLE + 0.5, took
    finally:
        echo.close()


@pytest.mark.parametrize("where", ["single-end", "tunnel"])
def test_an_ended_session_is_freed_at_once(where, monkeypatch):
    """No reference cycle outlives a UDP session (its idle timer's callback, the hub reader's
    follow-up callback, the greenlet that keeps the GreenletExit which ended it): each
    session's objects go when it ends, not at the collector's next pass, which under a churn of
    source addresses ran for 90-130 ms at a time (bench/README.md, twentieth pass)."""
    import gc

    from npgevent.relay import udp as udpmod

    made = track_instances(monkeypatch, udpmod.UdpSession)
    echo = EchoPair()
    port = free_port()
    try:
        with contextlib.ExitStack() as stack:
            if where == "single-end":
                url = "client://127.0.0.1:%d/127.0.0.1:%d" % (port, echo.port)
                stack.enter_context(in_process(url, udp_read_timeout="300ms"))
            else:
                tport = free_port()
                server_url, client_url = tunnel_urls("rev", "0", tport, port, echo.port)
                s = stack.enter_context(in_process(server_url, udp_read_timeout="300ms"))
                stack.enter_context(in_process(client_url, udp_read_timeout="300ms"))
                wait_pool(lambda: s.core.pool.active, 2)
            gc.collect()
            gc.disable()
            try:
                for _ in range(3):
                    sock = udp_socket(timeout=5)
                    sock.sendto(b"ping", ("127.0.0.1", port))
                    assert sock.recv(100) == b"ping"
                    sock.close()
                deadline = time.monotonic() + 5
                while any(ref() is not None for ref in made) and time.monotonic() < deadline:
                    gevent.sleep(0.05)
                assert len(made) >= 3 and [ref() for ref in made] == [None] * len(made)
            finally:
                gc.enable()
    finally:
        echo.close()
