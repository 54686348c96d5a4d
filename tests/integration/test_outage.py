"""A network outage between server and client must not kill sessions that still work.

A proxy written here sits on the tunnel path and can freeze it: no byte moves in either
direction, nothing is closed (packets silently dropped, as on a broken link).  Frozen for
longer than three report intervals, both ends declare the control channel dead and rebuild
the tunnel; a long-lived user session, whose own pool connection is only stalled, must
carry on once the path is back.
"""

from __future__ import annotations

import time

import gevent
import pytest
from gevent import socket
from gevent.event import Event
from gevent.server import StreamServer
from helpers import EchoPair, connect, exchange, free_port, in_process, wait_pool

pytestmark = pytest.mark.timeout(90)


class FreezableProxy:
    """127.0.0.1:port -> 127.0.0.1:target; ``freeze()`` holds every byte (and new connections)
    until ``thaw()``."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.flowing = Event()
        self.flowing.set()
        self.socks: list[socket.socket] = []
        self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()
        self.port = self.server.address[1]

    def freeze(self) -> None:
        self.flowing.clear()

    def thaw(self) -> None:
        self.flowing.set()

    def _handle(self, sock: socket.socket, _addr) -> None:
        self.flowing.wait()
        try:
            up = socket.create_connection(("127.0.0.1", self.target), timeout=5)
        except OSError:
            return
        up.settimeout(None)
        self.socks += [sock, up]
        pumps = [gevent.spawn(self._pump, sock, up), gevent.spawn(self._pump, up, sock)]
        gevent.joinall(pumps, count=1)
        gevent.killall(pumps)
        up.close()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                self.flowing.wait()
                dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.server.stop(timeout=1)
        for s in self.socks:
            s.close()


def test_a_long_session_survives_an_outage_that_rebuilds_the_tunnel():
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    proxy = FreezableProxy(tport)
    server_url = "server://k@127.0.0.1:%d/127.0.0.1:%d?mode=1&tls=1" % (tport, uport)
    client_url = "client://k@127.0.0.1:%d/127.0.0.1:%d?mode=2" % (proxy.port, echo.port)
    try:
        with in_process(server_url) as s, in_process(client_url) as c:
            wait_pool(lambda: s.core.pool.active, 4)
            user = connect(uport)
            try:
                assert exchange(user, b"before the outage") == b"before the outage"
                proxy.freeze()
                s.capture.wait_for(r"ERROR  Server error: control connection silent", timeout=10)
                c.capture.wait_for(r"ERROR  Client error: control connection silent", timeout=10)
                gevent.sleep(1.5)  # longer than three report intervals in all
                began = time.monotonic()
                proxy.thaw()
                # the tunnel is rebuilt ...
                c.capture.wait_for(r"INFO  Tunnel handshaked", timeout=15)
                # ... and the session that was open all along carries on
                assert exchange(user, b"after the outage") == b"after the outage"
                assert time.monotonic() - began < 10
                assert s.capture.count(r"live sessions carry on across the restart") >= 1
                assert s.core.inst.slots.tcp == 1  # still counted against slot=
                # new sessions go through the rebuilt tunnel
                wait_pool(lambda: s.core.pool.active, 1)
                fresh = connect(uport)
                try:
                    assert exchange(fresh, b"new session") == b"new session"
                finally:
                    fresh.close()
            finally:
                user.close()
    finally:
        proxy.close()
        echo.close()
