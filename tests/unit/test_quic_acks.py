"""The QUIC pool's ACK policy (npgevent.quic.connection), on two aioquic connections joined
in memory (aioquic is sans-IO) with a clock the test moves: an answer carries the ACK of
the request it answers, no ACK-only packet goes out while one may still ride on data, two
packets make an ACK due at once, and a lone packet is acknowledged within max_ack_delay."""

from __future__ import annotations

from typing import Any

import pytest
from aioquic import tls
from aioquic.quic.events import HandshakeCompleted, StreamDataReceived

from npgevent.net.certs import self_signed
from npgevent.quic.config import make_configuration
from npgevent.quic.connection import ACK_DELAY, WindowedConnection

pytestmark = pytest.mark.timeout(30)

CLIENT = ("127.0.0.1", 40000)
SERVER = ("127.0.0.1", 40001)
ONE_RTT = tls.Epoch.ONE_RTT


class Link:
    """Both ends and the clock; every datagram sent is recorded with its size."""

    def __init__(self) -> None:
        cert, key = self_signed("acks")
        self.now = 1000.0
        self.client = WindowedConnection(configuration=make_configuration(True, 60.0))
        self.client.connect(SERVER, now=self.now)
        self.server: Any = None
        self._server_cfg = make_configuration(False, 60.0, cert=cert, key=key)
        self.sent: dict[str, list[int]] = {"client": [], "server": []}
        self.events: dict[str, list[Any]] = {"client": [], "server": []}

    def flush(self, side: str) -> int:
        """Send what *side* has now; return how many datagrams went."""
        src = self.client if side == "client" else self.server
        n = 0
        for data, _addr in src.datagrams_to_send(now=self.now):
            n += 1
            self.sent[side].append(len(data))
            if side == "client":
                if self.server is None:
                    self.server = WindowedConnection(
                        configuration=self._server_cfg,
                        original_destination_connection_id=self.client.original_destination_connection_id)
                self.server.receive_datagram(data, CLIENT, now=self.now)
            else:
                self.client.receive_datagram(data, SERVER, now=self.now)
        for name, conn in (("client", self.client), ("server", self.server)):
            while conn is not None and (event := conn.next_event()) is not None:
                self.events[name].append(event)
        return n

    def timers(self, side: str) -> None:
        """Fire *side*'s timer if it is due."""
        conn = self.client if side == "client" else self.server
        at = conn.get_timer()
        if at is not None and at <= self.now:
            conn.handle_timer(now=self.now)

    def settle(self, step: float = 0.001, rounds: int = 60) -> None:
        for _ in range(rounds):
            self.now += step
            for side in ("client", "server"):
                self.timers(side)
            moved = self.flush("client") + self.flush("server")
            if not moved and self.handshaken():
                return

    def handshaken(self) -> bool:
        return (any(isinstance(e, HandshakeCompleted) for e in self.events["client"])
                and any(isinstance(e, HandshakeCompleted) for e in self.events["server"]))

    def unacked(self, side: str) -> int:
        conn = self.client if side == "client" else self.server
        return len(conn._spaces[ONE_RTT].sent_packets)


@pytest.fixture
def link() -> Link:
    link = Link()
    link.flush("client")
    link.settle()
    assert link.handshaken()
    link.now += 0.1
    for side in ("client", "server"):  # nothing left over from the handshake
        link.timers(side)
        link.flush(side)
    link.now += 0.1
    for side in ("client", "server"):
        link.timers(side)
        link.flush(side)
    return link


def test_answer_carries_the_ack_and_no_ack_only_packet_goes_out(link: Link) -> None:
    sid = link.client.get_next_available_stream_id()
    link.client.send_stream_data(sid, b"request")
    before = len(link.sent["server"])
    assert link.flush("client") == 1
    assert [e.data for e in link.events["server"] if isinstance(e, StreamDataReceived)] == [b"request"]
    # aioquic alone would have an ACK-only packet due 1 ms later: not here
    link.now += 0.005
    link.timers("server")
    assert link.flush("server") == 0
    assert link.unacked("client") == 1
    # the answer, 5 ms later, takes the ACK with it: one packet, and the request is acked
    link.server.send_stream_data(sid, b"answer")
    assert link.flush("server") == 1
    assert len(link.sent["server"]) == before + 1
    assert link.unacked("client") == 0
    assert [e.data for e in link.events["client"] if isinstance(e, StreamDataReceived)] == [b"answer"]


def test_two_packets_make_an_ack_due_at_once(link: Link) -> None:
    sid = link.client.get_next_available_stream_id()
    for chunk in (b"one", b"two"):
        link.client.send_stream_data(sid, chunk)
        assert link.flush("client") == 1
    ack_at = link.server._spaces[ONE_RTT].ack_at
    assert ack_at is not None and ack_at <= link.now
    assert link.flush("server") == 1  # the ACK, without waiting
    assert link.unacked("client") == 0


def test_a_lone_packet_is_acked_within_max_ack_delay(link: Link) -> None:
    sid = link.client.get_next_available_stream_id()
    link.client.send_stream_data(sid, b"lone")
    sent_at = link.now
    assert link.flush("client") == 1
    assert link.server._spaces[ONE_RTT].ack_at == pytest.approx(sent_at + ACK_DELAY)
    link.now = sent_at + ACK_DELAY / 2
    assert link.flush("server") == 0
    link.now = sent_at + ACK_DELAY
    assert link.flush("server") == 1
    assert link.unacked("client") == 0
