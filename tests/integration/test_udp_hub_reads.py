"""UDP sessions through a tunnel read their far end in hub callbacks (npgevent.relay.hubread).

Once a session is answered, neither end switches into a greenlet per datagram: the server's
session reads its pool connection from the hub, and so do both directions of the client's
exchange (a write to the pool connection that can't complete at once is finished by the
exchange's greenlet).  The tests count greenlet switches while datagrams go round, and check
that every byte still arrives and is counted.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import gevent
import gevent.event
import greenlet
import pytest
from helpers import (
    EchoPair,
    NpProcess,
    UdpEcho,
    free_port,
    in_process,
    make_ca_and_cert,
    paused,
    tunnel_urls,
    udp_socket,
    wait_pool,
)

pytestmark = pytest.mark.timeout(60)

ROUNDS = 200


def _is_exchange(target: Any) -> bool:
    """One of the client's two greenlets of a UDP exchange (cores.tunnel_udp.udp_exchange)."""
    args = getattr(target, "args", None)
    return bool(args) and getattr(args[0], "__name__", "") in ("up", "down")


def _round_trips(port: int, watched: Any) -> dict[str, int]:
    """One session: a first datagram, then ROUNDS round trips while switches are counted."""
    sock = udp_socket(timeout=5)
    try:
        sock.sendto(b"first", ("127.0.0.1", port))
        assert sock.recv(100) == b"first"
        sock.sendto(b"second", ("127.0.0.1", port))  # the session is answered: hub mode from here
        assert sock.recv(100) == b"second"
        counts = {"session": 0, "exchange": 0}
        session_greenlet = watched()

        def trace(event: str, args: Any) -> None:
            if event not in ("switch", "throw"):
                return
            target = args[1]
            if target is session_greenlet:
                counts["session"] += 1
            elif _is_exchange(target):
                counts["exchange"] += 1

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
            assert counts == {"session": 0, "exchange": 0}
            sent = len(b"first") + len(b"second") + sum(
                len(b"round trip %d " % i) + i % 700 for i in range(ROUNDS))
            for end in (s, c):
                assert end.inst.traffic.udp_rx == end.inst.traffic.udp_tx == sent
    finally:
        echo.close()


def answering_target(trigger: bytes, on_trigger: Any) -> Any:
    """A started UDP target that echoes every datagram but *trigger*, on which it calls
    ``on_trigger(target, addr)`` instead (to answer with a burst, a flood...)."""
    from gevent.server import DatagramServer

    def answer(data: bytes, addr: Any) -> None:
        if data == trigger:
            on_trigger(target, addr)
        else:
            target.sendto(data, addr)

    target = DatagramServer(("127.0.0.1", 0), answer)
    target.start()
    return target


def count_pool_writes(monkeypatch: Any) -> list[int]:
    """From now on, the length of every write a UDP session makes to a pool connection without
    waiting (npgevent.cores.tunnel_udp.write_nowait), at both ends of an in-process tunnel."""
    from npgevent.cores import tunnel_udp

    writes: list[int] = []
    real = tunnel_udp.write_nowait

    def counted(stream: Any, data: bytes) -> int | None:
        writes.append(len(data))
        return real(stream, data)

    monkeypatch.setattr(tunnel_udp, "write_nowait", counted)
    return writes


