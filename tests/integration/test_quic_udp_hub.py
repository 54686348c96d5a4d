"""UDP sessions over QUIC streams read in the hub (``QuicStream.serve_in_hub``): between
npgevent peers both ends hand each stream's chunks on without waking a greenlet per
datagram; with a Go peer (raw datagrams) the greenlet path stays."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import gevent
import pytest
from helpers import EchoPair, free_port, in_process, tunnel_urls, wait_pool
from realgo import GoProcess, requires_go
from test_interop_go import exercise_udp as go_exercise_udp
from test_quic_offload import quic_tunnel
from test_tunnel import exercise_udp

from npgevent.quic.stream import QuicStream

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def served(monkeypatch) -> Counter[Any]:
    """serve_in_hub calls per engine (one engine per tunnel end in this process)."""
    calls: Counter[Any] = Counter()
    original = QuicStream.serve_in_hub

    def counting(self: QuicStream, deliver: Any) -> None:
        calls[self.engine] += 1
        original(self, deliver)

    monkeypatch.setattr(QuicStream, "serve_in_hub", counting)
    return calls


def _serving(runner: Any) -> int:
    return sum(1 for s in runner.core.engine.streams.values() if s._on_ready is not None)


@pytest.mark.parametrize("flow", ["rev", "fwd"])
def test_both_ends_serve_udp_sessions_in_the_hub_and_every_datagram_arrives(flow, served):
    with quic_tunnel(flow) as (s, c, uport):
        exercise_udp(uport, sources=10, each=80)
        # ten sessions: each end read its side of them in the hub (the receiving side once its
        # session was answered, the dialling side from the first datagram)
        assert served[s.core.engine] >= 10 and served[c.core.engine] >= 10, served
        assert s.capture.count(r"Traceback|QUIC thread error") == 0
        assert c.capture.count(r"Traceback|QUIC thread error") == 0


def test_sessions_served_in_the_hub_end_at_their_idle_timeout(served):
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", "1", tport, uport, echo.port, extra_server="&quic=1")
    try:
        with in_process(server_url, udp_read_timeout="1s") as s, \
                in_process(client_url, udp_read_timeout="1s") as c:
            wait_pool(lambda: s.core.pool.active, 2)
            exercise_udp(uport, sources=4, each=20)
            assert served[s.core.engine] >= 4 and served[c.core.engine] >= 4
            end = time.monotonic() + 10
            while (_serving(s) or _serving(c)) and time.monotonic() < end:
                gevent.sleep(0.1)
            assert _serving(s) == 0 and _serving(c) == 0  # nothing left hooked to a stream
            exercise_udp(uport, sources=2, each=20)  # new sessions after the old ones ended
    finally:
        echo.close()


@requires_go
@pytest.mark.parametrize("go_role", ["client", "server"])
def test_a_go_peers_raw_datagrams_keep_the_greenlet_path(go_role, served):
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", "1", tport, uport, echo.port, extra_server="&quic=1")
    go_url = client_url if go_role == "client" else server_url
    mine_url = server_url if go_role == "client" else client_url
    env = {"NP_REPORT_INTERVAL": "1s", "NP_SERVICE_COOLDOWN": "1s"}
    go = GoProcess(go_url, env=env) if go_role == "server" else None
    try:
        if go is not None:
            go.wait_for(r"Server started")
        with in_process(mine_url) as mine:
            peer = go or GoProcess(go_url, env=env)
            try:
                wait_pool(lambda: mine.core.pool.active, 2, timeout=30)
                go_exercise_udp(uport)
                assert sum(served.values()) == 0  # quic-go may cut a datagram: recv joins it
            finally:
                if peer is not go:
                    peer.close()
    finally:
        if go is not None:
            go.close()
        echo.close()
        gevent.sleep(0)
