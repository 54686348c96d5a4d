"""workers=N: single-end forwarding over N processes sharing the listeners (SO_REUSEPORT).

Everything runs through the CLI as real processes: the parent supervises, the workers serve.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time

import gevent
import pytest
from gevent import socket
from gevent.server import DatagramServer
from helpers import (
    EchoPair,
    NpProcess,
    TcpEcho,
    children,
    echo_exact,
    free_port,
    run_cli,
    served_of_held,
    udp_socket,
    wait_serving,
)

pytestmark = pytest.mark.timeout(120)
ROW = re.compile(r"(\d+) pid (\d+) TCPS=\d+ UDPS=\d+ TCPRX=(\d+) TCPTX=\d+ UDPRX=(\d+)")
CHECK = re.compile(r"CHECK_POINT\|MODE=1\|PING=\d+ms\|POOL=0\|TCPS=(\d+)\|UDPS=(\d+)\|TCPRX=(\d+)\|"
                   r"TCPTX=(\d+)\|UDPRX=(\d+)\|UDPTX=(\d+)")


@contextlib.contextmanager
def workers(n: int, target: int, query: str = "", echoes: bool = True, **env: str):
    """N workers forwarding to *target*, serving once each said so (and, if the target
    *echoes*, once a probe's bytes come back)."""
    port = free_port()
    proc = NpProcess("client://127.0.0.1:%d/127.0.0.1:%d?workers=%d&log=debug%s" % (port, target, n, query),
                     env=env)
    try:
        proc.wait_for(r"Workers: %d processes share" % n)
        for i in range(n):
            proc.wait_for(r"Worker %d serving: pid" % i)
        if echoes:
            wait_serving(port)
        yield proc, port
    finally:
        proc.close()


def worker_pids(proc: NpProcess) -> dict[int, int]:
    pids = {}
    for line in proc.lines:
        m = re.search(r"Worker (\d+) serving: pid (\d+)", line)
        if m:
            pids[int(m.group(1))] = int(m.group(2))
    return pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open("/proc/%d/stat" % pid) as f:
        return f.read().split()[2] != "Z"


def last_rows(proc: NpProcess, after: int) -> dict[int, tuple[int, int]]:
    """worker index -> (TCPRX, UDPRX) from the newest per-worker debug line after line *after*."""
    for line in reversed(proc.lines[after:]):
        if "DEBUG" in line and "Workers: 0 pid" in line:
            return {int(m[0]): (int(m[2]), int(m[3])) for m in ROW.findall(line)}
    return {}


def test_connections_spread_over_workers_and_one_summed_checkpoint():
    echo = EchoPair()
    try:
        with workers(2, echo.port) as (proc, port):
            payload = b"w" * 1000
            for _ in range(60):
                assert echo_exact(port, payload) == payload
            mark = len(proc.lines)
            gevent.sleep(2.5)  # two report intervals
            rows = last_rows(proc, mark)
            assert set(rows) == {0, 1} and all(rx > 0 for rx, _ in rows.values()), rows  # both served
            checks = [CHECK.search(line) for line in proc.lines[mark:]]
            checks = [m for m in checks if m]
            # one CHECK_POINT per interval (not one per worker), with the workers' counters summed
            assert 1 <= len(checks) <= 3, proc.output[-3000:]
            total = int(checks[-1].group(3))
            assert total == sum(rx for rx, _ in rows.values())
            assert total >= 60 * len(payload)
    finally:
        echo.close()


TCP_BYTES = re.compile(r"(\d+) pid \d+ TCPS=\d+ UDPS=\d+ TCPRX=(\d+) TCPTX=(\d+)")


def tcp_bytes_per_worker(proc: NpProcess) -> dict[int, int]:
    """worker index -> TCP bytes both ways, from the newest per-worker debug line."""
    for line in reversed(proc.lines):
        if "DEBUG" in line and "Workers: 0 pid" in line:
            return {int(m[0]): int(m[1]) + int(m[2]) for m in TCP_BYTES.findall(line)}
    return {}


def test_slot_is_the_instances_total_across_workers():
    """slot=4 with two workers: exactly 4 sessions in all, however the kernel spreads the
    connections (the workers count the group's live sessions in the shared block): not 4 per
    worker (up to 8), nor 2 per worker (a worker full while the other has room).  Twelve
    connections held open land on both workers but for a chance of 1 in 2,048."""
    echo = TcpEcho()
    socks: list[socket.socket] = []
    try:
        with workers(2, echo.port, query="&slot=4") as (proc, port):
            gevent.sleep(0.5)  # the readiness probe's session is over
            served = served_of_held(port, 12, socks)
            assert served == 4, served
            proc.wait_for(r"ERROR\s+TCP slot limit reached \(4\): connection from")
            for sock in socks[:2]:  # two end, wherever they were: two more get in, no more
                sock.close()
            gevent.sleep(0.5)
            assert served_of_held(port, 6, socks) == 2
    finally:
        for sock in socks:
            sock.close()
        echo.close()


def download_rate(port: int, connections: int) -> float:
    """Bytes per second that *connections* parallel downloads from *port* get together, over
    3 s after 1.5 s (the bucket's first burst spent)."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(connections)]
    got = [0]
    counting = [False]

    def drain(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = sock.recv(1 << 20)
                if not data:
                    return
                if counting[0]:
                    got[0] += len(data)

    readers = [gevent.spawn(drain, sock) for sock in socks]
    try:
        gevent.sleep(1.5)
        counting[0] = True
        began = time.monotonic()
        gevent.sleep(3.0)
        counting[0] = False
        return got[0] / (time.monotonic() - began)
    finally:
        for sock in socks:
            sock.close()
        gevent.joinall(readers, timeout=5)


def test_a_forged_source_flood_at_the_slot_limit_takes_nothing_from_the_holders():
    """slot=2 over two workers, held by two users; 4,000 datagrams from 200 new sources
    (spread over both workers) get no session and no reply, the group still holds exactly 2
    UDP sessions, the holders' round trips go on, and the refusals are a few log lines."""
    echo = EchoPair()
    holders = [udp_socket() for _ in range(2)]
    flood = [udp_socket(timeout=0.01) for _ in range(200)]
    try:
        with workers(2, echo.port, query="&slot=2") as (proc, port):
            gevent.sleep(0.5)  # the readiness probe's session is over
            for i, user in enumerate(holders):
                user.sendto(b"hold %d" % i, ("127.0.0.1", port))
                assert user.recvfrom(100)[0] == b"hold %d" % i
            mark = len(proc.lines)
            for _ in range(20):
                for src in flood:
                    src.sendto(b"x", ("127.0.0.1", port))
                gevent.sleep(0)
            for i, user in enumerate(holders):
                user.sendto(b"still %d" % i, ("127.0.0.1", port))
                assert user.recvfrom(100)[0] == b"still %d" % i
            gevent.sleep(2.5)  # two report intervals
            replies = 0
            for src in flood:
                with contextlib.suppress(OSError):
                    replies += len(src.recvfrom(100)[0]) > 0
            assert replies == 0
            checks = [m for m in map(CHECK.search, proc.lines[mark:]) if m]
            assert checks and int(checks[-1].group(2)) == 2, proc.output[-2000:]  # UDPS summed
            refusals = sum(1 for line in proc.lines[mark:] if "UDP slot limit reached (2)" in line)
            assert 1 <= refusals <= 6, refusals  # rate-limited: a few per worker, not 4,000
            assert len(children(proc.pid)) == 2
    finally:
        for sock in [*holders, *flood]:
            sock.close()
        echo.close()


def test_rate_is_the_instances_total_across_workers():
    """rate=8 (Mbit/s, 1,000,000 bytes/s) with two workers: downloads spread over both
    workers share the instance's 8 Mbit/s, not 8 each; and a lone download gets all of it
    wherever it lands, not a worker's half (the workers draw on one bucket)."""
    from helpers import ByteSource

    source = ByteSource()
    try:
        with workers(2, source.port, query="&rate=8", echoes=False) as (proc, port):
            rate = download_rate(port, 8)
            assert 0.5e6 <= rate <= 1.25e6, rate
            carried = tcp_bytes_per_worker(proc)
            assert set(carried) == {0, 1} and all(carried.values()), carried  # both workers shaped
            for _ in range(2):  # wherever it lands
                assert 0.8e6 <= download_rate(port, 1) <= 1.25e6
    finally:
        source.close()


class TaggedUdpEcho:
    """UDP echo that remembers from which source address each user tag arrived."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sources: dict[bytes, set] = {}
        self.server = DatagramServer(("127.0.0.1", port), self._handle)
        self.server.start()

    def _handle(self, data: bytes, addr) -> None:
        self.sources.setdefault(data.split(b":")[0], set()).add(addr)
        self.server.sendto(data, addr)

    def close(self) -> None:
        self.server.close()


def test_a_user_address_stays_on_one_worker():
    """The kernel's SO_REUSEPORT hash keeps each user address on one worker: one session (one
    upstream socket) per user, so the target sees each user from exactly one address."""
    udp_target = TaggedUdpEcho(free_port())
    echo = TcpEcho(port=udp_target.port)  # readiness is checked over TCP
    try:
        with workers(2, udp_target.port) as (proc, port):
            users = [udp_socket() for _ in range(24)]
            try:
                for rnd in range(8):
                    for i, user in enumerate(users):
                        user.sendto(b"user%d:%d" % (i, rnd), ("127.0.0.1", port))
                    for i, user in enumerate(users):
                        data, _ = user.recvfrom(100)
                        assert data == b"user%d:%d" % (i, rnd)
                assert len(udp_target.sources) == 24
                assert all(len(v) == 1 for v in udp_target.sources.values()), udp_target.sources
                mark = len(proc.lines)
                gevent.sleep(2.5)
                rows = last_rows(proc, mark)
                assert all(udp > 0 for _, udp in rows.values()), rows  # both workers had users
            finally:
                for user in users:
                    user.close()
    finally:
        udp_target.close()
        echo.close()


def test_a_killed_worker_is_replaced_and_its_bytes_stay_counted():
    echo = EchoPair()
    try:
        with workers(2, echo.port) as (proc, port):
            for _ in range(40):
                assert echo_exact(port, b"k" * 500) == b"k" * 500
            gevent.sleep(1.5)
            before = max(int(m.group(3)) for m in map(CHECK.search, proc.lines) if m)
            pids = worker_pids(proc)
            os.kill(pids[0], signal.SIGKILL)
            proc.wait_for(r"ERROR\s+Worker 0 \(pid %d\) exited with status -9: restart" % pids[0])
            new = int(proc.wait_for(r"Worker 0 serving: pid (?!%d)(\d+)" % pids[0], timeout=10).group(1))
            assert new != pids[0] and alive(new) and alive(pids[1])
            wait_serving(port)
            for _ in range(20):
                assert echo_exact(port, b"after") == b"after"
            mark = len(proc.lines)
            proc.wait_for(r"CHECK_POINT", start=mark)
            after = int(CHECK.search(proc.wait_for(r"CHECK_POINT", start=len(proc.lines)).string).group(3))
            assert after >= before + 20 * 5  # nothing the dead worker counted was lost
    finally:
        echo.close()


def test_one_worker_at_a_time_times_the_targets_connect():
    """PING's connect (one per NP_REPORT_INTERVAL, 1 s here) comes from one worker at a time,
    as it would from one process, not from each of the three; when that worker dies, the
    next one takes it up while the first waits out its cooldown."""
    echo = EchoPair()

    def connects(seconds: float) -> int:
        mark = echo.tcp.accepted
        gevent.sleep(seconds)
        return echo.tcp.accepted - mark

    try:
        with workers(3, echo.port, NP_SERVICE_COOLDOWN="6s") as (proc, _port):
            gevent.sleep(1.5)  # wait_serving's own connections are through
            assert 3 <= connects(5.0) <= 7  # one per second; each worker timing its own: ~15
            pids = worker_pids(proc)
            os.kill(pids[0], signal.SIGKILL)
            proc.wait_for(r"Worker 0 \(pid %d\) exited with status -9: restart in 6s" % pids[0])
            gevent.sleep(1.5)  # the parent names the next worker at its next report
            assert 2 <= connects(3.0) <= 5  # worker 1, while worker 0 is down
    finally:
        echo.close()


@pytest.mark.parametrize("value", ["x", "0,2", "0,2,999", "-1,2,{fd}", "2,2,{fd}", "0,0,{fd}"])
def test_a_bad_worker_variable_exits_2_with_one_line(value):
    """NPG_WORKER is set by a parent npgevent; anything else in it is refused at start, also
    an index outside the count with a real block (which would write over another row)."""
    from npgevent.workerboard import Board

    board = Board(2)
    value = value.format(fd=board.fd)
    try:
        proc = subprocess.run([sys.executable, "-m", "npgevent", "client://127.0.0.1:%d/127.0.0.1:9" % free_port()],
                              env={**os.environ, "NPG_WORKER": value}, pass_fds=(board.fd,),
                              capture_output=True, text=True, timeout=20)
    finally:
        board.close()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "NPG_WORKER=%r" % value in proc.stderr, proc.stderr


def test_sigterm_drains_every_worker():
    echo = EchoPair()
    try:
        with workers(2, echo.port, NP_SHUTDOWN_TIMEOUT="5s") as (proc, port):
            pids = worker_pids(proc)
            live = socket.create_connection(("127.0.0.1", port), timeout=5)
            try:
                live.sendall(b"before")
                assert live.recv(100) == b"before"
                proc.signal(signal.SIGTERM)
                gevent.sleep(0.5)
                live.sendall(b"during the drain")  # a session in flight finishes its exchange
                assert live.recv(100) == b"during the drain"
            finally:
                live.close()
            assert proc.wait(15) == 0
            assert not any(alive(pid) for pid in pids.values())
            assert proc.count(r"Client shutdown complete") == 3, proc.output[-3000:]  # workers, parent
            assert "Client shutdown complete" in proc.lines[-1]
    finally:
        echo.close()


@pytest.mark.parametrize("url,expected", [
    ("server://k@127.0.0.1:%d/127.0.0.1:9?workers=2", "workers=2 applies to single-end forwarding"),
    ("client://k@127.0.0.1:%d/127.0.0.1:9?mode=2&workers=2", "workers=2 applies to single-end forwarding"),
    ("client://127.0.0.1:%d/127.0.0.1:9?workers=two", "expected a number of processes or 'auto'"),
])
def test_workers_outside_single_end_or_unparseable_exits_2(url, expected):
    rc, out, err = run_cli(url % free_port())
    assert rc == 2 and expected in err and "Traceback" not in err + out
    assert len(err.strip().splitlines()) == 1


def test_workers_out_of_range_keeps_one_process_with_a_warning():
    echo = EchoPair()
    port = free_port()
    proc = NpProcess("client://127.0.0.1:%d/127.0.0.1:%d?workers=0" % (port, echo.port))
    try:
        proc.wait_for(r"WARN\s+URL parameter workers= '0' is out of range \(must be 1\.\.256\): using default 1")
        wait_serving(port)
        assert proc.count(r"Workers:") == 0
    finally:
        proc.close()
        echo.close()


def test_metrics_of_workers_are_summed_by_the_parent():
    from helpers import http

    echo = EchoPair()
    mport = free_port()
    try:
        with workers(2, echo.port, query="&metrics=127.0.0.1:%d" % mport) as (proc, port):
            assert proc.count(r"Metrics: http://127\.0\.0\.1:%d/metrics" % mport) == 1  # the parent's only
            for _ in range(40):
                assert echo_exact(port, b"s" * 250) == b"s" * 250
            gevent.sleep(2.5)
            body = http("GET", mport, "/metrics").body.decode()
            rx = float(re.search(r'npgevent_bytes_total\{direction="rx",protocol="tcp"\} (\S+)', body).group(1))
            rows = last_rows(proc, 0)
            assert rx >= 40 * 250 and rx >= sum(r for r, _ in rows.values()) > 0
            assert "npgevent_workers 2.0" in body
    finally:
        echo.close()


def test_an_instance_with_workers_under_the_master(tmp_path):
    """One instance = one process group: the master sees one summed CHECK_POINT, and stopping
    the instance ends every worker."""
    from helpers import MasterProcess

    echo = EchoPair()
    master = MasterProcess(tmp_path)
    try:
        port = free_port()
        r = master.api("POST", "/instances",
                       {"url": "client://127.0.0.1:%d/127.0.0.1:%d?workers=2" % (port, echo.port)})
        assert r.status == 201, r.body
        rid = r.json["id"]
        wait_serving(port)
        for _ in range(30):
            assert echo_exact(port, b"m" * 100) == b"m" * 100
        deadline = time.monotonic() + 15
        while master.api("GET", "/instances/" + rid).json["tcprx"] < 3000:
            assert time.monotonic() < deadline, master.api("GET", "/instances/" + rid).json
            gevent.sleep(0.3)
        parent = children(master.pid)
        assert len(parent) == 1
        kids = children(parent[0])
        assert len(kids) == 2
        assert master.api("PATCH", "/instances/" + rid, {"action": "stop"}).status == 200
        deadline = time.monotonic() + 15
        while any(alive(pid) for pid in [*parent, *kids]):
            assert time.monotonic() < deadline
            gevent.sleep(0.2)
    finally:
        master.stop()
        master.close()
        echo.close()

