"""TLS 1.3 session resumption for the client's pool connections.

The client resumes from the server's session tickets when it can (no certificate, no
signature: less CPU per pool refill) and falls back to a full handshake when the server
no longer knows the ticket.  Counted in ``npgevent_pool_tls_handshakes_total{kind}``.
"""

from __future__ import annotations

import re
import signal
import time

import gevent
import pytest
from helpers import (
    EchoPair,
    NpProcess,
    echo_exact,
    free_port,
    http,
    in_process,
    make_ca_and_cert,
    tunnel_urls,
    wait_pool,
)
from realgo import GoProcess, requires_go

pytestmark = pytest.mark.timeout(120)


def carries(port: int, n: int = 5) -> None:
    for i in range(n):
        payload = b"resumed %d" % i
        assert echo_exact(port, payload) == payload


@pytest.mark.parametrize("tls", ["1", "2"])
def test_pool_connections_resume_from_tickets(tls, tmp_path, monkeypatch):
    from npgevent.net.tls import TLSStream

    hashed = []
    real = TLSStream.peer_fingerprint
    monkeypatch.setattr(TLSStream, "peer_fingerprint", lambda self: hashed.append(1) or real(self))
    certs = make_ca_and_cert(tmp_path) if tls == "2" else None
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", tls, tport, uport, echo.port, certs, key="resume-key",
                                         extra_client="&min=16")
    env = {"SSL_CERT_FILE": str(certs["ca"])} if certs else {}
    import os

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with in_process(server_url) as s, in_process(client_url) as c:
            wait_pool(lambda: s.core.pool.active, 16)
            counts = c.inst.events.tls_handshakes
            assert counts["full"] >= 1 and counts["resumed"] >= 10, counts
            # the vouched fingerprint matched on the full handshakes, and is not hashed again
            # for connections that resumed a session from their tickets
            assert c.capture.count(r"a man in the middle") == 0
            assert len(hashed) <= counts["full"] + 1, (len(hashed), counts)
            carries(uport)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        echo.close()


def test_a_server_that_forgot_the_ticket_gets_a_full_handshake():
    """A new server process (new certificate and ticket keys) on the same port: the stale
    ticket is refused and the client's next pool connections do full handshakes."""
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", "1", tport, uport, echo.port, key="resume-key",
                                         extra_client="&min=8")
    try:
        with in_process(client_url, wait_running=False) as c:
            with in_process(server_url) as s:
                wait_pool(lambda: s.core.pool.active, 8)
            full = c.inst.events.tls_handshakes["full"]
            stale = c.core.tls_session if c.core is not None else None
            with in_process(server_url) as s2:
                wait_pool(lambda: s2.core.pool.active, 8, timeout=20)
                carries(uport)
                counts = c.inst.events.tls_handshakes
                assert counts["full"] > full, counts
                assert stale is not None or full >= 1
    finally:
        echo.close()


@requires_go
def test_a_go_server_accepts_resumption(tmp_path):
    echo = EchoPair()
    tport, uport, mport = free_port(), free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", "1", tport, uport, echo.port, key="resume-key",
                                         extra_client="&min=16&metrics=127.0.0.1:%d" % mport)
    go = GoProcess(server_url)
    npg = None
    try:
        go.wait_for(r"Server started")
        npg = NpProcess(client_url)
        deadline = time.monotonic() + 20
        while True:
            try:
                carries(uport, 1)
                break
            except (OSError, AssertionError):
                assert time.monotonic() < deadline, npg.output[-3000:] + go.output[-3000:]
                gevent.sleep(0.2)
        gevent.sleep(2)  # the pool fills
        body = http("GET", mport, "/metrics").body.decode()
        resumed = float(re.search(r'npgevent_pool_tls_handshakes_total\{kind="resumed"\} (\S+)', body).group(1))
        full = float(re.search(r'npgevent_pool_tls_handshakes_total\{kind="full"\} (\S+)', body).group(1))
        assert full >= 1 and resumed >= 8, body
        carries(uport)
    finally:
        for proc in (npg, go):
            if proc is not None:
                proc.signal(signal.SIGTERM)
                proc.wait(10)
                proc.close()
        echo.close()
