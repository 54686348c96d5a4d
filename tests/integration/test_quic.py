"""QUIC pool (quic=1): npgevent <-> npgevent tunnels, back-pressure, failures, shutdown."""

from __future__ import annotations

import os
import signal
import sys
import time

import gevent
import pytest
from gevent import socket
from gevent.server import StreamServer
from helpers import (
    EchoPair,
    NpProcess,
    connect_retry,
    echo_roundtrip,
    free_port,
    in_process,
    make_ca_and_cert,
    tunnel_urls,
    udp_roundtrip,
    udp_socket,
    wait_pool,
)
from test_tunnel import exercise_tcp_concurrent, exercise_tcp_sha, exercise_udp

from npgevent.quic.protocol import NpProtocol

MiB = 1 << 20
COMBOS = [(flow, tls) for flow in ("rev", "fwd") for tls in ("1", "2")]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_ca_and_cert(tmp_path_factory.mktemp("qcerts"))


def _thread_running(native_id: int) -> bool:
    return os.path.exists("/proc/self/task/%d" % native_id)


def _rev_urls(tport: int, uport: int, target: int, server: str = "", client: str = "&min=2") -> tuple[str, str]:
    """A reverse QUIC tunnel: users on *uport* at the server, delivered to *target*."""
    return ("server://k@127.0.0.1:%d/127.0.0.1:%d?mode=1&quic=1%s" % (tport, uport, server),
            "client://k@127.0.0.1:%d/127.0.0.1:%d?mode=2%s" % (tport, target, client))


@pytest.mark.parametrize(("flow", "tls"), COMBOS)
def test_quic_tunnel_in_process(flow, tls, certs, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(certs["ca"]))
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls(flow, tls, tport, uport, echo.port, certs, extra_server="&quic=1")
    try:
        with in_process(server_url) as s, in_process(client_url) as c:
            ids = [s.core.engine.thread.native_id, c.core.engine.thread.native_id]
            assert all(ids) and ids[0] != ids[1] and all(map(_thread_running, ids))  # one OS thread each
            receiver = s if flow == "rev" else c
            wait_pool(lambda: receiver.core.pool.active, 8)
            exercise_tcp_sha(uport, 32 * MiB)
            exercise_tcp_concurrent(uport, 100)
            exercise_udp(uport)
            fp = c.capture.wait_for(r"INFO  TLS cert verified: (sha256:\S+)", timeout=15).group(1)
            assert s.capture.wait_for(r"INFO  TLS cert verified: (sha256:\S+)", timeout=15).group(1) == fp
        gevent.sleep(0.2)
        assert not any(map(_thread_running, ids))  # both QUIC threads are gone
    finally:
        echo.close()


def test_a_quic_process_lets_its_threads_take_turns_within_half_a_millisecond():
    """Every packet crosses the gevent thread and the QUIC thread; the default switch interval
    lets one keep the GIL from the other for 5 ms."""
    from npgevent.quic.thread import SWITCH_INTERVAL

    default = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    try:
        server_url, client_url = _rev_urls(tport, uport, echo.port)
        with in_process(server_url) as s, in_process(client_url):
            wait_pool(lambda: s.core.pool.active, 2)
            assert SWITCH_INTERVAL < 0.001 and sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL)
            assert echo_roundtrip(uport, b"turns") == b"turns"
    finally:
        sys.setswitchinterval(default)
        echo.close()


def _epolls(pid: int) -> int:
    fds = "/proc/%d/fd" % pid
    count = 0
    for fd in os.listdir(fds):
        try:
            count += os.readlink(os.path.join(fds, fd)) == "anon_inode:[eventpoll]"
        except OSError:  # closed meanwhile
            pass
    return count


def test_the_quic_thread_runs_no_gevent_hub():
    """A daemon with a QUIC tunnel has two event loops: gevent's hub and the QUIC thread's
    asyncio loop.  The QUIC thread's self-pipe used to be made by ``socket.socketpair``, which
    wraps its ends in the module's socket class, gevent's in the (monkey-patched) daemon: that
    started a second gevent hub in the QUIC thread, a third epoll descriptor."""
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    try:
        server_url, client_url = _rev_urls(tport, uport, echo.port)
        with NpProcess(server_url) as s, NpProcess(client_url) as c:
            s.wait_for(r"INFO  Tunnel signal -> ")
            assert echo_roundtrip(uport, b"native") == b"native"
            assert udp_roundtrip(uport, b"native-udp") == b"native-udp"
            assert (_epolls(s.pid), _epolls(c.pid)) == (2, 2)
            assert s.stop() == 0 and c.stop() == 0
    finally:
        echo.close()


