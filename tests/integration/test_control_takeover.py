"""auth=1: a client that proves the key takes the control slot from one that did not.

The squatter is a small client written here that speaks Go's handshake with the right key
(with auth=1 anyone can learn the key that way) and sits on the control slot.  Telling a
takeover attempt from a pool connection needs either TLS (its first byte) or another source
address; the second case runs in a network namespace the test creates (127.0.0.2 there is a
second loopback address nobody else can reach), and is skipped where namespaces can't be had.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from gevent import socket
from helpers import EchoPair, echo_exact, free_port, in_process, tunnel_urls, wait_pool

from npgevent.protocol.handshake import client_hello, read_reply

pytestmark = pytest.mark.timeout(90)
KEY = "s3cret-key-of-twenty"
IN_NETNS = os.environ.get("NPG_TEST_NETNS") == "1"


def squat(port: int, source: str = "127.0.0.1") -> socket.socket:
    """Take a free control slot with Go's handshake and the right key; return the socket."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    sock.sendall(client_hello(KEY.encode(), extensions=False))
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        assert chunk, "the server closed the squatter's handshake"
        line += chunk
    assert read_reply(line, KEY.encode()).max > 0
    return sock


def dropped(sock: socket.socket, within: float = 15) -> bool:
    """True once the server closed *sock* (whatever it sent before, pings say)."""
    sock.settimeout(within)
    with contextlib.suppress(OSError):
        while sock.recv(4096):
            pass
        return True
    return False


def carries(port: int, n: int = 5) -> None:
    for i in range(n):
        payload = b"user session %d after the takeover" % i
        assert echo_exact(port, payload) == payload


def takeover(tls: str, squatter_source: str, attack: Any = None, **server_env: str) -> None:
    """A Go-style squatter holds the slot; the real client (auth=1) takes it over.  *attack*
    runs just before the client starts (and is closed after the check)."""
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", tls, tport, uport, echo.port, key=KEY,
                                         extra_server="&auth=1", extra_client="&auth=1")
    # long report interval: the squatter answers no pings, and must not lose the slot by silence
    try:
        with in_process(server_url, report_interval="30s", **server_env) as s:
            squatter = squat(tport, squatter_source)
            attacker = attack(tport) if attack is not None else contextlib.nullcontext()
            try:
                s.capture.wait_for(r"Tunnel handshaked: .*<-> %s" % squatter_source.replace(".", r"\."))
                assert s.core.cipher is None
                with attacker, in_process(client_url, report_interval="30s") as c:
                    s.capture.wait_for(r"WARN\s+Tunnel control taken over: .* proved the key; the "
                                       r"unauthenticated peer %s:\d+ is dropped" % squatter_source.replace(".", r"\."),
                                       timeout=20)
                    assert dropped(squatter)
                    wait_pool(lambda: s.core.pool.active, 2)
                    assert s.core.cipher is not None and c.core.cipher is not None
                    assert s.core.peer_ip == "127.0.0.1"
                    carries(uport)
                    assert s.capture.count(r"Server restart") == 0  # in place: no tunnel restart
            finally:
                squatter.close()
    finally:
        echo.close()


@pytest.mark.parametrize("tls", ["1"])
def test_an_authenticated_client_takes_the_slot_from_a_go_style_squatter_over_tls(tls):
    """Same source address: the client's handshake line is told from a pool connection by its
    first byte (TLS opens with 0x16)."""
    takeover(tls, "127.0.0.1")


class ChallengerFlood:
    """30 connections that send a garbage line and 30 that send one non-TLS byte and wait:
    all read as takeover attempts (the first byte is not TLS).  Records what each received."""

    def __init__(self, port: int) -> None:
        self.socks = []
        for i in range(60):
            with contextlib.suppress(OSError):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.sendall(b"garbage %d \xff\x00 not a handshake\n" % i if i % 2 else b"A")
                self.socks.append(sock)

    def __enter__(self) -> ChallengerFlood:
        return self

    def __exit__(self, *exc: Any) -> None:
        got = []
        for sock in self.socks:
            sock.settimeout(5)
            with contextlib.suppress(OSError):
                got.append(sock.recv(4096))
            sock.close()
        assert got and all(data == b"" for data in got), got[:5]  # no reply, no challenge, no id


def test_a_challenger_flood_does_not_keep_the_real_client_from_taking_over():
    """Garbage and stalled takeover attempts from the client's own address: capped per address,
    each ends at the handshake deadline, none gets a byte back, and the client still takes
    the slot over."""
    takeover("1", "127.0.0.1", attack=ChallengerFlood, handshake_timeout="1s")


def test_a_go_style_challenger_never_displaces_the_holder():
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, _ = tunnel_urls("rev", "1", tport, uport, echo.port, key=KEY, extra_server="&auth=1")
    try:
        with in_process(server_url, report_interval="30s") as s:
            first = squat(tport)
            try:
                s.capture.wait_for(r"Tunnel handshaked")
                holder = s.core.peer
                rival = socket.create_connection(("127.0.0.1", tport), timeout=5)
                try:
                    rival.sendall(client_hello(KEY.encode(), extensions=False))
                    rival.settimeout(10)
                    assert rival.recv(4096) == b""  # no reply: a Go-style reply would reveal the key
                finally:
                    rival.close()
                s.capture.wait_for(r"WARN\s+Tunnel control slot held by %s: .* refused: refused: the client "
                                   r"speaks only Go NodePass's handshake" % holder.replace(".", r"\."))
                assert s.core.peer == holder and s.capture.count(r"taken over") == 0
            finally:
                first.close()
    finally:
        echo.close()


def test_auth0_keeps_go_behaviour_first_handshake_wins():
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", "1", tport, uport, echo.port, key=KEY,
                                         extra_server="&auth=0", extra_client="&auth=1")
    try:
        with in_process(server_url, report_interval="30s") as s:
            squatter = squat(tport)
            try:
                s.capture.wait_for(r"Tunnel handshaked")
                holder = s.core.peer
                with in_process(client_url, wait_running=False) as c:
                    c.capture.wait_for(r"ERROR\s+Client error: tunnel ", timeout=20)
                    assert s.core.peer == holder and s.capture.count(r"taken over") == 0
            finally:
                squatter.close()
    finally:
        echo.close()


# -- another source address: in a network namespace -------------------------------------------

@pytest.mark.skipif(not IN_NETNS, reason="runs inside the namespace made by test_takeover_from_another_address")
@pytest.mark.parametrize("tls", ["0", "1"])
def test_netns_takeover_from_another_address(tls):
    takeover(tls, "127.0.0.2")


def test_takeover_from_another_address():
    """tls=0: a pool connection from the control IP says nothing first, so only a different
    source address marks a takeover attempt.  Runs the test above in a fresh namespace."""
    if IN_NETNS:
        pytest.skip("already inside the namespace")
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) to create a network namespace")
    probe = subprocess.run([unshare, "-n", "true"], capture_output=True, timeout=10)
    if probe.returncode != 0:
        pytest.skip("network namespaces not available here: %s" % probe.stderr.decode().strip()[:200])
    here = Path(__file__)
    script = "ip link set lo up && exec %s -m pytest -q -p no:cacheprovider %s -k netns_takeover" % (
        sys.executable, here)
    env = dict(os.environ, NPG_TEST_NETNS="1")
    proc = subprocess.run([unshare, "-n", "sh", "-c", script], capture_output=True, text=True,
                          timeout=80, cwd=here.parents[2], env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "2 passed" in proc.stdout, proc.stdout[-2000:]
