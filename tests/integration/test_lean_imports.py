"""An authenticated tls=0 tunnel keeps to the modules it uses (the performance issue's
memory goal, 32 MB per idle process): it seals its control lines with the process's own
libcrypto, not ``cryptography`` (~7 MB), and a process that is nobody's worker does not load
the workers module. Checked on real processes with ``python -X importtime``, which writes
every import to stderr as it happens, across a session that sends and opens control lines."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from npgevent.protocol import aead
from tests.helpers import NpProcess, TcpEcho, echo_roundtrip, free_port

pytestmark = pytest.mark.timeout(90)

IMPORTTIME = [sys.executable, "-X", "importtime", "-m", "npgevent"]


def imported(proc: NpProcess) -> set[str]:
    return {line.rsplit("|", 1)[1].strip() for line in proc.lines if line.startswith("import time:")}


def lean_tunnel(tls: str) -> list[tuple[set[str], str]]:
    """A reverse tunnel of two real processes under ``-X importtime``: three TCP sessions
    through it (each a sealed control line, server -> client), then a clean stop.  For each
    end: the modules it imported and its memory map while it ran."""
    tport, uport = free_port(), free_port()
    with TcpEcho() as echo, \
            NpProcess("server://k@127.0.0.1:%d/127.0.0.1:%d?mode=1&tls=%s" % (tport, uport, tls),
                      program=IMPORTTIME) as server, \
            NpProcess("client://k@127.0.0.1:%d/127.0.0.1:%d?mode=2" % (tport, echo.port),
                      program=IMPORTTIME) as client:
        server.wait_for(r"Tunnel handshaked")
        client.wait_for(r"Tunnel handshaked")
        server.wait_for(r"CHECK_POINT\|MODE=1\|PING=\d+ms\|POOL=[1-9]")
        for i in range(3):
            payload = b"lean %d" % i
            assert echo_roundtrip(uport, payload) == payload
        server.wait_for(r"CHECK_POINT\|.*\|TCPRX=[1-9]")
        maps = [Path("/proc/%d/maps" % p.proc.pid).read_text() for p in (server, client)]
        assert server.stop() == 0 and client.stop() == 0
        for proc in (server, client):
            assert "Traceback" not in proc.output
        return [(imported(proc), mapped) for proc, mapped in zip((server, client), maps, strict=True)]


def test_authenticated_tls0_tunnel_imports_neither_cryptography_nor_workers() -> None:
    if not aead.native():
        pytest.skip("this Python's hashlib is not linked against a shared OpenSSL")
    for names, _mapped in lean_tunnel("0"):
        assert "npgevent.protocol.aead" in names  # the capture works, and auth ran
        assert not {n for n in names if n.split(".")[0] == "cryptography"}
        assert "npgevent.workers" not in names and "npgevent.workerboard" not in names


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="pyOpenSSL uses warnings.deprecated")
def test_tls1_tunnel_ends_load_pyopenssl_without_asyncio_or_ssl() -> None:
    """pyOpenSSL on Python < 3.13 would import asyncio, and with it ``ssl`` and the system's
    libssl (~2.6 MB of RSS per end), through its ``deprecated`` decorator (npgevent.net.pyopenssl)."""
    for names, mapped in lean_tunnel("1"):
        assert "OpenSSL.SSL" in names  # the capture works, and TLS ran
        assert not {n for n in names if n.split(".")[0] in ("asyncio", "ssl", "_ssl")}
        assert "libssl.so" not in mapped and "_ssl." not in mapped