@pytest.mark.parametrize("tls", ["0", "1"])
def test_a_burst_from_the_target_goes_to_the_pool_in_few_writes(tls, monkeypatch):
    """The target answers with 64 datagrams at once: the client's exchange reads them in
    hub wake-ups of up to 16 and writes each wake-up's frames to the pool connection in one
    write (npgevent.protocol.udpframe.FrameBatch), not one per datagram.  Every datagram
    reaches the user whole and in order, and is counted."""
    burst = [b"burst %02d " % i + b"." * (i * 7) for i in range(64)]

    def send_burst(target: Any, addr: Any) -> None:
        for datagram in burst:  # all queued on the client's socket before it reads
            target.sendto(datagram, addr)

    target = answering_target(b"burst", send_burst)
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", tls, tport, uport, target.address[1])
    try:
        with in_process(server_url) as s, in_process(client_url) as c:
            wait_pool(lambda: s.core.pool.active, 4)
            sock = udp_echoed(uport, b"hello")
            sock.sendto(b"again", ("127.0.0.1", uport))  # answered: hub mode from here
            assert sock.recv(100) == b"again"
            writes = count_pool_writes(monkeypatch)
            sock.sendto(b"burst", ("127.0.0.1", uport))
            got = [sock.recv(2000) for _ in burst]
            sock.close()
            assert got == burst
            # both ends run here: the server's write of the user's datagram, then the client's
            assert writes[0] == 2 + len(b"burst")
            assert 4 <= len(writes[1:]) <= 8  # 64 datagrams in wake-ups of 16 (not 64 writes)
            assert sum(writes[1:]) == sum(2 + len(d) for d in burst)
            sent = len(b"hello") + len(b"again") + sum(len(d) for d in burst)
            assert c.inst.traffic.udp_rx == sent
    finally:
        target.close()


@contextlib.contextmanager
def answered_upload(tls: str) -> Iterator[tuple[Any, Any, list[bytes]]]:
    """A reverse tunnel in this process whose target keeps what the user sends, once it has
    answered ``hello`` and ``again`` (the user's session is answered: hub mode).  Yields the
    server runner, the user's socket (sending to the tunnel) and the datagrams that arrived."""
    from gevent.server import DatagramServer

    arrived: list[bytes] = []

    def take(data: bytes, addr: Any) -> None:
        if data in (b"hello", b"again"):
            target.sendto(data, addr)
        else:
            arrived.append(data)

    target = DatagramServer(("127.0.0.1", 0), take)
    target.start()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", tls, tport, uport, target.address[1])
    try:
        with in_process(server_url) as s, in_process(client_url):
            wait_pool(lambda: s.core.pool.active, 4)
            sock = udp_echoed(uport, b"hello")
            sock.connect(("127.0.0.1", uport))
            try:
                sock.send(b"again")
                assert sock.recv(100) == b"again"
                yield s, sock, arrived
            finally:
                sock.close()
    finally:
        target.close()


def wait_arrivals(arrived: list[bytes], count: int) -> None:
    deadline = time.monotonic() + 5
    while len(arrived) < count and time.monotonic() < deadline:
        gevent.sleep(0.01)


GREETED = len(b"hello") + len(b"again")  # what answered_upload's user sent first


def stall_pool_writes(monkeypatch: Any) -> tuple[gevent.event.Event, list[int]]:
    """From now on every write a UDP session makes to a pool connection from a greenlet
    (npgevent.cores.tunnel_udp.send_all) waits until the returned event is set, as behind a
    full socket buffer; the list gets the length of each write once it goes out."""
    from npgevent.cores import tunnel_udp

    drained, waited = gevent.event.Event(), []
    real = tunnel_udp.send_all

    def waiting_write(stream: Any, data: Any) -> None:
        drained.wait()
        waited.append(len(data))
        real(stream, data)

    monkeypatch.setattr(tunnel_udp, "send_all", waiting_write)
    return drained, waited


@pytest.mark.parametrize("tls", ["0", "1"])
def test_a_burst_from_the_user_goes_to_the_pool_in_few_writes(tls, monkeypatch):
    """The user sends 64 datagrams at once to the server's UDP listener: its session gathers
    what one listener wake-up reads (up to gevent's 100 per wake-up, 16 KiB per write) and
    writes them to the pool connection together.  The target gets every datagram whole and
    in order."""
    burst = [b"upload %02d " % i + b"." * (i * 7) for i in range(64)]
    with answered_upload(tls) as (s, sock, arrived):
        writes = count_pool_writes(monkeypatch)
        for datagram in burst:  # all queued on the listener's socket before it reads
            sock.send(datagram)
        wait_arrivals(arrived, len(burst))
        assert arrived == burst
        assert 1 <= len(writes) <= 8  # not one write per datagram
        assert sum(writes) == sum(2 + len(d) for d in burst)
        assert s.inst.traffic.udp_rx == GREETED + sum(len(d) for d in burst)


