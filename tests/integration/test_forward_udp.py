"""Single-end UDP forwarding on loopback."""

from __future__ import annotations

import os
import time
from typing import Any

import gevent
import greenlet
from helpers import NpProcess, in_process, udp_roundtrip, udp_socket


def test_udp_echo_small_and_60000_byte_datagram(udp_echo, port):
    with in_process("client://127.0.0.1:%d/127.0.0.1:%d" % (port, udp_echo.port)) as r:
        assert udp_roundtrip(port, b"hello") == b"hello"
        big = os.urandom(60000)
        assert udp_roundtrip(port, big) == big
        max_size = os.urandom(65507)  # the largest IPv4 UDP payload
        assert udp_roundtrip(port, max_size) == max_size
        assert r.inst.traffic.udp_tx >= 5 + 60000 + 65507
        assert r.inst.traffic.udp_rx == r.inst.traffic.udp_tx


def test_1000_datagrams_from_20_sources_none_lost(udp_echo, port):
    warm = udp_socket(timeout=5)  # open to the end: no source may get its port (and session)
    try:
        with in_process("client://127.0.0.1:%d/127.0.0.1:%d" % (port, udp_echo.port)) as r:
            warm.sendto(b"warm-up", ("127.0.0.1", port))
            assert warm.recv(100) == b"warm-up"

            def source(i: int) -> set[bytes]:
                sock = udp_socket(timeout=5)
                try:
                    sent = {b"src%02d-seq%03d-" % (i, n) + b"p" * (n % 700) for n in range(50)}
                    for payload in sorted(sent):
                        sock.sendto(payload, ("127.0.0.1", port))
                    got = set()
                    while len(got) < len(sent):
                        got.add(bytes(sock.recv(65535)))
                    return sent - got
                finally:
                    sock.close()

            jobs = [gevent.spawn(source, i) for i in range(20)]
            gevent.joinall(jobs, timeout=60, raise_error=True)
            assert [j.value for j in jobs] == [set()] * 20
            assert r.inst.slots.udp == 21  # 20 sources + the warm-up socket
            assert udp_echo.count == 1001
    finally:
        warm.close()


def _switches_into(target_of: Any, rounds: int, port: int) -> int:
    """Round trips from one socket; how many greenlet switches went into the session's greenlet."""
    sock = udp_socket(timeout=5)
    try:
        sock.sendto(b"first", ("127.0.0.1", port))
        assert sock.recv(100) == b"first"
        session_greenlet = target_of()
        switches = [0]

        def trace(event: str, args: Any) -> None:
            if event in ("switch", "throw") and args[1] is session_greenlet:
                switches[0] += 1

        previous = greenlet.settrace(trace)
        try:
            for i in range(rounds):
                sock.sendto(b"rt %d" % i, ("127.0.0.1", port))
                assert sock.recv(100) == b"rt %d" % i
        finally:
            greenlet.settrace(previous)
        return switches[0]
    finally:
        sock.close()


def test_udp_session_answers_from_the_hub_without_a_switch_per_datagram(udp_echo, port):
    """After the dial, a single-end session reads its target in a hub callback: a round trip
    costs no switch into the session's greenlet (about a fifth of the relay's CPU per round trip)."""
    with in_process("client://127.0.0.1:%d/127.0.0.1:%d" % (port, udp_echo.port)) as r:
        table = r.core.listeners.table
        switches = _switches_into(lambda: next(iter(table.sessions.values())).greenlet, 200, port)
        assert switches == 0
        assert r.inst.traffic.udp_rx == r.inst.traffic.udp_tx == len(b"first") + sum(
            len(b"rt %d" % i) for i in range(200))


def test_udp_with_a_rate_limit_reads_in_the_session_greenlet(udp_echo, port):
    """rate= may have to wait, which a hub callback can't: such a session keeps its greenlet."""
    with in_process("client://127.0.0.1:%d/127.0.0.1:%d?rate=100" % (port, udp_echo.port)) as r:
        table = r.core.listeners.table
        switches = _switches_into(lambda: next(iter(table.sessions.values())).greenlet, 50, port)
        assert switches >= 50


def test_udp_session_expires_after_idle_timeout(udp_echo, port):
    url = "client://127.0.0.1:%d/127.0.0.1:%d" % (port, udp_echo.port)
    with in_process(url, udp_read_timeout="500ms") as r:
        sock = udp_socket()
        sock.sendto(b"a", ("127.0.0.1", port))
        assert sock.recv(10) == b"a"
        assert r.inst.slots.udp == 1
        deadline = time.monotonic() + 5
        while r.inst.slots.udp and time.monotonic() < deadline:
            gevent.sleep(0.05)
        assert r.inst.slots.udp == 0
        # a new datagram from the same address opens a new session
        sock.sendto(b"b", ("127.0.0.1", port))
        assert sock.recv(10) == b"b"
        sock.close()


def test_udp_slot_limit(udp_echo, port):
    with in_process("client://127.0.0.1:%d/127.0.0.1:%d?slot=1" % (port, udp_echo.port)) as r:
        a, b = udp_socket(timeout=1), udp_socket(timeout=1)
        a.sendto(b"a", ("127.0.0.1", port))
        assert a.recv(10) == b"a"
        b.sendto(b"b", ("127.0.0.1", port))
        r.capture.wait_for(r"ERROR  UDP slot limit reached \(1\)")
        a.close()
        b.close()


def test_udp_echo_cli(udp_echo, port):
    with NpProcess("client://127.0.0.1:%d/127.0.0.1:%d" % (port, udp_echo.port)) as np:
        np.wait_for("Client started")
        big = os.urandom(60000)
        assert udp_roundtrip(port, big) == big
        np.wait_for(r"CHECK_POINT\|MODE=1\|PING=\d+ms\|POOL=0\|TCPS=0\|UDPS=1\|TCPRX=0\|TCPTX=0\|"
                    r"UDPRX=60000\|UDPTX=60000")
        assert np.stop() == 0


def test_noudp_disables_udp(tcp_echo, port):
    with in_process("client://127.0.0.1:%d/127.0.0.1:%d?noudp=1" % (port, tcp_echo.port)):
        sock = udp_socket(timeout=0.3)
        sock.sendto(b"x", ("127.0.0.1", port))
        try:
            data = sock.recv(10)
        except OSError:
            data = None
        sock.close()
        assert data is None
