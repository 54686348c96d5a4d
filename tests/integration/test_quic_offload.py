"""QUIC tunnels with segmentation offload (quic_offload): runs of datagrams per system call,
between npgevent peers and with a real Go peer, and the setting that turns it off."""

from __future__ import annotations

import contextlib

import gevent
import pytest
from helpers import EchoPair, free_port, in_process, tunnel_urls, wait_pool
from realgo import GoProcess, requires_go
from test_interop_go import exercise_tcp as go_exercise_tcp
from test_interop_go import exercise_udp as go_exercise_udp
from test_tunnel import exercise_tcp_sha, exercise_udp

MiB = 1 << 20
pytestmark = pytest.mark.timeout(120)


def _transports(runner) -> list:
    thread = runner.core.engine.thread
    found = [transport for transport, _server in thread.servers]
    found += [p._transport for p in thread.protocols.values() if p._transport is not None]
    return found


def _counts(runner) -> tuple[int, int]:
    transports = _transports(runner)
    return sum(t.runs_sent for t in transports), sum(t.runs_read for t in transports)


@contextlib.contextmanager
def quic_tunnel(flow: str = "rev", server_offload: str = "1", client_offload: str = "1", **both: str):
    """An npgevent QUIC tunnel in this process, its pool up: yields (server, client, user port).
    *both*: settings for both ends."""
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls(flow, "1", tport, uport, echo.port, extra_server="&quic=1")
    try:
        with in_process(server_url, quic_offload=server_offload, **both) as s, \
                in_process(client_url, quic_offload=client_offload, **both) as c:
            wait_pool(lambda: (s if flow == "rev" else c).core.pool.active, 2)
            yield s, c, uport
    finally:
        echo.close()


@contextlib.contextmanager
def go_quic_tunnel(go_role: str):
    """npgevent in this process and Go NodePass as the tunnel's *go_role* ("client" or
    "server"), over QUIC, the pool up: yields (npgevent's runner, user port)."""
    echo = EchoPair()
    tport, uport = free_port(), free_port()
    server_url, client_url = tunnel_urls("rev", "1", tport, uport, echo.port, extra_server="&quic=1")
    go_url = client_url if go_role == "client" else server_url
    mine_url = server_url if go_role == "client" else client_url
    env = {"NP_REPORT_INTERVAL": "1s", "NP_SERVICE_COOLDOWN": "1s"}
    go = GoProcess(go_url + "&log=debug", env=env) if go_role == "server" else None
    try:
        if go is not None:
            go.wait_for(r"Server started")
        with in_process(mine_url) as mine:
            peer = go or GoProcess(go_url + "&log=debug", env=env)
            try:
                wait_pool(lambda: mine.core.pool.active, 2, timeout=30)
                yield mine, uport
            finally:
                if peer is not go:
                    peer.close()
    finally:
        if go is not None:
            go.close()
        echo.close()
        gevent.sleep(0)


@pytest.mark.parametrize("flow", ["rev", "fwd"])
def test_a_bulk_transfer_crosses_in_runs_both_ways(flow):
    with quic_tunnel(flow) as (s, c, uport):
        exercise_tcp_sha(uport, 16 * MiB)
        exercise_udp(uport)
        for end in (s, c):
            sent, read = _counts(end)
            assert sent > 0 and read > 0, (sent, read)  # the echo moved 16 MiB each way
            assert all(t.gso and t.gro for t in _transports(end))


def test_quic_offload_0_sends_and_reads_one_datagram_per_call():
    with quic_tunnel(server_offload="0", client_offload="0") as (s, c, uport):
        exercise_tcp_sha(uport, 8 * MiB)
        for end in (s, c):
            assert _counts(end) == (0, 0)
            assert not any(t.gso or t.gro for t in _transports(end))


def test_one_end_with_offload_and_one_without_carry_the_same_bytes():
    """A peer that reads one datagram per call gets runs cut by the kernel, and sends single
    datagrams to one that reads runs."""
    with quic_tunnel(client_offload="0") as (s, c, uport):
        exercise_tcp_sha(uport, 8 * MiB)
        assert _counts(s)[0] > 0 and _counts(c) == (0, 0)


def test_a_socket_the_kernel_refuses_runs_on_falls_back_to_one_datagram_per_call():
    """SO_NO_CHECK (no UDP checksums) makes the kernel refuse every GSO send with EINVAL, as it
    does on paths that cannot take a run: the server resends each run datagram by datagram,
    stops asking on that socket, and nothing is lost."""
    import socket as std

    with quic_tunnel() as (s, c, uport):
        server = _transports(s)[0]
        server._sock.setsockopt(std.SOL_SOCKET, getattr(std, "SO_NO_CHECK", 11), 1)  # Linux's 11
        sent_before = server.runs_sent
        exercise_tcp_sha(uport, 8 * MiB)
        exercise_udp(uport)
        assert not server.gso and server.runs_sent == sent_before
        assert _counts(c)[0] > 0  # the client's socket is not affected
        assert s.capture.count(r"QUIC thread error|Server error|Server restart") == 0


def test_the_setting_refuses_anything_but_0_or_1():
    from npgevent.errors import ConfigError
    from npgevent.settings import resolve

    assert resolve("server", {}, {"quic_offload": "0"})[0].quic_offload is False
    assert resolve("client", {}, {})[0].quic_offload is True
    with pytest.raises(ConfigError, match="NP_QUIC_OFFLOAD 'yes': expected 0 or 1"):
        resolve("server", {}, {"quic_offload": "yes"})


@requires_go
@pytest.mark.parametrize("go_role", ["client", "server"])
def test_runs_with_a_go_peer(go_role):
    """quic-go reads one datagram per call (the kernel cuts npgevent's runs for it) and sends
    runs of its own, which npgevent splits: 32 MiB and 500 datagrams arrive exact."""
    with go_quic_tunnel(go_role) as (mine, uport):
        go_exercise_tcp(uport)  # Go closes both directions when one ends: no half-close
        go_exercise_udp(uport)
        sent, read = _counts(mine)
        # npgevent sent runs, and split the runs quic-go sent (it uses GSO where the
        # kernel has it, as this one does: npgevent's runs went out)
        assert sent > 0 and read > 0, (sent, read)
        assert all(t.gso for t in _transports(mine))  # the kernel took every run
