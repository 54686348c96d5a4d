"""UDP floods: a few log lines, not one per datagram; every datagram delivered or counted."""

from __future__ import annotations

import re

import gevent
import pytest
from gevent import socket
from helpers import NpProcess, _BigDatagramServer, free_port, in_process, tunnel_urls, udp_socket

from npgevent.net.sockopt import tune_udp

pytestmark = pytest.mark.timeout(90)


class UdpSink:
    def __init__(self) -> None:
        self.count = 0
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tune_udp(sock, 32 << 20)  # the sink must not be where datagrams are lost
        sock.bind(("127.0.0.1", 0))
        self.server = _BigDatagramServer(sock, self._handle)
        self.server.start()
        self.port = self.server.address[1]

    def _handle(self, data, addr):
        self.count += 1

    def close(self):
        self.server.close()


def dropped(lines: list[str]) -> int:
    total = 0
    for line in lines:
        m = re.search(r"UDP datagrams dropped in the last interval: (.*)", line)
        if m:
            total += sum(int(n) for n in re.findall(r"(\d+) \(", m.group(1)))
    return total


def burst(count: int, rounds: int, port: int, sink: UdpSink) -> int:
    """*rounds* datagrams from each of *count* new sources; wait until nothing moved for 1 s
    and one more report interval (the drop summary goes out).  Returns how many were sent."""
    sent = 0
    sources = [udp_socket() for _ in range(count)]
    try:
        for n in range(rounds):
            for src in sources:
                src.sendto(b"burst %d" % n, ("127.0.0.1", port))
                sent += 1
            gevent.sleep(0.01)
        settled, last = 0, -1
        while settled < 10 and sink.count < sent:
            settled = settled + 1 if sink.count == last else 0
            last = sink.count
            gevent.sleep(0.1)
        gevent.sleep(1.2)
    finally:
        for src in sources:
            src.close()
    return sent


def test_slot_limit_flood_is_a_few_lines_and_counted():
    sink = UdpSink()
    port = free_port()
    try:
        with in_process("client://127.0.0.1:%d/127.0.0.1:%d?slot=1&log=debug" % (port, sink.port)) as r:
            holder = udp_socket()
            holder.sendto(b"hold the only slot", ("127.0.0.1", port))
            gevent.sleep(0.2)
            flood = [udp_socket() for _ in range(200)]
            try:
                for _ in range(20):
                    for s in flood:
                        s.sendto(b"x", ("127.0.0.1", port))
                    gevent.sleep(0)
                gevent.sleep(2.5)  # two report intervals: the summary goes out
            finally:
                for s in [*flood, holder]:
                    s.close()
            lines = r.capture.lines
            assert sum(1 for line in lines if "UDP slot limit reached" in line) <= 3  # not 4000
            assert any("more in the last 5 s" in line for line in lines) or \
                sum(1 for line in lines if "UDP slot limit reached" in line) == 1
            assert dropped(lines) >= 3000  # 4000 sent; what the kernel dropped is counted too
    finally:
        sink.close()


def test_burst_from_2000_new_sources_is_delivered_or_counted():
    """20,000 datagrams from 2,000 new source addresses at once (a real forwarder process): what
    does not reach the target is counted in the DEBUG drop summary, by cause."""
    sink = UdpSink()
    port = free_port()
    try:
        with NpProcess("client://127.0.0.1:%d/127.0.0.1:%d?log=debug" % (port, sink.port)) as p:
            p.wait_for(r"Client started")
            sent = burst(2000, 10, port, sink)
            reported = dropped(p.lines)
            assert sink.count + reported >= sent * 0.99, (sink.count, reported, sent)
            assert sink.count >= sent * 0.9, (sink.count, reported, sent)
    finally:
        sink.close()


@pytest.mark.parametrize("tls", ["0", "1"])
def test_burst_through_a_tunnel_is_delivered_or_counted(tls):
    """4,000 datagrams from 200 new sources at once through a tunnel (real processes): the
    server's sessions write to pool connections from the listener's hub callback and read
    them back there; what does not reach the target is counted in the drop summary."""
    sink = UdpSink()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", tls, tport, uport, sink.port, extra_server="&log=debug")
    try:
        with NpProcess(server_url) as s, NpProcess(client_url) as c:
            s.wait_for(r"CHECK_POINT\|MODE=\d\|PING=\d+ms\|POOL=([1-9]\d*)")
            sent = burst(200, 20, uport, sink)
            reported = dropped(s.lines)
            assert sink.count + reported >= sent * 0.99, (sink.count, reported, sent)
            assert sink.count >= sent * 0.9, (sink.count, reported, sent)
            assert s.stop() == 0 and c.stop() == 0
            for proc in (s, c):
                assert "Traceback" not in proc.output
    finally:
        sink.close()
