"""Reused TLS pool connections between npgevent peers (extension level 2).

A TCP session on a TLS pool is framed, and its connection goes back to both pools after it:
no new TCP connection and TLS handshake per session.  Counted on the client in
``events.tls_handshakes`` (every pool connection it opens does one).  Peers without level 2
(an older npgevent, a Go peer) keep NodePass's single-use connections.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket as stdsocket
import struct

import gevent
import pytest
from gevent import socket
from gevent.server import StreamServer
from helpers import (
    ByteSource,
    EchoPair,
    NpProcess,
    connect_retry,
    echo_exact,
    free_port,
    in_process,
    make_ca_and_cert,
    recv_all,
    sha_transfer,
    tunnel_urls,
    wait_pool,
)

pytestmark = pytest.mark.timeout(120)


def _handshakes(client) -> int:
    return sum(client.inst.events.tls_handshakes.values())


def _logged(capture, pattern: str, n: int, timeout: float = 10.0) -> int:
    """How often *pattern* was logged, once it reached *n* (sessions end after their replies)."""
    with gevent.Timeout(timeout, False):
        while capture.count(pattern) < n:
            gevent.sleep(0.05)
    return int(capture.count(pattern))


def _settled(client) -> int:
    """The handshake count once the pool has stopped growing (its first rounds grow the
    capacity by one: NodePass's adaptive rule, whatever the sessions do)."""
    count = _handshakes(client)
    while True:
        gevent.sleep(0.6)
        if _handshakes(client) == count:
            return count
        count = _handshakes(client)


@contextlib.contextmanager
def tunnel(flow: str, tls: str, target_port: int, tmp_path, extra_client: str = "&min=8", **env):
    tport, uport = free_port(), free_port()
    certs = make_ca_and_cert(tmp_path) if tls == "2" else None
    server_url, client_url = tunnel_urls(flow, tls, tport, uport, target_port, certs,
                                         extra_server="&log=debug", extra_client=extra_client + "&log=debug")
    saved = os.environ.get("SSL_CERT_FILE")
    if certs:
        os.environ["SSL_CERT_FILE"] = str(certs["ca"])
    try:
        with in_process(server_url, **env) as s, in_process(client_url, **env) as c:
            receiver = s if flow == "rev" else c
            wait_pool(lambda: receiver.core.pool.active, 8)
            yield s, c, uport
    finally:
        if certs:
            if saved is None:
                os.environ.pop("SSL_CERT_FILE", None)
            else:
                os.environ["SSL_CERT_FILE"] = saved


@pytest.mark.parametrize(("flow", "tls"), [("rev", "1"), ("fwd", "1"), ("rev", "2")])
def test_sessions_reuse_their_pool_connections(flow, tls, tmp_path):
    echo = EchoPair()
    try:
        with tunnel(flow, tls, echo.port, tmp_path) as (s, c, uport):
            assert echo_exact(uport, b"first") == b"first"
            assert s.core.reuse and c.core.reuse
            before = _settled(c)
            for i in range(100):
                payload = b"session %d " % i * 50
                assert echo_exact(uport, payload) == payload

            def parallel(i: int) -> None:
                for j in range(10):
                    payload = os.urandom(3000 + i * 7 + j)
                    assert echo_exact(uport, payload) == payload

            # 100 sessions one after another: not one new pool connection (each would have
            # been a TLS handshake)
            assert _handshakes(c) == before
            # 480 sessions, 16 users at once, from a pool of 8: the pool grows to what they
            # need (a session's connection comes back a round trip after its user is done, so
            # up to twice as many are out), not one handshake a session
            for _ in range(3):
                gevent.joinall([gevent.spawn(parallel, i) for i in range(16)], raise_error=True)
            assert _settled(c) - before <= 48
            receiver = s if flow == "rev" else c
            assert _logged(receiver.capture, r"Tunnel connection: back in the pool", 581) == 581
            assert receiver.capture.count(r"Tunnel connection: closed") == 0
            assert receiver.capture.count(r"TCP launch signal: cid \w+ ->") == 581
    finally:
        echo.close()


def _digest_target() -> StreamServer:
    """Reads a request to its end (the user's half-close), then answers with its SHA-256."""

    def handle(sock: socket.socket, _addr) -> None:
        digest = hashlib.sha256()
        while True:
            data = sock.recv(65536)
            if not data:
                break
            digest.update(data)
        sock.sendall(digest.hexdigest().encode())

    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    return server


def test_half_close_and_bulk_both_ways_over_reused_connections(tmp_path):
    echo, digests = EchoPair(), _digest_target()
    try:
        with tunnel("rev", "1", echo.port, tmp_path) as (_s, c, uport):
            before = _settled(c)
            for size in (5 << 20, 1, 65532, 65536, 200000):
                sent, got = sha_transfer(uport, size)
                assert sent == got
            assert _handshakes(c) == before
        with tunnel("fwd", "1", digests.address[1], tmp_path) as (_s, c, uport):
            before = _settled(c)
            for size in (3 << 20, 10):
                body = os.urandom(size)
                sock = connect_retry(uport)
                sock.settimeout(20)
                sock.sendall(body)
                sock.shutdown(socket.SHUT_WR)  # the request ends; the answer comes after
                assert recv_all(sock) == hashlib.sha256(body).hexdigest().encode()
                sock.close()
            assert _handshakes(c) == before
    finally:
        echo.close()
        digests.stop(timeout=1)


def _rst(sock: socket.socket) -> None:
    sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_a_user_reset_in_mid_download_aborts_the_session_and_keeps_the_connection(tmp_path):
    source = ByteSource()
    try:
        with tunnel("rev", "1", source.port, tmp_path) as (s, c, uport):
            before = _settled(c)
            for _ in range(5):
                sock = connect_retry(uport)
                sock.settimeout(10)
                got = 0
                while got < 300000:
                    data = sock.recv(65536)
                    assert data
                    got += len(data)
                _rst(sock)  # the target keeps sending: the session must still end at both ends
            c.capture.wait_for(r"Exchange complete: \w+: the peer aborted the session")
            for _ in range(3):  # and a user that resets at once, mid-stream
                sock = connect_retry(uport)
                sock.settimeout(10)
                assert sock.recv(65536)
                _rst(sock)
            # the aborted sessions' connections came back (the pool may still grow by one or two
            # while several aborted sessions finish at once: a refill, not a lost connection)
            assert _logged(s.capture, r"Tunnel connection: back in the pool", 8) == 8
            assert s.capture.count(r"Tunnel connection: closed") == 0
            assert _handshakes(c) - before <= 2
            assert not s.core.sessions and not c.core.sessions  # nothing left hanging
    finally:
        source.close()


def test_a_target_that_refuses_closes_that_connection_and_the_pool_refills(tmp_path):
    echo = EchoPair()
    dead = free_port()
    try:
        with tunnel("rev", "1", dead, tmp_path) as (s, c, uport):
            sock = connect_retry(uport)
            sock.settimeout(10)
            assert sock.recv(100) == b""  # the dial failed: the user's session ends
            sock.close()
            c.capture.wait_for(r"Dial target failed")
            wait_pool(lambda: s.core.pool.active, 8)
            assert s.capture.count(r"Tunnel connection: closed") == 1
    finally:
        echo.close()


def test_a_client_without_level_2_gets_single_use_connections(tmp_path, monkeypatch):
    """An older npgevent client (level 1) never sends its level: the server keeps NodePass's
    launches and closes each connection after its session."""
    import npgevent.cores.client as client_core

    monkeypatch.setattr(client_core, "reuses_pool", lambda *args: False)
    echo = EchoPair()
    try:
        with tunnel("rev", "1", echo.port, tmp_path) as (s, c, uport):
            before = _settled(c)
            for i in range(10):
                assert echo_exact(uport, b"old %d" % i) == b"old %d" % i
            assert not s.core.reuse and not c.core.reuse
            assert s.capture.count(r"TCP launch signal: cid \w+ ->") == 10
            assert s.capture.count(r"#3") == 0
            assert _logged(s.capture, r"Tunnel connection: closed", 10) == 10
            wait_pool(lambda: _handshakes(c) - before, 10)  # each one replaced
    finally:
        echo.close()


def test_a_server_without_level_2_is_not_sent_framed_launches(tmp_path, monkeypatch):
    import npgevent.net.handshake as net_handshake

    monkeypatch.setattr(net_handshake, "EXTENSION_LEVEL", 1)  # the server announces npg=1
    echo = EchoPair()
    try:
        with tunnel("fwd", "1", echo.port, tmp_path) as (s, c, uport):
            assert c.core.npg == 1 and not c.core.reuse
            before = _settled(c)
            for i in range(10):
                assert echo_exact(uport, b"older %d" % i) == b"older %d" % i
            assert s.capture.count(r"TCP launch signal: cid \w+ <-") == 10
            assert _logged(c.capture, r"Tunnel connection: closed", 10) == 10
            wait_pool(lambda: _handshakes(c) - before, 10)
    finally:
        echo.close()


def test_reuse_between_cli_processes(tmp_path):
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", "1", tport, uport, echo.port, extra_server="&log=debug",
                                         extra_client="&log=debug&min=4")
    try:
        with NpProcess(server_url) as s, NpProcess(client_url) as c:
            c.wait_for("Tunnel handshaked")
            s.wait_for("TCP sessions reuse their pool connections")
            for i in range(30):
                assert echo_exact(uport, b"cli %d" % i) == b"cli %d" % i
            assert _logged(s, r"Tunnel connection: back in the pool", 30) == 30
            assert s.count(r"Tunnel connection: closed") == 0
            assert s.count(r"#3 ") == 0 and "Traceback" not in s.output + c.output
    finally:
        echo.close()
