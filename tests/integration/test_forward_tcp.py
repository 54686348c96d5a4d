"""Single-end TCP forwarding on loopback, in-process and through the CLI."""

from __future__ import annotations

import time

import gevent
import pytest
from gevent import socket
from helpers import (
    NpProcess,
    TcpEcho,
    connect_retry,
    echo_roundtrip,
    free_port,
    in_process,
    recv_all,
    sha_transfer,
)

from npgevent.protocol.proxyproto import parse_proxy_v1

MiB = 1 << 20


def test_64mib_sha256_in_process(tcp_echo, port):
    with in_process("client://127.0.0.1:%d/127.0.0.1:%d?mode=1" % (port, tcp_echo.port)) as r:
        sent, got = sha_transfer(port, 64 * MiB)
        assert sent == got
        assert r.inst.traffic.tcp_tx == 64 * MiB
        assert r.inst.traffic.tcp_rx == 64 * MiB


def test_bulk_between_the_accepted_and_the_dialled_socket_is_spliced(tcp_echo, port, spliced):
    """Both sockets of a relayed connection are plain gevent sockets to the relay (however
    they were made, npgevent.net.lightsock): bulk takes splice(2), not reads and writes."""
    with in_process("client://127.0.0.1:%d/127.0.0.1:%d?mode=1" % (port, tcp_echo.port)):
        sent, got = sha_transfer(port, 32 * MiB)
        assert sent == got
    assert sum(spliced) >= 2 * 32 * MiB  # each byte in through a pipe and out, both ways


def test_64mib_sha256_cli(tcp_echo, port):
    with NpProcess("client://127.0.0.1:%d/127.0.0.1:%d" % (port, tcp_echo.port)) as np:
        np.wait_for(r"Client started: client://")
        sent, got = sha_transfer(port, 64 * MiB)
        assert sent == got
        np.wait_for(r"CHECK_POINT\|MODE=1\|PING=\d+ms\|POOL=0\|TCPS=0\|UDPS=0\|TCPRX=%d\|TCPTX=%d\|"
                    % (64 * MiB, 64 * MiB), timeout=10)
        assert np.stop() == 0


def test_200_concurrent_connections(tcp_echo, port):
    with in_process("client://127.0.0.1:%d/127.0.0.1:%d" % (port, tcp_echo.port)) as r:
        seen_tcps = []

        def one(i: int) -> bytes:
            sock = connect_retry(port)
            try:
                payload = (b"%05d-" % i) * 200
                sock.sendall(payload)
                gevent.sleep(0.3)  # keep all 200 open at once
                seen_tcps.append(r.inst.slots.tcp)
                sock.shutdown(socket.SHUT_WR)
                assert recv_all(sock) == payload
                return payload
            finally:
                sock.close()

        jobs = [gevent.spawn(one, i) for i in range(200)]
        gevent.joinall(jobs, timeout=60, raise_error=True)
        assert all(j.successful() for j in jobs)
        assert max(seen_tcps) == 200
        deadline = time.monotonic() + 5
        while r.inst.slots.tcp and time.monotonic() < deadline:
            gevent.sleep(0.05)
        assert r.inst.slots.tcp == 0


def test_half_close_gets_whole_reply(port):
    """The user shuts down its write side; the target's (late, large) reply still arrives."""
    reply = b"R" * (3 * MiB)

    def handle(sock, _addr):
        request = recv_all(sock)  # until the forwarded FIN
        gevent.sleep(0.3)
        sock.sendall(b"%d:" % len(request) + reply)
        sock.shutdown(socket.SHUT_WR)

    from gevent.server import StreamServer

    target = StreamServer(("127.0.0.1", 0), handle)
    target.start()
    try:
        with NpProcess("client://127.0.0.1:%d/127.0.0.1:%d" % (port, target.address[1])) as np:
            np.wait_for("Client started")
            out = echo_roundtrip(port, b"q" * 1000)
            assert out == b"1000:" + reply
            assert np.stop() == 0
    finally:
        target.stop()


def test_failover_when_first_target_down(tcp_echo, port):
    dead = free_port()
    url = "client://127.0.0.1:%d/127.0.0.1:%d,127.0.0.1:%d" % (port, dead, tcp_echo.port)
    with in_process(url):
        for i in range(6):  # the round-robin start hits the dead target half of the time
            assert echo_roundtrip(port, b"ping%d" % i) == b"ping%d" % i
    assert tcp_echo.accepted >= 6


