#!/usr/bin/env python3
"""RSS per idle user session of single-end forwarding, npgevent and (if given) Go NodePass.

    python bench/session_memory.py [--sessions 2000]     # Go too with $NPG_GO_NODEPASS

A forwarder to an echo target (``npbench serve`` next to the Go binary, else this
script's own echo) takes *sessions* user connections that send nothing; the figure is the
forwarder's RSS growth divided by their number, after a warm-up of short sessions (so
buffers and parked greenlets already exist).  What a flood of idle connections
(slowloris) costs each process.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import sys
import time

from bench import free_port, rss_kb, spawn, stop, wait_port


def measure(program: list[str] | None, target: int, sessions: int) -> float:
    """KB of RSS per idle session through one forwarder (*program*: None is npgevent)."""
    port = free_port()
    url = "client://127.0.0.1:%d/127.0.0.1:%d?mode=1&log=warn&slot=%d" % (port, target, sessions + 100)
    if program is None:
        proc = spawn("-m", "npgevent", url)
    else:
        proc = subprocess.Popen([*program, url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    conns: list[socket.socket] = []
    try:
        wait_port(port)
        for _ in range(50):  # warm-up: short sessions
            with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                c.sendall(b"x")
                c.recv(1)
        time.sleep(0.5)
        before = rss_kb(proc.pid)
        for _ in range(sessions):
            conns.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        last = conns[-1]
        last.sendall(b"y")  # answered once the forwarder has dialled for every earlier one too
        last.recv(1)
        time.sleep(1.0)
        return (rss_kb(proc.pid) - before) / sessions
    finally:
        for c in conns:
            c.close()
        stop(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=2000)
    args = ap.parse_args()
    want = 2 * args.sessions + 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    go = os.environ.get("NPG_GO_NODEPASS", "")
    npbench = os.path.join(os.path.dirname(go), "npbench") if go else ""
    target = free_port()
    if npbench and os.path.exists(npbench):
        echo = subprocess.Popen([npbench, "serve", "-listen", "127.0.0.1:%d" % target],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        echo = spawn(os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py"), "echo", str(target))
    try:
        wait_port(target)
        ours = measure(None, target, args.sessions)
        print("npgevent: %.1f KB per idle session (%d sessions)" % (ours, args.sessions))
        if go:
            theirs = measure([go], target, args.sessions)
            print("Go NodePass: %.1f KB per idle session; npgevent / Go %.2f" % (theirs, ours / theirs))
    finally:
        stop(echo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
