"""Dual-end tunnels on loopback: {reverse, forward} x {tls 0, 1, 2} x {TCP, UDP},
in-process and as CLI processes."""

from __future__ import annotations

import contextlib
import re

import gevent
import pytest
from gevent import socket
from helpers import (
    EchoPair,
    NpProcess,
    connect_retry,
    free_port,
    in_process,
    inproc_tunnel,
    make_ca_and_cert,
    recv_all,
    sha_transfer,
    tunnel_urls,
    udp_socket,
    wait_pool,
)

MiB = 1 << 20
COMBOS = [(flow, tls) for flow in ("rev", "fwd") for tls in ("0", "1", "2")]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_ca_and_cert(tmp_path_factory.mktemp("certs"))


def exercise_tcp_sha(user_port: int, size: int = 32 * MiB) -> None:
    sent, got = sha_transfer(user_port, size)
    assert sent == got


def exercise_tcp_concurrent(user_port: int, n: int = 100) -> None:
    def one(i: int) -> None:
        sock = connect_retry(user_port)
        try:
            payload = (b"session-%03d|" % i) * 300
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == payload
        finally:
            sock.close()

    jobs = [gevent.spawn(one, i) for i in range(n)]
    gevent.joinall(jobs, timeout=60, raise_error=True)
    assert all(j.successful() for j in jobs)


def exercise_udp(user_port: int, sources: int = 10, each: int = 50) -> None:
    def source(i: int) -> set[bytes]:
        sock = udp_socket(timeout=10)
        try:
            sent = [b"src%02d-%03d-" % (i, n) + b"d" * (n * 37 % 1200) for n in range(each)]
            # the first datagram opens the session through the tunnel; wait for its echo
            sock.sendto(sent[0], ("127.0.0.1", user_port))
            got = {bytes(sock.recv(65535))}
            for payload in sent[1:]:
                sock.sendto(payload, ("127.0.0.1", user_port))
            while len(got) < each:
                got.add(bytes(sock.recv(65535)))
            return set(sent) - got
        finally:
            sock.close()

    jobs = [gevent.spawn(source, i) for i in range(sources)]
    gevent.joinall(jobs, timeout=60, raise_error=True)
    assert [j.value for j in jobs] == [set()] * sources


@contextlib.contextmanager
def cli_tunnel(flow, tls, certs, extra_server="", extra_client="", env=None):
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls(flow, tls, tport, uport, echo.port, certs,
                                         extra_server=extra_server, extra_client=extra_client)
    env = dict(env or {}, SSL_CERT_FILE=str(certs["ca"]))
    try:
        with NpProcess(server_url, env=env) as s, NpProcess(client_url, env=env) as c:
            s.wait_for("Tunnel handshaked")
            c.wait_for("Tunnel handshaked")
            receiver = s if flow == "rev" else c
            receiver.wait_for(r"CHECK_POINT\|MODE=\d\|PING=\d+ms\|POOL=[1-9]")
            yield s, c, uport, echo
            assert s.stop() == 0
            assert c.stop() == 0
            for proc in (s, c):
                assert "Traceback" not in proc.output
    finally:
        echo.close()


@pytest.mark.parametrize(("flow", "tls"), COMBOS)
def test_tunnel_in_process(flow, tls, certs, monkeypatch):
    with inproc_tunnel(flow, tls, certs, monkeypatch) as (s, c, uport, _echo):
        assert s.core.npg == 2 and c.core.npg == 2  # both npgevent: extension negotiated
        assert s.core.mode == (1 if flow == "rev" else 2) and c.core.mode == 2
        exercise_tcp_sha(uport)
        assert s.core.reuse == c.core.reuse == (tls != "0")  # TLS pools: reused connections
        exercise_tcp_concurrent(uport)
        exercise_udp(uport)
        for side in (s, c):
            t = side.inst.traffic
            assert t.tcp_rx >= 32 * MiB and t.tcp_tx >= 32 * MiB
            assert t.udp_rx > 0 and t.udp_rx == t.udp_tx


@pytest.mark.parametrize(("flow", "tls"), COMBOS)
def test_tunnel_cli(flow, tls, certs):
    with cli_tunnel(flow, tls, certs) as (s, c, uport, _echo):
        exercise_tcp_sha(uport)
        exercise_tcp_concurrent(uport)
        exercise_udp(uport)
        mode = "1" if flow == "rev" else "2"
        s.wait_for(r"CHECK_POINT\|MODE=%s\|PING=\d+ms\|POOL=\d+\|TCPS=\d+\|UDPS=\d+\|TCPRX=(\d{8,})\|" % mode)
        c.wait_for(r"CHECK_POINT\|MODE=2\|PING=\d+ms\|POOL=\d+\|TCPS=\d+\|UDPS=\d+\|TCPRX=(\d{8,})\|")
        if tls != "0":
            fp_server = s.wait_for(r"INFO  TLS cert verified: (sha256:[0-9A-F:]{95})$", timeout=20).group(1)
            fp_client = c.wait_for(r"INFO  TLS cert verified: (sha256:[0-9A-F:]{95})$", timeout=20).group(1)
            assert fp_server == fp_client
            s.wait_for("TLS code-%s: " % tls)
        else:
            s.wait_for("WARN  TLS code-0: unencrypted")


