"""Shared fixtures.  The test process is not monkey-patched: helpers use gevent explicitly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers import TcpEcho, UdpEcho, free_port


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
