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
