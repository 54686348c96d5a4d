"""``WindowedConnection.nothing_due`` against aioquic itself: two connections joined in
memory by a lossy, reordering link with a clock the test moves, under random traffic
(data of every size, new streams, FIN, resets, STOP_SENDING, pings, window grants, a
client that moves to a new address).  Every time a received datagram reads as "nothing
due", the test asks aioquic's own ``datagrams_to_send`` at that instant and fails if it
builds a packet; a relay that skipped that pass would have stalled it.  And the check must
be worth having: on UDP-like round trips it recognises nearly every empty pass."""

from __future__ import annotations

import random
from typing import Any

import pytest
from aioquic.quic.events import StreamDataReceived, StreamReset

from npgevent.net.certs import self_signed
from npgevent.quic import connection as qconn
from npgevent.quic.config import make_configuration
from npgevent.quic.connection import WindowedConnection

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not qconn.QUIET_CHECK, reason="aioquic release not in QUIET_RELEASES")]

CLIENT, CLIENT2, SERVER = ("127.0.0.1", 40000), ("127.0.0.1", 40002), ("127.0.0.1", 40001)
_CERT = self_signed("quiet")


class Link:
    """Both ends, the datagrams in flight (lost and delayed at random) and the clock."""

    def __init__(self, seed: int, loss: float = 0.0, jitter: float = 0.0) -> None:
        self.rng = random.Random(seed)
        self.loss, self.jitter = loss, jitter
        self.now = 1000.0
        self.client_addr = CLIENT
        self.client = WindowedConnection(configuration=make_configuration(True, 60.0))
        self.client.connect(SERVER, now=self.now)
        self.server = WindowedConnection(
            configuration=make_configuration(False, 60.0, cert=_CERT[0], key=_CERT[1]),
            original_destination_connection_id=self.client.original_destination_connection_id)
        self.flight: list[tuple[float, int, str, bytes]] = []
        self.seq = 0
        self.received: dict[tuple[str, int], int] = {}  # bytes read per (side, stream)
        self.quiet = self.empty = self.passes = 0

    def conn(self, side: str) -> WindowedConnection:
        return self.client if side == "client" else self.server

    def transmit(self, side: str) -> int:
        """What a relay's pass does: send what is due (some of it lost or delayed)."""
        sent = 0
        for data, _addr in self.conn(side).datagrams_to_send(now=self.now):
            sent += 1
            if self.rng.random() < self.loss:
                continue
            self.seq += 1
            self.flight.append((self.now + self.rng.random() * self.jitter, self.seq, side, data))
        return sent

    def deliver(self, item: tuple[float, int, str, bytes]) -> None:
        _at, _seq, src, data = item
        dst = "server" if src == "client" else "client"
        conn = self.conn(dst)
        conn.receive_datagram(data, self.client_addr if dst == "server" else SERVER, now=self.now)
        while (event := conn.next_event()) is not None:
            if isinstance(event, StreamDataReceived):
                key = (dst, event.stream_id)
                self.received[key] = self.received.get(key, 0) + len(event.data)
            elif isinstance(event, StreamReset):
                self.received.pop((dst, event.stream_id), None)
        self.passes += 1
        quiet = conn.nothing_due(self.now)
        sent = self.transmit(dst)  # what aioquic builds at this instant
        if quiet:
            self.quiet += 1
            assert sent == 0, "nothing_due() said quiet but aioquic sent %d datagram(s)" % sent
        if sent == 0:
            self.empty += 1

    def run(self, until: float) -> None:
        """Move the clock to *until*, delivering datagrams and firing timers on the way."""
        while True:
            timers = [(t, side) for side in ("client", "server")
                      if (t := self.conn(side).get_timer()) is not None]
            next_at = min([t for t, _ in timers] + [f[0] for f in self.flight] + [until])
            self.now = max(self.now, next_at)
            due = sorted(f for f in self.flight if f[0] <= self.now)
            if due:
                self.flight = [f for f in self.flight if f[0] > self.now]
                for item in due:
                    self.deliver(item)
                continue
            fired = False
            for t, side in timers:
                if t <= self.now:
                    self.conn(side).handle_timer(now=self.now)
                    self.transmit(side)
                    fired = True
            if fired:
                self.now += 1e-6  # a real clock moves on (an ACK due at exactly now waits for pacing)
            elif self.now >= until:
                return


def _connected(seed: int, **kw: Any) -> Link:
    link = Link(seed, **kw)
    link.transmit("client")
    link.run(link.now + 2.0)
    assert link.client._handshake_confirmed and link.server._handshake_confirmed
    link.quiet = link.empty = link.passes = 0
    return link