def test_quic_pool_streams_spread_over_every_connection():
    """The first refill opens its streams concurrently; each must count where the others are
    going, and wait until every connection has been dialled, so that they spread instead of all
    landing on the first connection up (whose every packet then walks all of them)."""
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    try:
        server_url, client_url = _rev_urls(tport, uport, echo.port, server="&max=1024", client="&min=64")
        with in_process(server_url) as s, in_process(client_url) as c:
            wait_pool(lambda: s.core.pool.active, 64)
            connector = c.core.quic
            assert connector.count == 8
            counts = [c.core.engine.stream_count[conn] for conn in connector.conns if conn is not None]
            assert len(counts) == 8 and sum(counts) >= 64
            assert max(counts) - min(counts) <= 2, counts
            assert echo_roundtrip(uport, b"spread") == b"spread"
    finally:
        echo.close()


def test_a_pool_stream_opens_with_its_hello_and_proof_in_one_packet(monkeypatch):
    """An authenticated tunnel's pool stream sends NodePass's 0x00 and its 24-byte pool proof
    in one STREAM frame (they used to take a packet each, and the server an ACK for them)."""
    from aioquic.quic.logger import QuicLogger

    import npgevent.quic.config as quic_config

    loggers = []
    real = quic_config.make_configuration

    def logged(is_client, *args, **kwargs):
        config = real(is_client, *args, **kwargs)
        if is_client:
            config.quic_logger = QuicLogger()
            loggers.append(config.quic_logger)
        return config

    monkeypatch.setattr(quic_config, "make_configuration", logged)
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    try:
        server_url, client_url = _rev_urls(tport, uport, echo.port, server="&max=128", client="&min=8")
        with in_process(server_url) as s, in_process(client_url) as c:
            wait_pool(lambda: s.core.pool.active, 8)
            assert c.core.cipher is not None  # authenticated: every stream proves membership
            assert echo_roundtrip(uport, b"proven") == b"proven"
            firsts = [frame for logger in loggers for trace in logger._traces for event in trace._events
                      if event["name"] == "transport:packet_sent"
                      for frame in event["data"]["frames"]
                      if frame["frame_type"] == "stream" and frame["offset"] == 0]
            assert len(firsts) >= 8
            assert {frame["length"] for frame in firsts} == {1 + 24}, firsts
    finally:
        echo.close()


@pytest.mark.parametrize(("flow", "tls"), COMBOS)
def test_quic_tunnel_cli(flow, tls, certs):
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls(flow, tls, tport, uport, echo.port, certs, extra_server="&quic=1")
    env = {"SSL_CERT_FILE": str(certs["ca"])}
    try:
        with NpProcess(server_url, env=env) as s, NpProcess(client_url, env=env) as c:
            s.wait_for(r"INFO  Tunnel signal -> : np://1@1024/[-+]\?npg=2#%s " % tls)
            receiver = s if flow == "rev" else c
            receiver.wait_for(r"CHECK_POINT\|MODE=\d\|PING=\d+ms\|POOL=([1-9]\d)")
            exercise_tcp_sha(uport, 32 * MiB)
            exercise_tcp_concurrent(uport, 100)
            exercise_udp(uport)
            assert s.stop() == 0 and c.stop() == 0
            for proc in (s, c):
                assert "Traceback" not in proc.output
                assert "Exception in thread" not in proc.output
                assert "QUIC thread did not stop" not in proc.output
    finally:
        echo.close()


