#!/usr/bin/env python3
"""Master API benchmark on loopback.

    python bench/bench_master.py [--instances 100] [--requests 1000] [--subscribers 50] [--events 100]

Starts ``npgevent master://`` with --instances running single-end instances
(real child processes), then measures:

* latency of ``GET /instances`` (p50/p99), one client and 10 concurrent clients,
  each request on a fresh connection as panels make them;
* SSE fan-out: --subscribers streams on ``/events``; each of --events PATCH
  requests (an alias change) produces an ``update`` event; the delay from the
  PATCH response to its arrival on every stream (p50/p99, and how many arrived);
* the master's RSS.

Goal (issue 7): p99 <= 20 ms on loopback.  Writes bench/results-master.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket as _socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gevent import monkey

monkey.patch_all()

import http.client  # noqa: E402

import gevent  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    s = _socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


def request(port: int, method: str, path: str, key: str, body: object = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"X-API-Key": key})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return round(s[min(len(s) - 1, int(len(s) * p))] * 1000, 2)


def rss_mb(pid: int) -> float:
    with open("/proc/%d/status" % pid) as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


class Stream:
    """A minimal SSE client recording when each alias update arrived."""

    def __init__(self, port: int, key: str) -> None:
        self.sock = _socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(("GET /api/v1/events HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\n\r\n" % key).encode())
        self.arrivals: dict[str, float] = {}
        self.g = gevent.spawn(self.read)

    def read(self) -> None:
        buf = b""
        while True:
            data = self.sock.recv(65536)
            if not data:
                return
            now = time.perf_counter()
            buf += data
            while b'"alias":"bench-' in buf:
                start = buf.index(b'"alias":"bench-') + 9
                end = buf.index(b'"', start)
                self.arrivals.setdefault(buf[start:end].decode(), now)
                buf = buf[end:]
            buf = buf[-200:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=100)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--subscribers", type=int, default=50)
    ap.add_argument("--events", type=int, default=100)
    ap.add_argument("--json", default=str(ROOT / "bench" / "results-master.json"))
    args = ap.parse_args()

    state = tempfile.mkdtemp(prefix="npg-bench-master-")
    port = free_port()
    env = dict(os.environ, NP_STATE_DIR=state, PYTHONPATH=str(ROOT))
    master = subprocess.Popen([sys.executable, "-m", "npgevent", "master://127.0.0.1:%d/api?log=warn" % port],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        key = ""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not key:
            try:
                with open(os.path.join(state, "npgevent.json")) as fh:
                    key = next(r["url"] for r in json.load(fh)["records"] if r["id"] == "********")
            except (OSError, ValueError, StopIteration):
                time.sleep(0.1)
        ids = []
        for _ in range(args.instances):
            status, body = request(port, "POST", "/api/v1/instances", key,
                                   {"url": "client://127.0.0.1:%d/127.0.0.1:9?mode=1&log=warn" % free_port()})
            assert status == 201, body
            ids.append(json.loads(body)["id"])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            records = json.loads(request(port, "GET", "/api/v1/instances", key)[1])
            if sum(1 for r in records if r["status"] == "running" and r["mode"] == 1) == args.instances:
                break
            time.sleep(0.5)
        time.sleep(2)

        def timed_gets(n: int) -> list[float]:
            out = []
            for _ in range(n):
                t0 = time.perf_counter()
                status, _ = request(port, "GET", "/api/v1/instances", key)
                out.append(time.perf_counter() - t0)
                assert status == 200
            return out

        single = timed_gets(args.requests)
        jobs = [gevent.spawn(timed_gets, args.requests // 10) for _ in range(10)]
        gevent.joinall(jobs)
        concurrent = [t for j in jobs for t in j.value]

        streams = [Stream(port, key) for _ in range(args.subscribers)]
        time.sleep(1.0)
        sent: dict[str, float] = {}
        for i in range(args.events):
            alias = "bench-%04d" % i
            status, _ = request(port, "PATCH", "/api/v1/instances/" + ids[i % len(ids)], key, {"alias": alias})
            sent[alias] = time.perf_counter()
            assert status == 200
            time.sleep(0.01)
        time.sleep(2.0)
        delays = [s.arrivals[a] - t for s in streams for a, t in sent.items() if a in s.arrivals]
        delivered = sum(len([a for a in sent if a in s.arrivals]) for s in streams)

        result = {
            "instances": args.instances,
            "get_instances_p50_ms": pct(single, 0.5), "get_instances_p99_ms": pct(single, 0.99),
            "get_instances_10clients_p50_ms": pct(concurrent, 0.5),
            "get_instances_10clients_p99_ms": pct(concurrent, 0.99),
            "sse_subscribers": args.subscribers, "sse_events": args.events,
            "sse_delivered": delivered, "sse_expected": args.subscribers * args.events,
            "sse_delay_p50_ms": pct(delays, 0.5), "sse_delay_p99_ms": pct(delays, 0.99),
            "master_rss_mb": rss_mb(master.pid),
        }
        for k, v in result.items():
            print("%-32s %s" % (k, v))
        meta = {"nproc": os.cpu_count(), "python": sys.version.split()[0], "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        Path(args.json).write_text(json.dumps({"meta": meta, "result": result}, indent=2) + "\n")
        print("wrote", args.json)
        return 0
    finally:
        master.terminate()
        try:
            master.wait(timeout=30)
        except subprocess.TimeoutExpired:
            master.kill()


if __name__ == "__main__":
    sys.exit(main())