@pytest.mark.parametrize("seed", range(8))
def test_a_quiet_reading_never_hides_a_packet_under_random_traffic(seed):
    _random_traffic(seed, steps=400)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("seed", range(100, 140))
def test_a_quiet_reading_never_hides_a_packet_under_long_random_traffic(seed):
    _random_traffic(seed, steps=1500)


def _random_traffic(seed: int, steps: int) -> None:
    link = _connected(seed, loss=0.05 if seed % 3 else 0.0, jitter=0.004 if seed % 2 else 0.0)
    rng = link.rng
    open_: dict[str, list[int]] = {"client": [], "server": []}  # streams each side may write
    for step in range(steps):
        side = rng.choice(("client", "server"))
        conn = link.conn(side)
        action = rng.random()
        if action < 0.12 or not open_[side]:
            if side == "client" or rng.random() < 0.3:
                sid = conn.get_next_available_stream_id()
                try:
                    conn.send_stream_data(sid, b"\x00")
                except Exception:  # stream limit reached: the peer has not raised it yet
                    pass
                else:
                    open_[side].append(sid)
        elif action < 0.69:
            sid = rng.choice(open_[side])
            try:
                if action < 0.60:
                    conn.send_stream_data(sid, bytes(rng.choice((1, 60, 514, 1400, 3000, 20_000, 300_000))))
                elif action < 0.66:
                    open_[side].remove(sid)
                    conn.send_stream_data(sid, b"end", end_stream=True)
                else:
                    open_[side].remove(sid)
                    conn.reset_stream(sid, 0)
            except RuntimeError:  # the peer's STOP_SENDING reset this stream's sending side
                if sid in open_[side]:
                    open_[side].remove(sid)
        elif action < 0.71:
            peer = "server" if side == "client" else "client"
            if open_[peer]:
                sid = rng.choice(open_[peer])
                try:
                    conn.stop_stream(sid, 0)
                except Exception:  # a stream this side has not seen yet
                    pass
        elif action < 0.73:
            conn.send_ping(step)
        elif action < 0.90:
            for (s, sid), got in list(link.received.items()):
                if s == side:
                    conn.grant(sid, got)
        if seed % 4 == 1 and step == steps // 2:
            link.client_addr = CLIENT2  # the client moves: the server validates the new path
        link.transmit(side)
        link.run(link.now + rng.choice((0.0, 0.0005, 0.002, 0.01, 0.03)))
    link.run(link.now + 5.0)
    assert link.quiet > 20, (link.passes, link.empty, link.quiet)


def test_on_round_trips_it_spares_nearly_every_empty_pass():
    """A UDP session's round trips on pool streams: one 514-byte frame each way at a time,
    as the relay makes them; the pass after each received request finds nothing due (its
    ACK rides on the answer), and the check must say so."""
    link = _connected(99)
    sids = []
    for _ in range(13):  # a connection's pool streams
        sid = link.client.get_next_available_stream_id()
        link.client.send_stream_data(sid, b"\x00")
        sids.append(sid)
    link.transmit("client")
    link.run(link.now + 0.1)
    link.quiet = link.empty = link.passes = 0
    for n in range(300):
        sid = sids[n % 4]
        link.client.send_stream_data(sid, bytes(514))
        link.transmit("client")
        link.run(link.now + 0.0002)
        link.server.send_stream_data(sid, bytes(514))
        link.transmit("server")
        link.run(link.now + 0.0002)
    assert link.empty >= 500, (link.passes, link.empty, link.quiet)
    assert link.quiet >= 0.95 * link.empty, (link.passes, link.empty, link.quiet)


def test_an_ack_due_a_loss_or_a_limit_to_raise_reads_as_due():
    link = _connected(7)
    server = link.server
    sid = link.client.get_next_available_stream_id()
    link.client.send_stream_data(sid, b"\x00" + bytes(600))
    link.transmit("client")
    link.run(link.now + 0.001)
    assert server.nothing_due(link.now)
    assert not server.nothing_due(link.now + qconn.ACK_DELAY + 0.001)  # its ACK is due by then
    server.send_stream_data(sid, b"x")
    assert not server.nothing_due(link.now)  # data waits
    link.transmit("server")
    link.run(link.now + 0.1)
    assert server.grant(sid, 601) and not server.nothing_due(link.now)  # a window to announce
    link.transmit("server")
    link.run(link.now + 0.1)
    assert server.nothing_due(link.now)
    server.send_ping(1)
    assert not server.nothing_due(link.now)


def test_an_aioquic_release_it_was_not_checked_against_always_gets_the_pass(monkeypatch):
    link = _connected(8)
    assert link.server.nothing_due(link.now)
    monkeypatch.setattr(qconn, "QUIET_CHECK", False)
    assert not link.server.nothing_due(link.now)