def test_all_targets_down_logs_error(port):
    dead1, dead2 = free_port(), free_port()
    url = "client://127.0.0.1:%d/127.0.0.1:%d,127.0.0.1:%d" % (port, dead1, dead2)
    with in_process(url) as r:
        sock = connect_retry(port)
        assert recv_all(sock) == b""  # closed without data
        sock.close()
        line = r.capture.wait_for(r"ERROR  Dial target failed for .*dial tcp failed: (.*)").group(1)
        # every target is named with its reason, in round-robin order
        assert sorted(line.split("; ")) == sorted(
            "127.0.0.1:%d: Connection refused" % p for p in (dead1, dead2))


def test_rate_limit_within_20_percent(port):
    """rate=8 (Mbit/s) = 1,000,000 bytes/s; measure 3 s of a one-way download."""
    from helpers import ByteSource

    target = ByteSource()
    try:
        with in_process("client://127.0.0.1:%d/127.0.0.1:%d?rate=8" % (port, target.port)):
            sock = connect_retry(port)
            sock.recv(65536)  # first bytes: the bucket's initial burst is spent from here
            start = time.monotonic()
            total = 0
            while time.monotonic() - start < 3.0:
                total += len(sock.recv(1 << 20))
            elapsed = time.monotonic() - start
            sock.close()
        rate = total / elapsed
        assert 0.8 * 1_000_000 <= rate <= 1.2 * 1_000_000, rate
    finally:
        target.close()


def test_slot_limit_refuses_extra_connection(tcp_echo, port):
    with in_process("client://127.0.0.1:%d/127.0.0.1:%d?slot=2" % (port, tcp_echo.port)) as r:
        a, b = connect_retry(port), connect_retry(port)
        a.sendall(b"a")
        b.sendall(b"b")
        assert a.recv(10) == b"a" and b.recv(10) == b"b"
        c = connect_retry(port)
        assert recv_all(c) == b""  # refused: closed without a byte
        r.capture.wait_for(r"ERROR  TCP slot limit reached \(2\)")
        a.sendall(b"still")
        assert a.recv(10) == b"still"
        for s in (a, b, c):
            s.close()


def test_proxy_v1_line_bytes(port):
    echo = TcpEcho(first_line=True)
    try:
        with in_process("client://127.0.0.1:%d/127.0.0.1:%d?proxy=1" % (port, echo.port)):
            sock = connect_retry(port)
            local = sock.getsockname()
            sock.sendall(b"hello")
            assert sock.recv(5) == b"hello"
            sock.close()
        line = echo.first_lines[0]
        assert line == b"PROXY TCP4 127.0.0.1 127.0.0.1 %d %d\r\n" % (local[1], echo.port)
        assert parse_proxy_v1(line) == ("TCP4", ("127.0.0.1", local[1]), ("127.0.0.1", echo.port))
    finally:
        echo.close()


def test_proxy_v1_line_ipv6(port):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    echo = TcpEcho(host="::1", first_line=True)
    port6 = free_port("::1")
    try:
        with in_process("client://[::1]:%d/[::1]:%d?proxy=1" % (port6, echo.port)):
            sock = connect_retry(port6, host="::1")
            local = sock.getsockname()
            sock.sendall(b"v6")
            assert sock.recv(2) == b"v6"
            sock.close()
        assert echo.first_lines[0] == b"PROXY TCP6 ::1 ::1 %d %d\r\n" % (local[1], echo.port)
    finally:
        echo.close()


def test_read_timeout_closes_idle_session(tcp_echo, port):
    with in_process("client://127.0.0.1:%d/127.0.0.1:%d?read=300ms&log=debug" % (port, tcp_echo.port)) as r:
        sock = connect_retry(port)
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
        start = time.monotonic()
        assert sock.recv(10) == b""  # the forwarder closed the idle session
        assert 0.2 <= time.monotonic() - start < 3
        r.capture.wait_for(r"Exchange complete: .*idle timeout")
        sock.close()


