"""The QUIC endpoint's admission: a Go client's timing, and hostile datagrams.

The server admits the control connection's IP before the handshake reply
leaves, validates addresses with Retry, caps connections still handshaking,
and never lets a datagram raise inside the QUIC thread.  Attackers here are
small raw-UDP or aioquic clients written in the test.
"""

from __future__ import annotations

import asyncio
import os
import socket as std
import ssl
import subprocess
import sys
import threading
import time

import gevent
import pytest
from gevent import socket
from helpers import EchoPair, echo_roundtrip, free_port, in_process, tunnel_urls, udp_roundtrip, wait_pool

from npgevent.protocol.handshake import client_hello, read_reply
from npgevent.quic.admission import MAX_HANDSHAKING_PER_IP, NEW_CONNECTION_RATE

pytestmark = pytest.mark.timeout(90)


def run_in_thread(fn, timeout: float = 30.0):
    """Run *fn* in a native thread (real blocking sockets, its own asyncio loop) while the
    gevent hub keeps serving the in-process daemon; return its result or raise its error."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed back to the test
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    end = time.monotonic() + timeout
    while t.is_alive() and time.monotonic() < end:
        gevent.sleep(0.02)
    assert not t.is_alive(), "client thread still running after %ss" % timeout
    if "error" in box:
        raise box["error"]
    return box["value"]


async def open_pool_stream(port: int, connect_timeout: float = 10.0) -> bytes:
    """A QUIC pool stream as a Go client opens it: ALPN np-quic, 0x00, read the 4-byte id."""
    from aioquic.asyncio import connect
    from aioquic.quic.configuration import QuicConfiguration

    cfg = QuicConfiguration(is_client=True, alpn_protocols=["np-quic"], verify_mode=ssl.CERT_NONE)

    async def run() -> bytes:
        async with connect("127.0.0.1", port, configuration=cfg) as conn:
            reader, writer = await conn.create_stream()
            writer.write(b"\x00")
            return await reader.readexactly(4)

    return await asyncio.wait_for(run(), connect_timeout)


def read_line(sock: std.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("closed before the reply")
        line += chunk
    return line


def go_style_hello(port: int) -> std.socket:
    sock = std.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(client_hello(b"k", extensions=False))
    return sock


def test_client_that_dials_the_instant_it_reads_the_reply_is_admitted():
    tport, uport = free_port(), free_port()
    with in_process("server://k@127.0.0.1:%d/127.0.0.1:%d?mode=1&quic=1" % (tport, uport)) as s:
        def client():
            ctl = go_style_hello(tport)
            try:
                reply = read_reply(read_line(ctl), b"k")
                cid = asyncio.run(open_pool_stream(tport))  # no pause at all, as quic-go does
                return reply, cid
            finally:
                ctl.close()

        reply, cid = run_in_thread(client)
        assert reply.quic and len(cid) == 4  # the server answered the stream hello with its id
        assert s.core.engine.drops["foreign"] == 0
        assert s.capture.count(r"QUIC thread error|Server error: QUIC") == 0, "\n".join(s.capture.lines)


def test_client_that_dials_before_the_reply_gets_in_once_admitted():
    """Its first Initials arrive before the handshake: dropped (no state), and its retransmission
    after the reply is let in."""
    tport, uport = free_port(), free_port()
    with in_process("server://k@127.0.0.1:%d/127.0.0.1:%d?mode=1&quic=1" % (tport, uport)) as s:
        def client():
            async def go():
                dial = asyncio.ensure_future(open_pool_stream(tport, connect_timeout=15))
                await asyncio.sleep(0.3)  # the Initials are in flight, the server drops them
                ctl = go_style_hello(tport)
                try:
                    await asyncio.get_running_loop().run_in_executor(None, read_line, ctl)
                    return await dial
                finally:
                    ctl.close()

            return asyncio.run(go())

        assert len(run_in_thread(client)) == 4
        assert s.core.engine.drops["foreign"] >= 1  # the early Initials were dropped unparsed
        assert s.capture.count(r"QUIC thread error|Server error: QUIC") == 0


def garbage_initial() -> bytes:
    """The issue's repro: QUIC v1 long header, type Initial, random CIDs and payload, 1200 bytes."""
    head = b"\xc3" + b"\x00\x00\x00\x01" + b"\x08" + os.urandom(8) + b"\x08" + os.urandom(8) + b"\x00"
    body_len = 1200 - len(head) - 2
    return head + bytes([0x40 | (body_len >> 8), body_len & 0xFF]) + os.urandom(body_len)