def test_quic_slow_reader_is_bounded():
    """A target that never reads: the sender stalls after a bounded amount and the receiving
    side of the QUIC stream never buffers more than its window."""
    stalled = []

    def never_read(sock, _addr):
        stalled.append(sock)
        gevent.sleep(60)

    sink = StreamServer(("127.0.0.1", 0), never_read)
    sink.start()
    tport, uport = free_port(), free_port()
    try:
        server_url, client_url = _rev_urls(tport, uport, sink.address[1], server="&max=128", client="&min=8")
        with in_process(server_url) as s, in_process(client_url) as c:
            wait_pool(lambda: s.core.pool.active, 4)
            user = connect_retry(uport)
            sent = [0]
            block = b"w" * (256 * 1024)

            def writer():
                try:
                    while sent[0] < 256 * MiB:
                        user.sendall(block)
                        sent[0] += len(block)
                except OSError:
                    pass

            w = gevent.spawn(writer)
            gevent.sleep(3.0)
            stuck_at = sent[0]
            gevent.sleep(1.0)
            assert sent[0] == stuck_at  # the writer is blocked: back-pressure reached the user
            assert stuck_at < 64 * MiB  # socket buffers plus bounded QUIC windows, not 256 MiB
            from npgevent.quic.connection import WINDOW

            buffered = [sum(len(ch) for ch in st._chunks) for st in c.core.engine.streams.values()]
            assert max(buffered) <= WINDOW
            w.kill()
            user.close()
    finally:
        sink.stop()


def test_quic_other_stream_flows_while_one_is_stalled():
    stalled = []

    def maybe_stall(sock, _addr):
        first = sock.recv(1)
        if first == b"S":
            stalled.append(sock)
            gevent.sleep(60)
            return
        sock.sendall(first)
        while True:
            data = sock.recv(65536)
            if not data:
                break
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    target = StreamServer(("127.0.0.1", 0), maybe_stall)
    target.start()
    tport, uport = free_port(), free_port()
    try:
        server_url, client_url = _rev_urls(tport, uport, target.address[1], server="&max=128", client="&min=8")
        with in_process(server_url) as s, in_process(client_url) as c:
            wait_pool(lambda: s.core.pool.active, 4)
            assert len(c.core.engine.alive) == 1  # max=128: one QUIC connection carries every stream
            slow = connect_retry(uport)
            payload = b"S" + b"s" * (64 * MiB)  # more than every buffer on the way can hold
            g = gevent.spawn(lambda: slow.sendall(payload))
            gevent.sleep(1.0)
            assert not g.ready()  # stalled
            start = time.monotonic()
            assert echo_roundtrip(uport, b"E" * 100000) == b"E" * 100000
            assert time.monotonic() - start < 5
            g.kill()
            slow.close()
    finally:
        target.stop()


def test_quic_killed_server_heals():
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("fwd", "1", tport, uport, echo.port, extra_server="&quic=1")
    env = {"NP_SERVICE_COOLDOWN": "3s"}
    server = NpProcess(server_url, env=env)
    client = NpProcess(client_url, env=env)
    try:
        client.wait_for(r"CHECK_POINT\|MODE=2\|PING=\d+ms\|POOL=[1-9]")
        assert echo_roundtrip(uport, b"before") == b"before"
        server.signal(signal.SIGKILL)
        server.wait(5)
        server.close()
        server = NpProcess(server_url, env=env)
        start = time.monotonic()
        while time.monotonic() - start < 10:
            try:
                if echo_roundtrip(uport, b"after") == b"after":
                    break
            except OSError:
                pass
            gevent.sleep(0.3)
        else:
            raise AssertionError("QUIC tunnel did not heal within 10 s:\n" + client.output[-3000:])
        assert client.proc.poll() is None
    finally:
        server.close()
        client.close()
        echo.close()


def test_quic_garbage_datagrams_survived():
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", "1", tport, uport, echo.port, extra_server="&quic=1")
    try:
        with in_process(server_url) as s, in_process(client_url):
            wait_pool(lambda: s.core.pool.active, 2)
            junk = udp_socket()
            for size in (1, 20, 1200, 1300, 1452, 3000):
                for _ in range(20):
                    junk.sendto(os.urandom(size), ("127.0.0.1", tport))
            # something that parses as a long-header Initial with a bogus version
            junk.sendto(b"\xc0\xde\xad\xbe\xef" + os.urandom(1300), ("127.0.0.1", tport))
            # short headers routed straight to a live connection by its id (the admission fast
            # path): garbage payloads, a truncated id, the fixed bit clear
            live = list(s.core.engine.thread.servers[0][1]._protocols)
            assert live
            for cid in live[:4]:
                for _ in range(20):
                    junk.sendto(b"\x40" + cid + os.urandom(60), ("127.0.0.1", tport))
                junk.sendto(b"\x40" + cid[:3], ("127.0.0.1", tport))
                junk.sendto(b"\x00" + cid + os.urandom(60), ("127.0.0.1", tport))
            junk.close()
            gevent.sleep(0.5)
            assert echo_roundtrip(uport, b"still here") == b"still here"
            assert udp_roundtrip(uport, b"udp still here") == b"udp still here"
            assert s.capture.count("Server error") == 0
    finally:
        echo.close()


