"""UDP bursts through a tunnel: CPU per datagram when a target answers with many at once.

    python bench/udp_burst.py [--tls 1] [--burst 32] [--size 1000] [--seconds 5] [--up]
                              [--tree DIR] [--go BIN]

A reverse tunnel (server and client as ``python -m npgevent`` processes, from ``--tree``
if given; ``--go``: the Go NodePass binary instead), a target process that answers each request ``go`` with ``--burst`` datagrams of
``--size`` bytes sent back to back, and a user here that asks for one burst after another
and reads every datagram (``--up``: that sends bursts to the target, which counts them).
Prints the datagrams delivered per second, the ones lost, and the CPU (user + system,
microseconds, from ``/proc/<pid>/stat``) per datagram of the client (it reads the target and
writes the pool connection) and of the server (it reads the user's datagrams and writes the
pool connection).
``npbench udp`` has one datagram in flight per worker, so it never shows what a burst costs.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET = r"""
import socket, sys
burst, size = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
payload = b"b" * size
count = 0
while True:
    data, addr = s.recvfrom(65535)
    if data == b"go":
        for _ in range(burst):
            s.sendto(payload, addr)
    elif data == b"sum":
        s.sendto(b"%d" % count, addr)
        count = 0
    elif data == b"ping":
        s.sendto(data, addr)
    else:
        count += 1
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_ticks(pid: int) -> int:
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tls", default="1", choices=["0", "1"])
    ap.add_argument("--burst", type=int, default=32)
    ap.add_argument("--size", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--tree", default=os.path.dirname(HERE))
    ap.add_argument("--go", help="measure this Go NodePass binary instead of npgevent")
    ap.add_argument("--up", action="store_true", help="bursts from the user to the target instead")
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=os.path.abspath(args.tree))
    target = subprocess.Popen([sys.executable, "-c", TARGET, str(args.burst), str(args.size)],
                              stdout=subprocess.PIPE, text=True)
    assert target.stdout is not None
    tport, uport, eport = free_port(), free_port(), int(target.stdout.readline())
    urls = ["server://k@127.0.0.1:%d/127.0.0.1:%d?mode=1&tls=%s" % (tport, uport, args.tls),
            "client://k@127.0.0.1:%d/127.0.0.1:%d?mode=2" % (tport, eport)]
    program = [args.go] if args.go else [sys.executable, "-m", "npgevent"]
    procs = [subprocess.Popen([*program, u], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for u in urls]
    user = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    user.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    user.settimeout(0.5)
    try:
        time.sleep(3)  # the pool fills
        for _ in range(3):  # the session opens and is answered
            user.sendto(b"ping", ("127.0.0.1", uport))
            try:
                user.recv(100)
            except OSError:
                pass
        before = [cpu_ticks(p.pid) for p in procs]
        got = lost = 0
        start = time.monotonic()
        up = b"u" * args.size
        while time.monotonic() - start < args.seconds:
            if args.up:  # a burst from the user, then the target's count of what arrived
                for _ in range(args.burst):
                    user.sendto(up, ("127.0.0.1", uport))
                user.sendto(b"sum", ("127.0.0.1", uport))
                try:
                    arrived = int(user.recv(100))
                except (OSError, ValueError):
                    arrived = 0
                got += arrived
                lost += args.burst - arrived
                continue
            user.sendto(b"go", ("127.0.0.1", uport))
            for i in range(args.burst):
                try:
                    user.recv(65535)
                    got += 1
                except OSError:
                    lost += args.burst - i
                    break
        elapsed = time.monotonic() - start
        after = [cpu_ticks(p.pid) for p in procs]
        tick = os.sysconf("SC_CLK_TCK")
        us = [round((a - b) / tick * 1e6 / max(got, 1), 1) for a, b in zip(after, before, strict=True)]
        print({"datagrams_per_s": round(got / elapsed), "lost": lost,
               "cpu_us_per_datagram": {"client": us[1], "server": us[0]}})
    finally:
        user.close()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(10)
        target.kill()
        target.wait()


if __name__ == "__main__":
    main()
