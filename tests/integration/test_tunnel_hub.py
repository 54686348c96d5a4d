"""A tunnel's TCP sessions started and relayed in hub callbacks (npgevent.cores.tunnel_hub),
tls=0 (byte for byte) and tls=1 (framed on reused pool connections): no session job on either
side, the same bytes and counters, pool connections reused, a stop that ends them, and a
launch signal that the control socket can't take at once."""

from __future__ import annotations

import contextlib
import os
import types

import gevent
import pytest
from gevent import socket
from gevent.lock import Semaphore
from gopeer import GoServer, recv_exact
from helpers import (
    EchoPair,
    connect_retry,
    echo_roundtrip,
    in_process,
    inproc_tunnel,
    recv_all,
    tcp_pair,
    wait_pool,
    wait_until,
)

from npgevent.cores import tunnel_hub
from npgevent.pool.tcp import ClientPool
from npgevent.protocol.signals import Launch, LineDecoder, encode_line

pytestmark = pytest.mark.timeout(60)

SESSION_JOBS = {"_launch", "run_tcp"}


def _pool_full(s, c) -> None:
    """Both sides hold the whole pool (64): the sessions below start while nothing else does."""
    wait_pool(lambda: min(s.core.pool.active, c.core.pool.active), 64)


def session_job_count(greenlet_jobs: list) -> int:
    """How many session jobs ran on worker greenlets."""
    return sum(getattr(fn, "__name__", "") in SESSION_JOBS for fn in greenlet_jobs)


def _handshakes(client) -> int:
    return sum(client.inst.events.tls_handshakes.values())


@pytest.mark.parametrize("tls", ["0", "1"])
@pytest.mark.parametrize("flow", ["rev", "fwd"])
def test_sessions_take_no_job_on_either_side(flow, tls, greenlet_jobs):
    with inproc_tunnel(flow, tls) as (s, c, uport, _echo):
        assert s.core.reuse == c.core.reuse == (tls == "1")
        assert echo_roundtrip(uport, b"warm") == b"warm"
        _pool_full(s, c)
        gevent.sleep(0.1)
        handshakes = _handshakes(c)
        greenlet_jobs.clear()
        payloads = [b"hub-%02d|" % i * (i + 1) for i in range(30)]
        for p in payloads:
            assert echo_roundtrip(uport, p) == p
        # a session waits in a job only when its start would wait: a target connect still in
        # progress (loopback connects at once unless the kernel defers the handshake).  A launch
        # naming the refill whose id is not read yet no longer does (ClientPool.settle): 1-7
        # jobs in 30 before, in half the runs
        assert session_job_count(greenlet_jobs) <= 1, greenlet_jobs
        if tls == "1":  # framed sessions, each connection back in both pools after it
            assert _handshakes(c) == handshakes
        for side in (s, c):
            assert side.inst.traffic.tcp_tx == side.inst.traffic.tcp_rx == sum(map(len, payloads)) + 4
        gevent.sleep(0.1)
        assert s.inst.slots.tcp == c.inst.slots.tcp == 0
        assert len(s.core.sessions) == len(c.core.sessions) == 0
        assert not (s if flow == "rev" else c).core.pool.lent


@pytest.mark.parametrize("tls", ["0", "1"])
def test_a_stop_ends_the_sessions_left_on_both_sides(tls, greenlet_jobs):
    with inproc_tunnel("rev", tls) as (s, c, uport, _echo):
        _pool_full(s, c)
        users = [connect_retry(uport) for _ in range(3)]
        for u in users:
            u.sendall(b"open")
            assert u.recv(4) == b"open"
        assert len(s.core.sessions) == 3 and len(c.core.sessions) == 3
        c.stop(0.2)  # the dialling side ends its sessions: the users see the close
        for u in users:
            u.settimeout(5)
            assert recv_all(u) == b""
            u.close()
        gevent.sleep(0.2)
        assert len(s.core.sessions) == len(c.core.sessions) == 0
        assert s.inst.slots.tcp == c.inst.slots.tcp == 0
        assert session_job_count(greenlet_jobs) <= 1  # see above: hub sessions were stopped


