"""QUIC packets in runs across a real link: two network namespaces joined by a veth pair with
a 1500-byte MTU, where the kernel cuts the runs (loopback hands them over whole).

The outer test makes the namespaces and the link, runs the inner test inside the first one
(the server, in this process, and the user and target beside it), and starts the tunnel
client in the second; it needs root and ``ip netns``, and is skipped without them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import EchoPair, NpProcess, free_port, in_process, wait_pool
from test_tunnel import exercise_tcp_sha, exercise_udp

MiB = 1 << 20
INNER = os.environ.get("NPG_TEST_VETH", "")  # "<client namespace>" inside the outer test
SERVER_IP, CLIENT_IP = "10.203.7.1", "10.203.7.2"
pytestmark = pytest.mark.timeout(150)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.mark.skipif(not INNER, reason="runs inside the namespaces made by test_quic_runs_across_a_veth_link")
@pytest.mark.parametrize("offload", ["1", "0"])
def test_inner_quic_across_veth(offload):
    echo = EchoPair(host=SERVER_IP)  # the client dials it from the other namespace
    tport, uport = free_port(), free_port()
    server_url = "server://k@%s:%d/127.0.0.1:%d?mode=1&quic=1&tls=1" % (SERVER_IP, tport, uport)
    client_url = "client://k@%s:%d/%s:%d?mode=2&min=4&log=debug" % (SERVER_IP, tport, SERVER_IP, echo.port)
    env = {"NP_QUIC_OFFLOAD": offload}
    try:
        with in_process(server_url, quic_offload=offload) as s:
            client = NpProcess(client_url, env=env, program=["ip", "netns", "exec", INNER,
                                                             sys.executable, "-m", "npgevent"])
            try:
                wait_pool(lambda: s.core.pool.active, 4, timeout=30)
                exercise_tcp_sha(uport, 16 * MiB)
                exercise_udp(uport)
                transport = s.core.engine.thread.servers[0][0]
                if offload == "1":
                    # runs left in one call each, crossed the 1500-byte link and came in as
                    # runs from the client (veth hands a run to the other namespace whole)
                    assert transport.runs_sent > 0 and transport.gso and transport.runs_read > 0
                else:
                    assert transport.runs_sent == 0 and transport.runs_read == 0
                assert client.count(r"ERROR|Traceback") == 0, client.output[-3000:]
            finally:
                client.close()
    finally:
        echo.close()


def test_quic_runs_across_a_veth_link():
    if INNER:
        pytest.skip("already inside the namespaces")
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and ip(8) to make network namespaces")
    tag = "npgq%d" % os.getpid()
    a, b = tag + "a", tag + "b"
    try:
        try:
            _ip("netns", "add", a)
            _ip("netns", "add", b)
        except subprocess.CalledProcessError as exc:
            pytest.skip("network namespaces not available here: %s" % exc.stderr.decode().strip()[:200])
        _ip("-n", a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", b)
        for ns, dev, ip in ((a, "va", SERVER_IP), (b, "vb", CLIENT_IP)):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "mtu", "1500", "up")
            _ip("-n", ns, "addr", "add", ip + "/24", "dev", dev)
        here = Path(__file__)
        env = dict(os.environ, NPG_TEST_VETH=b)
        # a session of its own: if it hangs, its whole group (the client in the other
        # namespace included) is killed, not only the pytest it runs
        proc = subprocess.Popen(
            ["ip", "netns", "exec", a, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             str(here), "-k", "inner"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=here.parents[2], env=env, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=140)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError("the inner test hung:\n" + out[-4000:]) from None
        assert proc.returncode == 0, out[-4000:] + err[-2000:]
        assert "2 passed" in out, out[-2000:]
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