def test_quic_thread_crash_is_logged_and_restarts_the_tunnel():
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", "1", tport, uport, echo.port, extra_server="&quic=1")
    try:
        with in_process(server_url) as s, in_process(client_url) as c:
            wait_pool(lambda: s.core.pool.active, 2)
            engine = s.core.engine
            engine.thread.call(lambda: 1 / 0)  # a bug inside the QUIC thread
            s.capture.wait_for(r"ERROR  QUIC thread error: ZeroDivisionError")
            s.capture.wait_for(r"ERROR  Server error: QUIC: ZeroDivisionError")
            s.capture.wait_for(r"INFO  Server restart: ", timeout=10)
            c.capture.wait_for(r"INFO  Client restart: ", timeout=10)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    if echo_roundtrip(uport, b"healed") == b"healed":
                        break
                except OSError:
                    gevent.sleep(0.3)
            else:
                raise AssertionError("tunnel did not come back")
            assert engine.thread.exited  # the crashed core's thread was stopped
    finally:
        echo.close()


def test_quic_stream_protocol_from_an_independent_client():
    """Speak protocol.md section 5 directly with aioquic: ALPN np-quic, 0x00, 4-byte id."""
    import asyncio
    import ssl
    import threading

    from aioquic.asyncio import connect
    from aioquic.quic.configuration import QuicConfiguration

    from npgevent.protocol.handshake import client_hello, read_reply

    tport, uport = free_port(), free_port()
    with in_process("server://k@127.0.0.1:%d/127.0.0.1:%d?mode=1&quic=1" % (tport, uport)) as s:
        ctl = socket.create_connection(("127.0.0.1", tport), timeout=5)
        ctl.sendall(client_hello(b"k", extensions=False))  # as a Go client would
        line = b""
        while not line.endswith(b"\n"):
            line += ctl.recv(1)
        reply = read_reply(line, b"k")
        assert (reply.quic, reply.tls, reply.npg) == (True, "1", 0)  # quic forces TLS code 1
        result = {}

        async def client():
            cfg = QuicConfiguration(is_client=True, alpn_protocols=["np-quic"], verify_mode=ssl.CERT_NONE)
            async with connect("127.0.0.1", tport, configuration=cfg) as conn:
                reader, writer = await conn.create_stream()
                writer.write(b"\x00")
                result["id"] = await asyncio.wait_for(reader.readexactly(4), 5)
                result["alpn"] = conn._quic.tls.alpn_negotiated

        t = threading.Thread(target=lambda: asyncio.run(client()))
        t.start()
        while t.is_alive():
            gevent.sleep(0.05)
        t.join()
        assert len(result["id"]) == 4 and result["alpn"] == "np-quic"
        wait_pool(lambda: s.core.pool.active, 1)
        assert result["id"].hex() in s.core.pool.idle
        ctl.close()


def test_a_quic_connection_forgets_the_streams_of_past_sessions(monkeypatch):
    """Each session is a new stream; the QUIC thread notes the streams it has seen (a server
    tells a new one by its first data).  It kept every id for the life of the connection: one
    more per session, without bound, on a connection that lives for days.  Now ids aioquic
    has discarded are dropped: the set stays within twice the most streams ever open at once
    (plus 64), however many sessions went by."""
    peak: dict[int, int] = {}  # per connection object: the most streams aioquic held at a remember()
    seen: dict[int, set[int]] = {}
    remember = NpProtocol.remember

    def watched(self: NpProtocol, sid: int) -> None:
        remember(self, sid)
        peak[id(self)] = max(peak.get(id(self), 0), len(self._quic._streams))
        seen.setdefault(id(self), set()).add(sid)

    monkeypatch.setattr(NpProtocol, "remember", watched)
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = _rev_urls(tport, uport, echo.port)
    try:
        with in_process(server_url) as s, in_process(client_url) as c:
            wait_pool(lambda: s.core.pool.active, 2)
            for _ in range(48):  # 1,200 sessions over the 8 connections, 25 at a time
                exercise_tcp_concurrent(uport, 25)
            for end in (s, c):
                protocols = list(end.core.engine.thread.protocols.values())
                assert protocols
                for protocol in protocols:
                    known, most = len(protocol.known), peak.get(id(protocol), 0)
                    assert known <= 2 * most + 64, (known, most)
                # the old set held every id a connection carried: over that bound here
                assert any(len(seen.get(id(p), ())) > 2 * peak.get(id(p), 0) + 64 for p in protocols)
    finally:
        echo.close()