@pytest.mark.parametrize("tls", ["0", "1"])
def test_bulk_in_a_hub_session_arrives_whole(tls, spliced):
    with inproc_tunnel("rev", tls) as (_s, _c, uport, _echo):
        payload = bytes(range(256)) * 40000  # ~10 MiB: both directions turn bulk
        sock = connect_retry(uport)
        sender = gevent.spawn(lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
        assert recv_all(sock) == payload
        sender.get(timeout=10)
        sock.close()
    if tls == "0":  # user, pool and target sockets are all plain: bulk rides splice(2)
        assert sum(spliced) >= len(payload)


def test_a_launch_signal_the_control_socket_cannot_take_goes_out_whole_and_in_order():
    """A full control socket: the line's rest goes out from a greenlet that holds the write
    lock, so a signal sent meanwhile (send_signal waits for the lock) follows it intact."""
    near, far = tcp_pair()
    near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    filler = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            filler += near._sock.send(b"f" * 4096)
    failures: list = []
    core = types.SimpleNamespace(control=near, _wlock=Semaphore(), fail=failures.append,
                                 signal_line=lambda sig: encode_line(sig.encode(), b"secret"))
    sig = Launch(False, "127.0.0.1:4000", "ab" * 16, False)
    done = gevent.event.Event()
    gevent.get_hub().loop.run_callback(lambda: (tunnel_hub.send_signal_nowait(core, sig), done.set()))
    done.wait(5)
    assert core._wlock.locked()  # the rest waits in a greenlet
    got = b""
    while len(got) < filler:
        got += far.recv(65536)
    line = encode_line(sig.encode(), b"secret")
    deadline = gevent.Timeout(5)
    with deadline:
        while len(got) < filler + len(line):
            got += far.recv(65536)
    assert got[filler:] == line
    assert not core._wlock.locked() and failures == []
    decoded = LineDecoder(b"secret").feed(got[filler:])
    assert [d.cid for d in decoded] == [sig.cid]
    near.close()
    far.close()


@pytest.mark.parametrize("tls", ["0", "1"])
def test_the_dialling_sides_slot_limit_holds_for_hub_sessions(tls, greenlet_jobs):
    """slot=1 on the dialling side: a second session is refused there (the user sees the
    close, one ERROR line) while the first carries on; its slot comes back at its end."""
    with inproc_tunnel("rev", tls, extra_client="&slot=1") as (_s, c, uport, _echo):
        first = connect_retry(uport)
        first.sendall(b"one")
        assert first.recv(3) == b"one"
        second = connect_retry(uport)
        second.settimeout(5)
        second.sendall(b"two")
        assert recv_all(second) == b""
        c.capture.wait_for(r"ERROR  TCP slot limit reached \(1\): launch [0-9a-f]+ refused")
        first.sendall(b"still")
        assert first.recv(5) == b"still"
        first.close()
        second.close()
        deadline = gevent.Timeout(5)
        with deadline:
            while c.inst.slots.tcp:
                gevent.sleep(0.05)
        assert echo_roundtrip(uport, b"again") == b"again"


def test_launch_signals_naming_ids_never_dialled_leave_the_client_serving(monkeypatch):
    """Each launch whose id is not idle here makes the pool read its set-ups' sockets
    (``ClientPool.settle``) before the session waits in a job: a server that names 300 ids it
    never gave costs that many bounded reads, the jobs end at NP_POOL_GET_TIMEOUT, and a real
    launch behind them is served."""
    settles = [0]
    settle = ClientPool.settle

    def counted(self: ClientPool) -> None:
        settles[0] += 1
        settle(self)

    monkeypatch.setattr(ClientPool, "settle", counted)
    echo = EchoPair()
    go = GoServer(b"secret", "np://0@64/-#0")
    try:
        url = "client://secret@127.0.0.1:%d/127.0.0.1:%d?mode=2" % (go.port, echo.port)
        with in_process(url, pool_get_timeout="300ms") as c:
            ids = go.wait_pool(8)
            assert go.control is not None
            for n in range(300):
                go.control.send(Launch(False, "127.0.0.1:%d" % (20000 + n), os.urandom(4).hex()).encode())
            go.control.send(Launch(False, "127.0.0.1:19999", ids[0]).encode())
            pool = go.pool[ids[0]]
            pool.sendall(b"still serving")
            pool.settimeout(10)
            assert recv_exact(pool, 13) == b"still serving"
            pool.close()
            wait_until(lambda: not c.core.sessions and c.inst.slots.tcp == 0, 10, what="bogus launches ended")
            assert settles[0] >= 300
    finally:
        go.close()
        echo.close()
