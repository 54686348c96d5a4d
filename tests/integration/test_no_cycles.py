"""Ordinary and rude traffic through in-process instances leaves nothing of npgevent to the
cyclic garbage collector: each session's objects go by reference counting when it ends.

Reference cycles per session (a callback that was a method of the object holding it, a
closure naming itself, a kept exception whose traceback's frames hold its keeper, a job
holding its session's method) made the collector's full passes stall the hub for 25-130 ms
under connection bursts, UDP source churn and resets (bench/README.md, twentieth pass).  The
collector is off during the traffic; afterwards one pass with ``DEBUG_SAVEALL`` lists what
only it could have freed, and no object of an npgevent class may be among it.
"""

from __future__ import annotations

import collections
import contextlib
import os
import socket as stdsocket
import struct
from collections.abc import Iterator
from typing import Any

import gevent
import pytest
from gevent import socket
from helpers import (
    EchoPair,
    echo_exact,
    echo_roundtrip,
    free_port,
    http,
    in_process,
    left_to_the_collector,
    sha_transfer,
    tunnel_urls,
    udp_socket,
    wait_pool,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)

IDLE = "300ms"  # UDP sessions end this long after their last datagram


@contextlib.contextmanager
def _path(name: str) -> Iterator[tuple[int, int | None, bool, list[Any]]]:
    """(user port, tunnel port or None, QUIC?, runners) for *name*."""
    echo = EchoPair()
    port = free_port()
    try:
        if name == "forward":
            with in_process("client://127.0.0.1:%d/127.0.0.1:%d" % (port, echo.port),
                            udp_read_timeout=IDLE) as r:
                yield port, None, False, [r]
            return
        quic = name == "quic"
        tport = free_port()
        server_url, client_url = tunnel_urls("rev", "0" if name == "tls0" else "1", tport, port, echo.port,
                                             extra_server="&quic=1" if quic else "")
        with in_process(server_url, udp_read_timeout=IDLE) as s, in_process(client_url, udp_read_timeout=IDLE) as c:
            wait_pool(lambda: s.core.pool.active, 2)
            yield port, tport, quic, [s, c]
    finally:
        echo.close()


def _reset(port: int) -> None:
    """Send, then abort with an RST while the relay may still be moving the bytes."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(os.urandom(30000))
    s.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def _stranger(tunnel_port: int, quic: bool) -> None:
    """Random bytes to the tunnel port from someone who is not the client."""
    try:
        if quic:
            sock = udp_socket()
            for n in (1, 40, 1200):
                sock.sendto(os.urandom(n), ("127.0.0.1", tunnel_port))
            sock.close()
        else:
            with socket.create_connection(("127.0.0.1", tunnel_port), timeout=5) as s:
                s.sendall(os.urandom(300))
                s.settimeout(2)
                while s.recv(4096):
                    pass
    except OSError:
        pass


def _udp_once(port: int) -> None:
    sock = udp_socket(timeout=5)
    try:
        payload = os.urandom(200)
        sock.sendto(payload, ("127.0.0.1", port))
        assert sock.recv(1000) == payload
    finally:
        sock.close()


def _traffic(port: int, tunnel_port: int | None, quic: bool) -> None:
    jobs = [gevent.spawn(sha_transfer, port, 1 << 20)]
    jobs += [gevent.spawn(_udp_once, port) for _ in range(10)]
    if tunnel_port is not None:
        jobs += [gevent.spawn(_stranger, tunnel_port, quic) for _ in range(3)]
    for i in range(40):
        payload = os.urandom(1 + i * 97)
        if i % 4 == 0:
            assert echo_roundtrip(port, payload) == payload  # half-close
        elif i % 4 == 1:
            _reset(port)
        elif i % 4 == 2:
            socket.create_connection(("127.0.0.1", port), timeout=10).close()  # silent
        else:
            assert echo_exact(port, payload) == payload
    gevent.joinall(jobs, raise_error=True)


@pytest.mark.parametrize("name", ["forward", "tls0", "tls1", "quic"])
def test_sessions_leave_nothing_to_the_collector(name: str) -> None:
    with _path(name) as (port, tunnel_port, quic, runners):
        _traffic(port, tunnel_port, quic)  # warm: pools, parked workers, first-use imports
        with left_to_the_collector() as ours:
            _traffic(port, tunnel_port, quic)
            wait_until(lambda: all(r.inst.slots.tcp == 0 and r.inst.slots.udp == 0 for r in runners),
                       timeout=20, what="every session ended")
        assert not ours, _classes(ours)


def test_master_requests_leave_nothing_to_the_collector(tmp_path) -> None:
    """The master's API, which anyone who reaches its port can send requests: each
    connection's handler, its request and its input go when the connection ends."""
    port = free_port()
    with in_process("master://127.0.0.1:%d/api?log=warn" % port, state_dir=str(tmp_path)):
        def rounds() -> None:
            for _ in range(10):
                assert http("GET", port, "/api/v1/instances").status == 401  # no key
                http("POST", port, "/api/v1/instances", body=b"{not json")
                http("GET", port, "/api/v1/openapi.json")

        rounds()  # warm
        with left_to_the_collector() as ours:
            rounds()
        assert not ours, _classes(ours)


def _classes(objects: list[Any]) -> list[tuple[str, int]]:
    return collections.Counter(type(o).__qualname__ for o in objects).most_common(10)


def test_a_failed_hub_read_leaves_nothing_to_the_collector() -> None:
    """A reader whose session fails in a hub callback (a pool stream's error, a delivery that
    raised) raises that error in the session's greenlet without a reference cycle: its
    traceback holds the serving frame, which must not hold it back."""
    from npgevent.relay.hubread import HubReader

    def deliver(data: bytes) -> None:
        raise ValueError("cannot pass this on")

    with left_to_the_collector() as ours:
        for _ in range(3):
            a, b = socket.socketpair()
            try:
                job = gevent.spawn(HubReader(a, deliver, 65536).serve)
                b.sendall(b"boom")
                job.join(5)
                assert isinstance(job.exception, ValueError)
                del job
            finally:
                a.close()
                b.close()
    # only the readers: what an earlier test's teardown let go of meanwhile is not this test's
    assert not [o for o in ours if type(o) is HubReader], _classes(ours)
