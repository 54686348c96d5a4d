"""UDP sessions over QUIC streams read in the hub (``QuicStream.serve_in_hub``): between
npgevent peers both ends hand each stream's chunks on without waking a greenlet per
datagram; with a Go peer (raw datagrams) the greenlet path stays."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import gevent
import pytest
from realgo import requires_go
from test_interop_go import exercise_udp as go_exercise_udp
from test_quic_offload import go_quic_tunnel, quic_tunnel
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
    with quic_tunnel("rev", udp_read_timeout="1s") as (s, c, uport):
        exercise_udp(uport, sources=4, each=20)
        assert served[s.core.engine] >= 4 and served[c.core.engine] >= 4
        end = time.monotonic() + 10
        while (_serving(s) or _serving(c)) and time.monotonic() < end:
            gevent.sleep(0.1)
        assert _serving(s) == 0 and _serving(c) == 0  # nothing left hooked to a stream
        exercise_udp(uport, sources=2, each=20)  # new sessions after the old ones ended


@requires_go
@pytest.mark.parametrize("go_role", ["client", "server"])
def test_a_go_peers_raw_datagrams_keep_the_greenlet_path(go_role, served):
    with go_quic_tunnel(go_role) as (_mine, uport):
        go_exercise_udp(uport)
        assert sum(served.values()) == 0  # quic-go may cut a datagram: recv joins it