def test_half_close_survives_the_tunnel(certs, monkeypatch):
    """Between npgevent peers a client's FIN travels through and the full reply comes back."""
    from gevent.server import StreamServer

    reply = b"Z" * (2 * MiB)

    def handle(sock, _addr):
        request = recv_all(sock)
        sock.sendall(b"%d:" % len(request) + reply)
        sock.shutdown(socket.SHUT_WR)

    for tls in ("0", "1"):
        target = StreamServer(("127.0.0.1", 0), handle)
        target.start()
        tport, uport = free_port(), free_port()
        server_url, client_url = tunnel_urls("rev", tls, tport, uport, target.address[1], certs)
        try:
            with in_process(server_url) as s, in_process(client_url):
                wait_pool(lambda: s.core.pool.active, 1)
                sock = connect_retry(uport)
                sock.sendall(b"q" * 5000)
                sock.shutdown(socket.SHUT_WR)
                assert recv_all(sock) == b"5000:" + reply
                sock.close()
        finally:
            target.stop()


def test_udp_datagram_boundaries_and_64k_between_npgevent_peers(certs, monkeypatch):
    with inproc_tunnel("fwd", "0", certs, monkeypatch) as (_s, _c, uport, _echo):
        sock = udp_socket(timeout=5)
        try:
            sizes = [1, 60000, 3, 65507, 700]
            payloads = [bytes([i + 1]) * n for i, n in enumerate(sizes)]
            sock.sendto(payloads[0], ("127.0.0.1", uport))
            assert sock.recv(65535) == payloads[0]
            for p in payloads[1:]:
                sock.sendto(p, ("127.0.0.1", uport))
            got = [bytes(sock.recv(65535)) for _ in payloads[1:]]
            assert sorted(got) == sorted(payloads[1:])  # each one intact: no merging, no cutting
        finally:
            sock.close()


def test_proxy_rate_slot_over_tunnel(certs, monkeypatch):
    from helpers import TcpEcho

    echo = TcpEcho(first_line=True)
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", "0", tport, uport, echo.port, certs,
                                         extra_client="&proxy=1&slot=3")
    try:
        with in_process(server_url) as s, in_process(client_url) as c:
            wait_pool(lambda: s.core.pool.active, 2)
            sock = connect_retry(uport)
            local = sock.getsockname()
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
            sock.close()
            # the PROXY line names the user as the server saw it (from the launch signal)
            assert echo.first_lines[0] == b"PROXY TCP4 127.0.0.1 127.0.0.1 %d %d\r\n" % (local[1], echo.port)
            held = [connect_retry(uport) for _ in range(3)]
            for h in held:
                h.sendall(b"y")
                assert h.recv(1) == b"y"
            extra = connect_retry(uport)
            extra.sendall(b"z")
            c.capture.wait_for(r"ERROR  TCP slot limit reached \(3\): launch \w+ refused")
            extra.settimeout(5)
            assert recv_all(extra) == b""
            for h in [*held, extra]:
                h.close()
    finally:
        echo.close()


def test_start_lines_and_handshake_log(certs):
    with cli_tunnel("rev", "0", certs) as (s, c, _uport, _echo):
        s.wait_for(r"INFO  Server started: server://secret@127\.0\.0\.1:\d+/127\.0\.0\.1:\d+\?dns=1\.1\.1\.1,8\.8\.8\.8"
                   r"&max=1024&mode=1&quic=0&dial=auto&read=0s&rate=0&slot=65536&proxy=0&notcp=0&noudp=0$")
        s.wait_for(r"INFO  Tunnel signal -> : np://0@1024/-\?npg=2#0 -> 127\.0\.0\.1:\d+$")
        s.wait_for(r"INFO  Tunnel handshaked: 127\.0\.0\.1:\d+ <-> 127\.0\.0\.1:\d+$")
        c.wait_for(r"INFO  Tunnel signal <- : np://0@1024/-\?npg=2#0 <- 127\.0\.0\.1:\d+$")
        line = c.wait_for(r"INFO  Client started: (.*)$").group(1)
        assert re.search(r"&min=64&mode=2&quic=0&", line)


def test_server_mode0_reverse_when_target_free_and_client_mode0_dual_end(monkeypatch, certs):
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    try:
        with in_process("server://k@127.0.0.1:%d/127.0.0.1:%d" % (tport, uport)) as s, \
                in_process("client://k@127.0.0.1:%d/127.0.0.1:%d" % (tport, echo.port)) as c:
            assert (s.core.mode, s.core.flow) == (1, "-")  # listening on the target worked: reverse
            assert c.core.mode == 2  # the tunnel port is taken (by the server): dual-end
            wait_pool(lambda: s.core.pool.active, 1)
            from helpers import echo_roundtrip

            assert echo_roundtrip(uport, b"auto modes") == b"auto modes"
            c.capture.wait_for(r"CHECK_POINT\|MODE=2\|")
            s.capture.wait_for(r"CHECK_POINT\|MODE=1\|")
    finally:
        echo.close()