@pytest.mark.parametrize("tls", ["0", "1"])
def test_datagrams_queued_behind_a_stalled_pool_write_go_out_together(tls, monkeypatch):
    """While a write to the pool connection waits (a full socket buffer), the user's datagrams
    queue for the session's writer greenlet; once the connection drains, the writer sends the
    run of them in one write of up to 16 KiB, not one write (one TLS record) per datagram,
    which would leave the queue behind for good under a steady stream.  Every datagram
    reaches the target whole and in order, and is counted."""
    from npgevent.cores import tunnel_udp

    burst = [b"queued %02d " % i + b"." * (i * 7) for i in range(64)]
    stalled = [True]
    real_nowait = tunnel_udp.write_nowait

    def full_buffer(stream: Any, data: bytes) -> int | None:
        return 0 if stalled[0] else real_nowait(stream, data)

    with answered_upload(tls) as (s, sock, arrived):
        monkeypatch.setattr(tunnel_udp, "write_nowait", full_buffer)
        drained, waited = stall_pool_writes(monkeypatch)
        for datagram in burst:  # one listener wake-up each: all queue behind the first
            sock.send(datagram)
            gevent.sleep(0.002)
        gevent.sleep(0.05)
        assert arrived == []  # all waiting for the pool connection
        stalled[0] = False
        drained.set()
        wait_arrivals(arrived, len(burst))
        assert arrived == burst
        assert sum(waited) == sum(2 + len(d) for d in burst)
        assert waited[0] == 2 + len(burst[0])  # the write that stalled, finished first
        assert 2 <= len(waited) <= 4  # then the other 63 in 16 KiB writes, not 63 writes
        assert s.inst.traffic.udp_rx == GREETED + sum(len(d) for d in burst)


@pytest.mark.parametrize("tls", ["0", "1"])
def test_what_a_new_session_gets_before_and_while_it_opens_keeps_its_order(tls, monkeypatch):
    """A new session's datagrams wait in its backlog until its pool connection is ready.  If
    writing that backlog has to wait, what the user sends meanwhile goes out after it, not
    past it (nor into the middle of one of its frames), and the backlog goes out in few
    writes."""
    opening = [b"opening %02d " % i + b"." * (i * 5) for i in range(32)]
    later = [b"later %02d" % i for i in range(16)]
    with answered_upload(tls) as (_s, sock, arrived):
        drained, waited = stall_pool_writes(monkeypatch)
        fresh = udp_socket(timeout=5)
        fresh.connect(sock.getpeername())
        try:
            for datagram in opening:  # read in one listener wake-up: a new session's backlog
                fresh.send(datagram)
            gevent.sleep(0.1)  # the session has its pool connection; writing the backlog waits
            for datagram in later:
                fresh.send(datagram)
                gevent.sleep(0.005)
            drained.set()
            wait_arrivals(arrived, len(opening) + len(later))
        finally:
            fresh.close()
        assert arrived == opening + later
        assert sum(waited) == sum(2 + len(d) for d in opening + later)
        assert len(waited) <= 4


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
            assert counts["session"] >= ROUNDS and counts["exchange"] >= 2 * ROUNDS
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


def test_rate_limited_burst_is_shaped_in_a_greenlet_not_the_hub(capfd):
    """The listener hands datagrams over in its hub callback, where nothing may wait: a
    burst over rate= used to sleep there (BlockingSwitchOutError, a traceback, a listener
    that backs off). Now the session's writer greenlet shapes it."""
    with UdpEcho() as echo:
        port = free_port()
        with in_process("client://127.0.0.1:%d/127.0.0.1:%d?mode=1&rate=4" % (port, echo.port)) as r:
            sock = udp_socket(timeout=5)
            sock.sendto(b"open", ("127.0.0.1", port))
            assert sock.recv(100) == b"open"
            start = time.monotonic()
            for i in range(50):
                sock.sendto(b"%03d" % i + b"x" * 7997, ("127.0.0.1", port))
            got = sorted(bytes(sock.recv(65535))[:3] for _ in range(50))
            elapsed = time.monotonic() - start
            assert got == [b"%03d" % i for i in range(50)]
            assert elapsed >= 0.5  # 400 KB at 4 Mbit/s (500 KB/s) past a 50 KB burst: still shaped
            assert r.inst.traffic.udp_tx == 4 + 50 * 8000
            sock.close()
    err = capfd.readouterr().err
    assert "BlockingSwitchOutError" not in err and "Traceback" not in err