@pytest.fixture
def quic_tunnel():
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", "1", tport, uport, echo.port, extra_server="&quic=1")
    try:
        with in_process(server_url) as s, in_process(client_url) as c:
            wait_pool(lambda: s.core.pool.active, 4)
            yield s, c, tport, uport
    finally:
        echo.close()


def test_garbage_initials_from_a_foreign_address_change_nothing(quic_tunnel):
    s, _c, tport, uport = quic_tunnel
    attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    attacker.bind(("127.0.0.2", 0))
    try:
        for _ in range(200):
            attacker.sendto(garbage_initial(), ("127.0.0.1", tport))
        gevent.sleep(0.5)
        assert s.core.engine.drops["foreign"] >= 200
        assert echo_roundtrip(uport, b"still here") == b"still here"
        assert udp_roundtrip(uport, b"udp still here") == b"udp still here"
        assert s.capture.count(r"QUIC thread error|Server error|Server restart") == 0
        # one rate-limited DEBUG line, not 200
        assert s.capture.count(r"QUIC datagram from 127\.0\.0\.2 dropped") <= 2
    finally:
        attacker.close()


def test_garbage_sent_in_runs_is_judged_one_datagram_at_a_time(quic_tunnel):
    """An attacker that sends its garbage as runs (UDP GSO: the kernel hands each run to the
    QUIC socket whole, the socket reads runs) gets every datagram of a run refused and counted
    on its own, and changes nothing else."""
    from npgevent.quic import offload

    s, _c, tport, uport = quic_tunnel
    server_transport = s.core.engine.thread.servers[0][0]
    read_before = server_transport.runs_read
    attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    attacker.bind(("127.0.0.2", 0))
    try:
        try:
            attacker.sendmsg([garbage_initial()] * 2, offload.segment_cmsg(1200), 0, ("127.0.0.1", tport))
        except OSError:
            pytest.skip("this kernel has no UDP_SEGMENT")
        for i in range(100):
            attacker.sendmsg([garbage_initial() for _ in range(40)], offload.segment_cmsg(1200), 0,
                             ("127.0.0.1", tport))
            if i % 10 == 9:
                gevent.sleep(0.02)
        gevent.sleep(0.5)
        assert server_transport.runs_read - read_before >= 50  # read as runs ...
        assert s.core.engine.drops["foreign"] >= 0.9 * 4002  # ... and refused datagram by datagram
        assert echo_roundtrip(uport, b"still here") == b"still here"
        assert udp_roundtrip(uport, b"udp still here") == b"udp still here"
        assert s.capture.count(r"QUIC thread error|Server error|Server restart") == 0
        assert s.capture.count(r"QUIC datagram from 127\.0\.0\.2 dropped") <= 2
    finally:
        attacker.close()


def test_garbage_initials_from_the_admitted_address_keep_no_state(quic_tunnel):
    """UDP sources can be forged: 20,000 Initials "from the client" get stateless Retries (or an
    INVALID_TOKEN close when they carry a token), and no connection object is kept."""
    s, _c, tport, uport = quic_tunnel
    thread = s.core.engine.thread
    before = len(thread.protocols)
    flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flood.bind(("127.0.0.1", 0))
    try:
        for i in range(20000):
            packet = garbage_initial()
            if i % 2:  # with a forged token: validated, refused
                packet = packet[:-1200 + 20] + b"\x10" + os.urandom(16) + packet[-1200 + 37:]
            flood.sendto(packet, ("127.0.0.1", tport))
            if i % 500 == 0:
                gevent.sleep(0)
        gevent.sleep(1)
        assert len(thread.protocols) <= before + 2  # nothing created for the flood
        assert thread.handshaking_total == 0
        assert echo_roundtrip(uport, b"after the flood") == b"after the flood"
        assert s.capture.count(r"QUIC thread error|Server error|Server restart") == 0
    finally:
        flood.close()


FLOOD = """
import os, socket, sys, time
def initial():
    head = b"\\xc3\\x00\\x00\\x00\\x01\\x08" + os.urandom(8) + b"\\x08" + os.urandom(8) + b"\\x00"
    size = 1200 - len(head) - 2
    return head + bytes([0x40 | (size >> 8), size & 0xFF]) + os.urandom(size)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("127.0.0.1", 0))
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    sock.sendto(initial(), ("127.0.0.1", int(sys.argv[1])))
"""


