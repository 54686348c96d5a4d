"""Shared fixtures.  The test process is not monkey-patched: helpers use gevent explicitly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers import TcpEcho, UdpEcho, free_port, tcp_pair


@pytest.fixture
def tcp_echo():
    with TcpEcho() as server:
        yield server


@pytest.fixture
def udp_echo():
    with UdpEcho() as server:
        yield server


@pytest.fixture
def port():
    return free_port()


@pytest.fixture
def listener():
    """A loopback TCP listener (port 0)."""
    from gevent import socket

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(64)
    yield lsock
    lsock.close()


@pytest.fixture
def full_listener():
    """A listener whose accept queue is full: the kernel drops new SYNs, a connect hangs."""
    import time

    from gevent import socket

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    filler = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(lsock.getsockname())
        filler.append(s)
    time.sleep(0.2)
    yield lsock
    for s in filler:
        s.close()
    lsock.close()


@pytest.fixture
def pairs():
    """Two loopback pairs around a relay: user_near (the user), user_far (relayed),
    target_near (relayed), target_far (the target)."""
    user_near, user_far = tcp_pair()
    target_near, target_far = tcp_pair()
    yield user_near, user_far, target_near, target_far
    for s in (user_near, user_far, target_near, target_far):
        s.close()


@pytest.fixture
def greenlet_jobs(monkeypatch):
    """The functions run on worker greenlets (npgevent.relay.runners.run) during the test:
    session jobs, and relay directions that left the hub."""
    from npgevent.relay import runners

    calls: list = []
    real = runners.run

    def counting(fn, *args):
        calls.append(fn)
        return real(fn, *args)

    monkeypatch.setattr(runners, "run", counting)
    return calls


@pytest.fixture(autouse=True)
def _fresh_process_memory():
    """What a daemon remembers per process (servers that authenticated, peers already warned
    about) is per test here: a later test's server can get a port an earlier one used, and
    the client would then refuse it as a downgrade."""
    yield
    import npgevent.cores.client as client
    import npgevent.cores.server as server

    client.AUTHENTICATED_SERVERS.clear()
    client.WARNED_GO_SERVERS.clear()
    server.WARNED_GO_CLIENTS.clear()


@pytest.fixture
def spliced(monkeypatch) -> list[int]:
    """Bytes moved by ``os.splice`` during the test (the zero-copy bulk relay)."""
    import os

    moved: list[int] = []
    real = os.splice

    def counting(*args, **kwargs):
        n = real(*args, **kwargs)
        moved.append(n)
        return n

    monkeypatch.setattr(os, "splice", counting)
    return moved