@pytest.mark.parametrize("log", ["debug", "info"])  # info: the dial starts in the hub
def test_dial_source_ip_fallback_logged_once(tcp_echo, port, log):
    # 192.0.2.1 (TEST-NET-1) is never an address of this host: binding to it fails.
    url = "client://127.0.0.1:%d/127.0.0.1:%d?dial=192.0.2.1&log=%s" % (port, tcp_echo.port, log)
    with in_process(url) as r:
        for i in range(3):
            assert echo_roundtrip(port, b"d%d" % i) == b"d%d" % i
        assert r.capture.count(r"ERROR  Dial address 192\.0\.2\.1 unusable .*falling back to auto") == 1


def test_dial_source_ip_used(tcp_echo, port):
    seen = []
    from gevent.server import StreamServer

    def handle(sock, addr):
        seen.append(addr[0])
        sock.sendall(b"ok")

    target = StreamServer(("0.0.0.0", 0), handle)
    target.start()
    try:
        url = "client://127.0.0.1:%d/127.0.0.1:%d?dial=127.0.0.2" % (port, target.address[1])
        with in_process(url):
            sock = connect_retry(port)
            assert sock.recv(2) == b"ok"
            sock.close()
        assert seen and set(seen) == {"127.0.0.2"}  # the PING probe dials from there too
    finally:
        target.stop()


def test_notcp_disables_tcp_listener(udp_echo, port):
    with in_process("client://127.0.0.1:%d/127.0.0.1:%d?notcp=1" % (port, udp_echo.port)):
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1)


def test_short_sessions_run_in_the_hub_and_a_stop_ends_those_left(tcp_echo, port, greenlet_jobs):
    """A loopback target is dialled at accept and its sessions take no greenlet; a stop
    drains them for its grace, then ends the ones still open (the user sees the close) and
    gives back every slot."""
    jobs = greenlet_jobs
    with in_process("client://127.0.0.1:%d/127.0.0.1:%d" % (port, tcp_echo.port)) as r:
        core = r.core
        for i in range(20):
            assert echo_roundtrip(port, b"s%d" % i) == b"s%d" % i
        assert jobs == [] and r.inst.traffic.tcp_tx == sum(len(b"s%d" % i) for i in range(20))
        idle = [connect_retry(port) for _ in range(3)]
        for s in idle:
            s.sendall(b"open")
            assert s.recv(4) == b"open"
        assert len(core.sessions) == 3 and r.inst.slots.tcp == 3
        start = time.monotonic()
        r.stop(1.0)
        assert 0.4 <= time.monotonic() - start < 4  # drained for its grace, then ended
        for s in idle:
            s.settimeout(5)
            assert recv_all(s) == b""
            s.close()
        assert len(core.sessions) == 0 and r.inst.slots.tcp == 0
        assert jobs == []


def test_a_stop_waits_for_a_hub_session_that_ends_within_its_grace(tcp_echo, port):
    with in_process("client://127.0.0.1:%d/127.0.0.1:%d" % (port, tcp_echo.port)) as r:
        sock = connect_retry(port)
        sock.sendall(b"x" * 10)
        assert sock.recv(10) == b"x" * 10

        def finish() -> bytes:
            gevent.sleep(0.3)
            sock.sendall(b"last")
            sock.shutdown(socket.SHUT_WR)
            return recv_all(sock)

        user = gevent.spawn(finish)
        r.stop(5.0)
        assert user.get(timeout=5) == b"last"  # the answer came before the stop closed it
        sock.close()


def test_a_hub_session_turns_bulk_and_a_stop_ends_its_greenlet(port, greenlet_jobs):
    """A download too big for one read takes a greenlet; a stop mid-transfer ends it."""
    from helpers import ByteSource

    jobs = greenlet_jobs
    source = ByteSource()
    try:
        with in_process("client://127.0.0.1:%d/127.0.0.1:%d" % (port, source.port)) as r:
            sock = connect_retry(port)
            got = 0
            while got < 8 * MiB:
                got += len(sock.recv(1 << 20))
            assert jobs, "bulk never left the hub"
            r.stop(0.2)
            sock.settimeout(5)
            while sock.recv(1 << 20):
                pass  # closed by the stop
            sock.close()
            assert r.inst.slots.tcp == 0 and r.inst.traffic.tcp_rx >= 8 * MiB
    finally:
        source.close()

