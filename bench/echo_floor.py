"""What one UDP round trip costs a relay process here, by the kind of loop it runs.

    python bench/echo_floor.py [--rounds 2] [--seconds 4] [--npbench PATH]

A UDP echo on loopback under ``npbench udp`` with one worker (one datagram in flight, so the
echo sleeps and wakes once per round trip, as a relay between a user and a target does),
written five ways: in C with blocking calls (compiled with ``cc`` if there is one), in Python
with blocking calls, in Python over ``select.epoll``, with gevent in a hub callback (how
npgevent's listeners and relays read) and with gevent in a greenlet.  Each prints the rate
and the echo's CPU per round trip (user + system, from ``/proc/<pid>/stat``).  The C figure
is the floor any program pays for the two syscalls and the sleep and wake-up in between on
this machine; the others add the interpreter and the loop (bench/README.md, twenty-third
pass).  ``npbench`` is looked for beside ``$NPG_GO_NODEPASS`` or at ``$NPG_NPBENCH``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from compare import find_npbench
from cpu import TICK, cpu_ticks

C_ECHO = r"""
#include <stdio.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
int main(int argc, char **argv) {
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bind(s, (void *)&a, sizeof a);
    socklen_t l = sizeof a;
    getsockname(s, (void *)&a, &l);
    printf("%d\n", ntohs(a.sin_port));
    fflush(stdout);
    static char buf[65536];
    for (;;) {
        struct sockaddr_in p;
        socklen_t pl = sizeof p;
        ssize_t n = recvfrom(s, buf, sizeof buf, 0, (void *)&p, &pl);
        if (n >= 0)
            sendto(s, buf, n, 0, (void *)&p, pl);
    }
}
"""


def serve(mode: str) -> None:
    """Run one Python echo (in a child process): print its port, then echo forever."""
    if mode.startswith("gevent"):
        from gevent import monkey

        monkey.patch_all(ssl=False)
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    if mode in ("block", "gevent-greenlet"):  # gevent's patched socket waits in the hub
        while True:
            data, addr = sock.recvfrom(65535)
            sock.sendto(data, addr)
    raw = getattr(sock, "_sock", sock)  # under gevent: the stdlib socket it wraps
    raw.setblocking(False)

    def drain() -> None:
        while True:
            try:
                data, addr = raw.recvfrom(65535)
            except BlockingIOError:
                return
            raw.sendto(data, addr)

    if mode == "epoll":
        import select

        ep = select.epoll()
        ep.register(raw.fileno(), select.EPOLLIN)
        while True:
            ep.poll()
            drain()
    import gevent  # gevent-callback

    watcher = gevent.get_hub().loop.io(raw.fileno(), 1)
    watcher.start(drain)
    gevent.wait()


def cpu_seconds(pid: int) -> float:
    user, system, _faults = cpu_ticks(pid)
    return (user + system) / TICK


def measure(cmd: list[str], npbench: str, seconds: float) -> tuple[float, float]:
    """(round trips/s, CPU microseconds per round trip) of the echo *cmd*."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        time.sleep(0.3)
        before = cpu_seconds(proc.pid)
        out = subprocess.run([npbench, "udp", "-addr", "127.0.0.1:%d" % port, "-workers", "1",
                              "-dur", "%gs" % seconds, "-size", "512"],
                             capture_output=True, text=True, timeout=seconds + 60, check=True)
        used = cpu_seconds(proc.pid) - before
    finally:
        proc.kill()
        proc.wait()
    rate = float(json.loads(out.stdout.strip().splitlines()[-1])["rtt_per_s"])
    return rate, used * 1e6 / (rate * seconds)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        serve(sys.argv[2])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--npbench", help="npbench binary (default $NPG_NPBENCH, else beside $NPG_GO_NODEPASS)")
    args = ap.parse_args()
    args.npbench = find_npbench(args.npbench)
    with tempfile.TemporaryDirectory() as tmp:
        echoes: list[tuple[str, list[str]]] = []
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc:
            src, exe = os.path.join(tmp, "echo.c"), os.path.join(tmp, "echo")
            with open(src, "w") as fh:
                fh.write(C_ECHO)
            subprocess.run([cc, "-O2", "-o", exe, src], check=True)
            echoes.append(("C, blocking", [exe]))
        for mode, label in (("block", "Python, blocking"), ("epoll", "Python, epoll"),
                            ("gevent-callback", "gevent, hub callback"), ("gevent-greenlet", "gevent, greenlet")):
            echoes.append((label, [sys.executable, os.path.abspath(__file__), "serve", mode]))
        for _ in range(args.rounds):
            for label, cmd in echoes:
                rate, cpu = measure(cmd, args.npbench, args.seconds)
                print("%-22s %8.0f round trips/s  %5.1f us CPU per round trip" % (label, rate, cpu), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