def test_a_flood_of_forged_initials_does_not_take_the_quic_thread(quic_tunnel):
    """An attacker process sends garbage Initials "from the client" as fast as it can: past a
    budget they are dropped after a look at their first bytes, instead of each costing a parse, a
    Retry and a send (~100 us of Python), so the tunnel's own packets keep flowing."""
    s, _c, tport, uport = quic_tunnel
    attacker = subprocess.Popen([sys.executable, "-c", FLOOD, str(tport), "4"])
    took = []
    try:
        gevent.sleep(0.5)  # the flood is on
        while attacker.poll() is None:
            start = time.monotonic()
            assert echo_roundtrip(uport, b"during the flood") == b"during the flood"
            took.append(time.monotonic() - start)
            gevent.sleep(0.1)
    finally:
        attacker.kill()
        attacker.wait()
    assert len(took) >= 10, took  # before the budget: three round trips in 8 s, one of 7.9 s
    assert max(took) < 1.0, took
    assert s.core.engine.drops["flood"] > 10 * NEW_CONNECTION_RATE
    assert s.capture.count(r"QUIC thread error|Server error|Server restart") == 0


def stalled_handshakes(port: int, count: int) -> int:
    """*count* connections that follow Retry (so they pass address validation) and then go
    silent mid-handshake, with aioquic's sans-IO client; returns how many got a Retry."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    socks = []
    retried = 0
    try:
        for _ in range(count):
            sock = std.socket(std.AF_INET, std.SOCK_DGRAM)  # a port of its own: one IP, many peers
            socks.append(sock)
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(2)
            cfg = QuicConfiguration(is_client=True, alpn_protocols=["np-quic"], verify_mode=ssl.CERT_NONE)
            conn = QuicConnection(configuration=cfg)
            addr = ("127.0.0.1", port)
            conn.connect(addr, now=time.time())
            for data, _ in conn.datagrams_to_send(now=time.time()):
                sock.sendto(data, addr)
            try:
                answer, _ = sock.recvfrom(65535)  # the Retry
            except TimeoutError:
                continue
            retried += 1
            conn.receive_datagram(answer, addr, now=time.time())
            for data, _ in conn.datagrams_to_send(now=time.time()):  # Initial with the token
                sock.sendto(data, addr)
            # ... and never another packet: the server's connection waits for its idle timeout
        return retried
    finally:
        for sock in socks:
            sock.close()


def test_stalled_handshakes_are_capped_per_address(quic_tunnel):
    s, _c, tport, uport = quic_tunnel
    thread = s.core.engine.thread
    retried = run_in_thread(lambda: stalled_handshakes(tport, MAX_HANDSHAKING_PER_IP + 20))
    assert retried == MAX_HANDSHAKING_PER_IP + 20  # each followed a Retry
    gevent.sleep(0.5)
    assert thread.handshaking_total <= MAX_HANDSHAKING_PER_IP
    assert s.core.engine.drops["busy"] >= 20
    assert echo_roundtrip(uport, b"capped") == b"capped"
    assert s.capture.count(r"QUIC thread error|Server error|Server restart") == 0


def test_future_noise_is_not_a_thread_crash(quic_tunnel):
    _s, c, _tport, uport = quic_tunnel
    thread = c.core.engine.thread
    thread.call(thread._loop_error, None, {"message": "Future exception was never retrieved",
                                           "exception": ConnectionError()})
    gevent.sleep(0.3)
    assert thread.drops["noise"] == 1
    assert c.capture.count(r"QUIC thread error|Client error|Client restart") == 0
    assert echo_roundtrip(uport, b"no restart") == b"no restart"


def test_a_quic_thread_that_hangs_is_abandoned_and_its_port_freed():
    tport, uport = free_port(), free_port()
    with in_process("server://k@127.0.0.1:%d/127.0.0.1:%d?mode=1&quic=1" % (tport, uport)) as s:
        engine = s.core.engine
        engine.thread.call(time.sleep, 6)  # the thread's loop is stuck for 6 s
        gevent.sleep(0.1)
        engine.stop(timeout=1)
        s.capture.wait_for(r"QUIC thread did not stop within 1s: abandoned, its sockets closed")
        probe = std.socket(std.AF_INET, std.SOCK_DGRAM)
        try:
            probe.bind(("127.0.0.1", tport))  # a restart can bind the port again
        finally:
            probe.close()