def test_server_mode0_forward_when_target_taken():
    echo = EchoPair()  # the server's target is busy (it is the echo service itself)
    tport, uport = free_port(), free_port()
    try:
        with in_process("server://k@127.0.0.1:%d/127.0.0.1:%d" % (tport, echo.port)) as s, \
                in_process("client://k@127.0.0.1:%d/127.0.0.1:%d" % (tport, uport)) as c:
            assert (s.core.mode, s.core.flow) == (2, "+")
            assert c.core.receives
            wait_pool(lambda: c.core.pool.active, 1)
            from helpers import echo_roundtrip, udp_roundtrip

            assert echo_roundtrip(uport, b"forward auto") == b"forward auto"
            assert udp_roundtrip(uport, b"udp forward auto") == b"udp forward auto"
    finally:
        echo.close()


def test_notcp_noudp_across_the_tunnel(certs, monkeypatch):
    from helpers import echo_roundtrip, udp_roundtrip

    with inproc_tunnel("rev", "0", certs, monkeypatch, extra_server="&notcp=1") as (_s, _c, uport, _e):
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", uport), timeout=1)
        assert udp_roundtrip(uport, b"udp only") == b"udp only"
    with inproc_tunnel("rev", "0", certs, monkeypatch, extra_server="&noudp=1") as (_s, _c, uport, _e):
        assert echo_roundtrip(uport, b"tcp only") == b"tcp only"
        u = udp_socket(timeout=0.5)
        u.sendto(b"x", ("127.0.0.1", uport))
        with pytest.raises(OSError):
            u.recv(10)
        u.close()


def test_failover_read_timeout_and_rate_on_the_dialling_side(certs, monkeypatch):
    import time as _time

    from helpers import echo_roundtrip

    echo = EchoPair()
    dead = free_port()
    tport, uport = free_port(), free_port()
    server_url = "server://k@127.0.0.1:%d/127.0.0.1:%d?mode=1" % (tport, uport)
    client_url = "client://k@127.0.0.1:%d/127.0.0.1:%d,127.0.0.1:%d?mode=2&read=400ms&log=debug" % (
        tport, dead, echo.port)
    try:
        with in_process(server_url) as s, in_process(client_url) as c:
            wait_pool(lambda: s.core.pool.active, 2)
            for i in range(4):  # round robin starts at the dead target every other time
                assert echo_roundtrip(uport, b"f%d" % i) == b"f%d" % i
            sock = connect_retry(uport)
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
            start = _time.monotonic()
            assert recv_all(sock) == b""  # idle 400 ms: the client side closed the session
            assert _time.monotonic() - start < 3
            sock.close()
            c.capture.wait_for(r"Exchange complete: \w+: idle timeout")
    finally:
        echo.close()


def test_rate_limit_across_the_tunnel(certs, monkeypatch):
    import time as _time

    from helpers import ByteSource

    target = ByteSource()
    tport, uport = free_port(), free_port()
    try:
        with in_process("server://k@127.0.0.1:%d/127.0.0.1:%d?mode=1&rate=8" % (tport, uport)) as s, \
                in_process("client://k@127.0.0.1:%d/127.0.0.1:%d?mode=2" % (tport, target.port)):
            wait_pool(lambda: s.core.pool.active, 1)
            sock = connect_retry(uport)
            sock.recv(65536)
            start = _time.monotonic()
            total = 0
            while _time.monotonic() - start < 3.0:
                total += len(sock.recv(1 << 20))
            rate = total / (_time.monotonic() - start)
            sock.close()
        assert 0.8e6 <= rate <= 1.2e6, rate
    finally:
        target.close()


def test_tls2_by_host_name_with_sni(certs, monkeypatch):
    """tls=2 verifies the server against the client URL's host name (SNI = that name)."""
    from helpers import echo_roundtrip

    echo = EchoPair()
    tport, uport = free_port(), free_port()
    monkeypatch.setenv("SSL_CERT_FILE", str(certs["ca"]))
    seen_sni = []
    from npgevent.net import tlsctx as tlsmod

    real = tlsmod.server_context

    def spying_context(cert, key):
        ctx = real(cert, key)
        ctx.set_tlsext_servername_callback(lambda conn: seen_sni.append(conn.get_servername()))
        return ctx

    monkeypatch.setattr(tlsmod, "server_context", spying_context)
    try:
        with in_process("server://k@127.0.0.1:%d/127.0.0.1:%d?mode=1&tls=2&crt=%s&key=%s"
                        % (tport, uport, certs["crt"], certs["key"])) as s, \
                in_process("client://k@localhost:%d/127.0.0.1:%d?mode=2" % (tport, echo.port)):
            wait_pool(lambda: s.core.pool.active, 1)
            assert echo_roundtrip(uport, b"by name") == b"by name"
        assert b"localhost" in seen_sni
    finally:
        echo.close()
