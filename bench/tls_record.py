#!/usr/bin/env python3
"""CPU of one small TLS record written and read, as a relay does it per datagram, in one process.

    python bench/tls_record.py [--size 512] [--rounds 4000] [--sweep-mib 4]

A pair of :class:`npgevent.net.tls.TLSStream` over loopback TCP, from npgevent's own
contexts (TLS 1.3, ``SSL_MODE_RELEASE_BUFFERS``), and a plain loopback TCP pair.  Each round
writes one *size*-byte message on one end (``send_nowait``, what a relay's hub callback
calls for a framed datagram) and reads it at the other (``recv_nowait``, then the
``drained`` check), timing the write and the read apart with the thread's CPU clock; the
plain pair does the same with one ``send`` and one ``recv``.  Every other round first sweeps
*sweep-mib* MiB of memory, as the other processes on the core do between two wake-ups of a
relay under a round-trip load, so the write and the read find the caches cold.  Printed:
the median CPU of each step, hot and cold, and what TLS adds to the plain step
(bench/README.md, twenty-fourth pass).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import gevent  # noqa: E402
from gevent import socket  # noqa: E402

from npgevent.net import tlsctx  # noqa: E402
from npgevent.net.certs import self_signed  # noqa: E402
from npgevent.net.tls import TLSStream  # noqa: E402


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    listener.close()
    for s in (client, accepted):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client, accepted


def tls_pair() -> tuple[TLSStream, TLSStream]:
    cert, key = self_signed()
    client, accepted = tcp_pair()
    server_end = TLSStream.server(accepted, tlsctx.server_context(cert, key))
    client_end = TLSStream.client(client, tlsctx.client_context("1"))
    done = gevent.spawn(server_end.handshake, 10)
    client_end.handshake(10)
    done.get()
    return client_end, server_end


def measure(size: int, rounds: int, sweep_mib: int) -> dict[str, float]:
    junk = bytearray(sweep_mib << 20)
    ones = b"\x01" * (len(junk) // 64)

    def sweep() -> None:  # a write to every cache line: what other processes leave behind
        junk[::64] = ones

    writer, reader = tls_pair()
    pw, pr = tcp_pair()
    raw_w, raw_r = pw._sock, pr._sock  # the non-blocking stdlib sockets a hub callback uses
    msg = os.urandom(size)
    time.sleep(0.2)  # session tickets and the like are in: the reads below find only data
    while reader.recv_nowait(65536) is not None:
        pass

    def tls_write() -> None:
        writer.send_nowait(msg)

    def tls_read() -> None:
        got = 0
        while got < size:
            data = reader.recv_nowait(65536)
            got += len(data) if data else 0
        reader.drained()

    def plain_write() -> None:
        raw_w.send(msg)

    def plain_read() -> None:
        got = 0
        while got < size:
            try:
                got += len(raw_r.recv(65536))
            except BlockingIOError:
                pass

    steps: dict[str, Callable[[], None]] = {"tls write": tls_write, "tls read": tls_read,
                                            "plain write": plain_write, "plain read": plain_read}
    times: dict[str, list[int]] = {"%s %s" % (k, c): [] for k in steps for c in ("hot", "cold")}
    clock = time.thread_time_ns
    try:
        for i in range(rounds):
            cold = i % 2 == 1
            for name, step in steps.items():
                if cold:
                    sweep()
                t = clock()
                step()
                times["%s %s" % (name, "cold" if cold else "hot")].append(clock() - t)
    finally:
        for s in (writer, reader, pw, pr):
            s.close()
    return {k: statistics.median(v) / 1e3 for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=4000)
    ap.add_argument("--sweep-mib", type=int, default=4)
    args = ap.parse_args()
    r = measure(args.size, args.rounds, args.sweep_mib)
    for cache in ("hot", "cold"):
        tls = r["tls write %s" % cache] + r["tls read %s" % cache]
        plain = r["plain write %s" % cache] + r["plain read %s" % cache]
        print("%-4s us: tls write %.1f, read %.1f; plain write %.1f, read %.1f; TLS adds %.1f per record" % (
            cache, r["tls write %s" % cache], r["tls read %s" % cache], r["plain write %s" % cache],
            r["plain read %s" % cache], tls - plain))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
