#!/usr/bin/env python3
"""What aioquic alone costs per QUIC event: the floor under npgevent's QUIC goals.

    python bench/quic_floor.py [--streams 8] [--rounds 5000] [--mib 32] [--as-relay] [--datagram-frames]

Two connections of npgevent's own class and settings (:class:`WindowedConnection`,
``make_configuration``: 1452-byte datagrams, its windows and ACK rule) talk to each other in
memory, in one thread: no sockets, no asyncio loop, no QUIC thread, no gevent side.  Each
end has *streams* open pool streams (a pool spreads 64 over 8 connections).

* **round trip**: one 512-byte datagram (with NodePass's 2-byte length) one way on a stream
  and back, as a UDP round trip through a QUIC tunnel makes it: the sender's
  ``datagrams_to_send``, the receiver's ``receive_datagram`` and events, its answer, then the
  same the other way.  Printed: CPU microseconds per round trip for both ends together.
  With ``--as-relay``, again with what a relay adds around the same aioquic calls and cannot
  drop: a ``datagrams_to_send`` pass after every received packet, and caches that the other
  processes on the core have emptied.  With ``--datagram-frames``, again with the datagram
  carried in an RFC 9221 DATAGRAM frame instead of on a stream (no stream state, flow
  control or retransmission: a route npgevent peers could negotiate; Go NodePass has no such
  mode), to tell what of aioquic's cost per round trip is the stream's.
* **echo**: *mib* MiB sent on one stream as fast as the windows allow and sent back by the
  other end as it arrives, as the echo through a QUIC tunnel makes it (each end consumes and
  grants as the gevent side does; ACKs ride on the data going back).  Printed: CPU
  milliseconds per MiB echoed for both ends together, and per 1452-byte packet.

A relay process does all of this and more (the asyncio loop and the syscalls, the hand-over
to gevent, the relay), so its CPU per event is above these figures; bench/README.md sets
them against Go's CPU per event for the same loads.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from aioquic.quic import events

from npgevent.net.certs import self_signed
from npgevent.quic.config import make_configuration
from npgevent.quic.connection import WindowedConnection

ADDR = ("127.0.0.1", 4433)


def _pair(streams: int, frames: bool = False) -> tuple[WindowedConnection, WindowedConnection, list[int]]:
    cert, key = self_signed("quic-floor")
    configs = make_configuration(True, 60.0), make_configuration(False, 60.0, cert=cert, key=key)
    for config in configs:
        config.max_datagram_frame_size = 65536 if frames else None
    client = WindowedConnection(configuration=configs[0])
    server = WindowedConnection(configuration=configs[1],
                                original_destination_connection_id=client.original_destination_connection_id)
    client.connect(ADDR, now=time.monotonic())
    for _ in range(10):
        _pump(client, server, time.monotonic())
        _pump(server, client, time.monotonic())
    sids = []
    for _ in range(streams):
        sid = client.get_next_available_stream_id()
        client.send_stream_data(sid, b"\x00")  # NodePass's stream hello
        sids.append(sid)
    _pump(client, server, time.monotonic())
    _pump(server, client, time.monotonic())
    _drain(client)
    _drain(server)
    return client, server, sids


def _pump(src: WindowedConnection, dst: WindowedConnection, now: float) -> int:
    sent = 0
    for data, _addr in src.datagrams_to_send(now=now):
        dst.receive_datagram(data, ADDR, now=now)
        sent += 1
    return sent


def _drain(conn: WindowedConnection) -> list[Any]:
    out: list[Any] = []
    while True:
        event = conn.next_event()
        if event is None:
            return out
        out.append(event)


def _received(conn: WindowedConnection, sid: int, consumed: dict[int, int]) -> list[bytes]:
    """The data *conn* received on stream *sid*, consumed and granted as the gevent side
    does (*consumed*: bytes per connection so far)."""
    out = []
    for event in _drain(conn):
        if isinstance(event, events.StreamDataReceived) and event.stream_id == sid:
            consumed[id(conn)] += len(event.data)
            conn.grant(sid, consumed[id(conn)])
            out.append(event.data)
    return out


def _frames_received(conn: WindowedConnection) -> list[bytes]:
    return [e.data for e in _drain(conn) if isinstance(e, events.DatagramFrameReceived)]


def round_trips(streams: int, rounds: int, as_relay: bool = False,
                frames: bool = False) -> tuple[float, float]:
    """CPU us per round trip (both ends), and packets per round trip.  *as_relay*: also what a
    relay cannot avoid around the same calls: the pass of ``datagrams_to_send`` after every
    received packet (it finds nothing to send when no ACK is due yet, but only aioquic can
    tell) and the timer read after each pass, with the data caches emptied between steps as
    the other processes on the core empty them (a 4 MiB buffer written; its time is left out).
    *frames*: the datagram rides in a DATAGRAM frame, not on a stream."""
    client, server, sids = _pair(streams, frames)
    sid = sids[0]
    datagram = b"\x02\x00" + b"\x00" * 512
    consumed = {id(client): 1, id(server): 1}
    packets = 0
    junk = bytearray(4 << 20)
    stride = b"\x01" * (len(junk) // 64)
    outside = 0.0

    def step(conn: WindowedConnection, now: float) -> None:
        nonlocal outside
        if as_relay:
            list(conn.datagrams_to_send(now=now))
            conn.get_timer()
            mark = time.process_time()
            junk[::64] = stride
            outside += time.process_time() - mark

    start = time.process_time()
    for _ in range(rounds):
        now = time.monotonic()
        if frames:
            client.send_datagram_frame(datagram)
        else:
            client.send_stream_data(sid, datagram)
        packets += _pump(client, server, now)
        step(server, now)
        if frames:
            for data in _frames_received(server):
                server.send_datagram_frame(data)
        else:
            for data in _received(server, sid, consumed):
                server.send_stream_data(sid, data)
        packets += _pump(server, client, now)
        step(client, now)
        back = _frames_received(client) if frames else _received(client, sid, consumed)
        assert back, "a round trip came back empty"
    spent = time.process_time() - start - outside
    return spent / rounds * 1e6, packets / rounds


def echo(streams: int, mib: int) -> tuple[float, float]:
    """CPU ms per MiB echoed (both ends), and packets per MiB (both ways)."""
    client, server, sids = _pair(streams)
    sid = sids[0]
    chunk = b"\x00" * 65536
    total = mib << 20
    queued = back = 0
    consumed = {id(client): 1, id(server): 1}
    packets = 0
    start = time.process_time()
    while back < total:
        now = time.monotonic()  # pacing and the ACK timer run on the real clock, as in a relay
        while queued < total and queued - back < (1 << 20):  # the gevent side's allowance
            client.send_stream_data(sid, chunk)
            queued += len(chunk)
        packets += _pump(client, server, now)
        for data in _received(server, sid, consumed):
            server.send_stream_data(sid, data)  # the target echoes
        packets += _pump(server, client, now)
        back += sum(map(len, _received(client, sid, consumed)))
    spent = time.process_time() - start
    return spent / mib * 1e3, packets / mib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=8, help="open pool streams per connection")
    ap.add_argument("--rounds", type=int, default=5000)
    ap.add_argument("--mib", type=int, default=32)
    ap.add_argument("--as-relay", action="store_true",
                    help="round trips with the relay's pass after each packet and emptied caches")
    ap.add_argument("--datagram-frames", action="store_true",
                    help="round trips in RFC 9221 DATAGRAM frames as well as on a stream")
    args = ap.parse_args()
    us, per = round_trips(args.streams, args.rounds)
    print("round trip, 512 B: %.0f us of CPU for both ends (%.1f packets)" % (us, per))
    if args.datagram_frames:
        us, per = round_trips(args.streams, args.rounds, frames=True)
        print("round trip, 512 B, in DATAGRAM frames: %.0f us of CPU for both ends (%.1f packets)" % (us, per))
    if args.as_relay:
        us, per = round_trips(args.streams, args.rounds, as_relay=True)
        print("round trip, 512 B, as a relay makes it: %.0f us of CPU for both ends" % us)
    ms, per = echo(args.streams, args.mib)
    print("echo, %d MiB: %.1f ms of CPU per MiB echoed for both ends (%.0f packets per MiB, %.1f us each)"
          % (args.mib, ms, per, ms * 1e3 / per))


if __name__ == "__main__":
    main()
