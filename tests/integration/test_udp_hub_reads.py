"""UDP sessions through a tunnel read their far end in hub callbacks (npgevent.relay.hubread).

Once a session is answered, neither end switches into a greenlet per datagram: the server's
session reads its pool connection from the hub, and the client's pool -> target direction
does too (its target -> pool direction keeps a greenlet: a write to the pool connection may
have to wait).  The tests count greenlet switches while datagrams go round, and check that
every byte still arrives and is counted.
"""

from __future__ import annotations

from typing import Any

import gevent
import greenlet
import pytest
from helpers import EchoPair, free_port, in_process, make_ca_and_cert, tunnel_urls, udp_socket, wait_pool

pytestmark = pytest.mark.timeout(60)

ROUNDS = 200


def _is_exchange_reader(target: Any) -> bool:
    """The client's pool -> target greenlet of a UDP exchange (cores.tunnel_udp.udp_exchange)."""
    args = getattr(target, "args", None)
    return bool(args) and getattr(args[0], "__name__", "") == "up"


def _round_trips(port: int, watched: Any) -> dict[str, int]:
    """One session: a first datagram, then ROUNDS round trips while switches are counted."""
    sock = udp_socket(timeout=5)
    try:
        sock.sendto(b"first", ("127.0.0.1", port))
        assert sock.recv(100) == b"first"
        sock.sendto(b"second", ("127.0.0.1", port))  # the session is answered: hub mode from here
        assert sock.recv(100) == b"second"
        counts = {"session": 0, "exchange_up": 0}
        session_greenlet = watched()

        def trace(event: str, args: Any) -> None:
            if event not in ("switch", "throw"):
                return
            target = args[1]
            if target is session_greenlet:
                counts["session"] += 1
            elif _is_exchange_reader(target):
                counts["exchange_up"] += 1

        previous = greenlet.settrace(trace)
        try:
            for i in range(ROUNDS):
                payload = b"round trip %d " % i + b"x" * (i % 700)
                sock.sendto(payload, ("127.0.0.1", port))
                assert sock.recv(2000) == payload
        finally:
            greenlet.settrace(previous)
        return counts
    finally:
        sock.close()


@pytest.mark.parametrize("tls", ["0", "1", "2"])
def test_answered_tunnel_udp_session_reads_in_the_hub_at_both_ends(tls, tmp_path, monkeypatch):
    certs = make_ca_and_cert(tmp_path) if tls == "2" else None
    if certs:
        monkeypatch.setenv("SSL_CERT_FILE", str(certs["ca"]))
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", tls, tport, uport, echo.port, certs)
    try:
        with in_process(server_url) as s, in_process(client_url) as c:
            wait_pool(lambda: s.core.pool.active, 4)
            table = s.core.listeners.table
            counts = _round_trips(uport, lambda: next(iter(table.sessions.values())).greenlet)
            assert counts == {"session": 0, "exchange_up": 0}
            sent = len(b"first") + len(b"second") + sum(
                len(b"round trip %d " % i) + i % 700 for i in range(ROUNDS))
            for end in (s, c):
                assert end.inst.traffic.udp_rx == end.inst.traffic.udp_tx == sent
    finally:
        echo.close()


def test_a_rate_limited_tunnel_session_keeps_its_greenlets():
    """rate= may have to wait, which a hub callback can't."""
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", "0", tport, uport, echo.port, extra_server="&rate=100",
                                         extra_client="&rate=100")
    try:
        with in_process(server_url) as s, in_process(client_url):
            wait_pool(lambda: s.core.pool.active, 4)
            table = s.core.listeners.table
            counts = _round_trips(uport, lambda: next(iter(table.sessions.values())).greenlet)
            assert counts["session"] >= ROUNDS and counts["exchange_up"] >= ROUNDS
    finally:
        echo.close()


def test_tunnel_udp_session_still_ends_when_idle():
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", "1", tport, uport, echo.port)
    try:
        with in_process(server_url, udp_read_timeout="500ms") as s, \
                in_process(client_url, udp_read_timeout="500ms"):
            wait_pool(lambda: s.core.pool.active, 4)
            sock = udp_socket(timeout=5)
            for payload in (b"one", b"two", b"three"):
                sock.sendto(payload, ("127.0.0.1", uport))
                assert sock.recv(100) == payload
            assert s.inst.slots.udp == 1
            for _ in range(60):
                if s.inst.slots.udp == 0:
                    break
                gevent.sleep(0.05)
            assert s.inst.slots.udp == 0
            sock.sendto(b"again", ("127.0.0.1", uport))  # a new session, in hub mode again
            assert sock.recv(100) == b"again"
            sock.close()
    finally:
        echo.close()