def stop_cleanly(*procs: NpProcess) -> None:
    """Each process exits 0 on SIGTERM, with no traceback and nothing blocked in the hub."""
    for proc in procs:
        assert proc.stop() == 0
        assert "Traceback" not in proc.output
        assert "BlockingSwitchOutError" not in proc.output


POOL_READY = r"CHECK_POINT\|MODE=\d\|PING=\d+ms\|POOL=([1-9]\d*)"


def udp_echoed(uport: int, payload: bytes) -> Any:
    """A new UDP source whose *payload* came back through the tunnel's user port."""
    sock = udp_socket(timeout=5)
    sock.sendto(payload, ("127.0.0.1", uport))
    assert sock.recv(100) == payload
    return sock


def test_a_stalled_tunnel_peer_costs_datagrams_not_the_daemon():
    """The client process is stopped while a user floods a UDP session: the server's writes
    to the pool connection fill its buffer, the rest waits in the session's writer greenlet
    (bounded: beyond it datagrams are dropped and counted), and nothing waits in the hub."""
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", "0", tport, uport, echo.port,
                                         extra_server="&log=debug", extra_client="&log=debug")
    try:
        with NpProcess(server_url) as s, NpProcess(client_url) as c:
            s.wait_for(POOL_READY)
            sock = udp_echoed(uport, b"before")
            with paused(c.pid):
                blob = b"f" * 60000
                for _ in range(600):  # 36 MB: far more than the pool connection's buffers
                    sock.sendto(blob, ("127.0.0.1", uport))
                gevent.sleep(0.5)
            s.wait_for(r"UDP datagrams dropped in the last interval: .*\(session backlog full\)", timeout=15)
            udp_echoed(uport, b"after").close()
            sock.close()
            stop_cleanly(s, c)
    finally:
        echo.close()


def test_a_stalled_server_cuts_the_clients_pool_writes_short_without_harm():
    """The target answers one datagram with a 1.2 s flood while the tunnel server is stopped:
    the client's hub callback can't finish its writes to the pool connection; its exchange
    greenlet finishes them (no waiting in the hub, nothing torn in the framing), and after
    the server resumes the session carries on."""
    blasts: list[int] = []
    started = gevent.event.Event()

    def blast(target: Any, addr: Any) -> None:  # 1.2 s: more than the pool connection's buffers hold
        started.set()
        end = time.monotonic() + 1.2
        while time.monotonic() < end:
            for _ in range(8):
                target.sendto(b"b" * 60000, addr)  # from the target's address: the client's
            gevent.sleep(0.001)  # socket is connected to it
        blasts.append(1)

    target = answering_target(b"blast", lambda target, addr: gevent.spawn(blast, target, addr))
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", "0", tport, uport, target.address[1])
    try:
        with NpProcess(server_url) as s, NpProcess(client_url) as c:
            s.wait_for(POOL_READY)
            sock = udp_echoed(uport, b"hello")
            sock.sendto(b"blast", ("127.0.0.1", uport))
            assert started.wait(5)
            with paused(s.pid):  # mid-flood: the client's pool writes back up
                gevent.sleep(1.0)
            deadline = time.monotonic() + 10
            while not blasts and time.monotonic() < deadline:
                gevent.sleep(0.05)
            assert blasts
            # the replies (whatever the user's socket buffer kept) are whole datagrams
            sock.settimeout(0.5)
            try:
                while True:
                    data = sock.recv(65535)
                    assert data == b"b" * 60000
            except OSError:
                pass
            sock.settimeout(5)
            sock.sendto(b"after", ("127.0.0.1", uport))
            for _ in range(50):
                data = sock.recv(65535)
                if data == b"after":
                    break
                assert data == b"b" * 60000
            assert data == b"after"
            sock.close()
            stop_cleanly(s, c)
    finally:
        target.stop()