def test_quic_large_datagrams_only_between_npgevent_peers():
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("fwd", "1", tport, uport, echo.port, extra_server="&quic=1")
    try:
        with in_process(server_url, quic_datagram_size="16000") as s, \
                in_process(client_url, quic_datagram_size="16000") as c:
            wait_pool(lambda: c.core.pool.active, 2)
            assert c.core.npg == 2
            server_config = s.core.engine.thread.servers[0][1]._configuration
            assert server_config.max_datagram_size == 16000
            assert all(p._quic._max_datagram_size == 16000 for p in c.core.engine.thread.protocols.values())
            exercise_tcp_sha(uport, 8 * MiB)
    finally:
        echo.close()


@pytest.mark.parametrize("size", ["16384"])
def test_quic_largest_datagram_size_carries_data(size):
    """The top of the setting's range works end to end (aioquic fails above ~16.4 KB, so the
    range stops at 16384: a larger value is a WARN and the default)."""
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", "1", tport, uport, echo.port, extra_server="&quic=1")
    try:
        with in_process(server_url, quic_datagram_size=size) as s, \
                in_process(client_url, quic_datagram_size=size):
            wait_pool(lambda: s.core.pool.active, 2)
            exercise_tcp_sha(uport, 8 * MiB)
    finally:
        echo.close()


def test_quic_datagram_size_above_what_aioquic_carries_is_refused_with_a_warning():
    from npgevent.settings import resolve

    opts, warnings = resolve("server", {}, {"quic_datagram_size": "20000"})
    assert opts.quic_datagram_size == 1452
    assert any("'20000' is out of range (must be 1200..16384): using default 1452" in w for w in warnings)


def test_quic_go_client_keeps_standard_datagrams():
    from npgevent.protocol.handshake import client_hello

    tport, uport = free_port(), free_port()
    with in_process("server://k@127.0.0.1:%d/127.0.0.1:%d?mode=1&quic=1" % (tport, uport),
                    quic_datagram_size="16000") as s:
        ctl = socket.create_connection(("127.0.0.1", tport), timeout=5)
        ctl.sendall(client_hello(b"k", extensions=False))  # a Go client: no npgevent marker
        assert ctl.recv(100).endswith(b"\n")
        gevent.sleep(0.3)
        assert s.core.npg == 0
        assert s.core.engine.thread.servers[0][1]._configuration.max_datagram_size == 1452
        ctl.close()


@pytest.mark.slow
def test_quic_1gib_over_one_stream_keeps_rss_bounded():
    """1 GiB through a QUIC tunnel (CLI processes): peak RSS stays near the idle figure."""
    from helpers import sha_transfer, status_kb

    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("fwd", "1", tport, uport, echo.port, extra_server="&quic=1")
    env = {"NP_QUIC_DATAGRAM_SIZE": "16000"}

    try:
        with NpProcess(server_url, env=env) as s, NpProcess(client_url, env=env) as c:
            c.wait_for(r"CHECK_POINT\|MODE=2\|PING=\d+ms\|POOL=[1-9]")
            sha_transfer(uport, 16 * MiB)
            before = status_kb(s.pid, "VmHWM") + status_kb(c.pid, "VmHWM")
            sent, got = sha_transfer(uport, 1 << 30)
            assert sent == got
            after = status_kb(s.pid, "VmHWM") + status_kb(c.pid, "VmHWM")
            assert after - before < 64 * 1024, (before, after)  # KiB: bounded, not ~1 GiB
    finally:
        echo.close()
