#!/usr/bin/env python3
"""npgevent benchmark: direct loopback vs. through npgevent.

    python bench/bench.py [--size-mib 1024] [--seconds 5] [--json out.json] [--only forward]

Measures, on 127.0.0.1 with helper servers in their own processes:

* throughput: one TCP stream of --size-mib MiB from a sender to a sink
  (``sendall`` of 1 MiB blocks / ``recv_into`` 1 MiB), direct and through the path;
* CPS: connect, send 64 bytes, read the 64-byte echo, close; 1 and 16 concurrent
  workers (gevent greenlets) for --seconds each, with p50/p99 latency;
* idle RSS of the npgevent process(es).

Paths: ``forward`` (single-end client), and the tunnel paths added by later
issues.  Prints a table and writes JSON.  Goals (issue 4): single-end
throughput >= 0.9x direct, CPS at 16 workers >= 0.7x direct, idle RSS <= 40 MB.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 1 << 20


# -- helper servers (run as subprocesses: python bench.py sink|echo PORT) ---------------


def run_sink(port: int) -> None:
    """Accept connections; count bytes until EOF; answer with the count (8 bytes)."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(16)
    buf = bytearray(BLOCK)
    while True:
        conn, _ = srv.accept()
        total = 0
        while True:
            n = conn.recv_into(buf)
            if not n:
                break
            total += n
        conn.sendall(total.to_bytes(8, "big"))
        conn.close()


def run_bulk_echo(port: int) -> None:
    """Plain echo for the echo-throughput test (1 MiB reads, one thread per connection)."""
    import threading

    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(16)

    def serve(conn: socket.socket) -> None:
        buf = bytearray(BLOCK)
        view = memoryview(buf)
        while True:
            n = conn.recv_into(buf)
            if not n:
                break
            conn.sendall(view[:n])
        conn.close()

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def echo_throughput(port: int, size: int) -> float:
    """Send *size* bytes and read them back concurrently; Gbit/s of the one-way volume."""
    import threading

    payload = memoryview(os.urandom(BLOCK))
    sock = socket.create_connection(("127.0.0.1", port))
    start = time.perf_counter()

    t = threading.Thread(target=send_blocks, args=(sock, payload, size))
    t.start()
    buf = bytearray(BLOCK)
    got = 0
    while got < size:
        n = sock.recv_into(buf)
        if not n:
            break
        got += n
    elapsed = time.perf_counter() - start
    t.join()
    sock.close()
    if got != size:
        raise RuntimeError("echo returned %d of %d bytes" % (got, size))
    return size * 8 / elapsed / 1e9


def run_echo(port: int) -> None:
    """gevent echo server for the CPS test."""
    from gevent.server import StreamServer

    def handle(sock, _addr):
        while True:
            data = sock.recv(65536)
            if not data:
                return
            sock.sendall(data)

    server = StreamServer(("127.0.0.1", port), handle, backlog=4096)
    server.serve_forever()


# -- utilities ---------------------------------------------------------------------------


def free_port() -> int:
    for _ in range(50):
        t = socket.socket()
        t.bind(("127.0.0.1", 0))
        port = t.getsockname()[1]
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            u.bind(("127.0.0.1", port))
            return int(port)
        except OSError:
            continue
        finally:
            u.close()
            t.close()
    raise RuntimeError("no free port")


def wait_port(port: int, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("port %d did not open" % port)


def spawn(*args: str, env: dict[str, str] | None = None, quiet: bool = True) -> subprocess.Popen:
    full = dict(os.environ)
    full["PYTHONPATH"] = str(ROOT) + os.pathsep + full.get("PYTHONPATH", "")
    full.setdefault("NP_REPORT_INTERVAL", "5s")
    if env:
        full.update(env)
    out = subprocess.DEVNULL if quiet else None
    # "python -m" puts the working directory first on sys.path, before PYTHONPATH: run it in
    # ROOT, or a checkout in the working directory is what runs (cpu.py --base/--tree)
    cwd = str(ROOT) if args[:1] == ("-m",) else None
    return subprocess.Popen([sys.executable, *args], env=full, stdout=out, stderr=out, cwd=cwd)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rss_kb(pid: int, field: str = "VmRSS:") -> int:
    with open("/proc/%d/status" % pid) as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def machine_ticks() -> tuple[int, int, int]:
    """(busy, steal, all) clock ticks of the whole machine, every CPU together (``/proc/stat``).
    Steal is time the hypervisor gave this VM's CPUs to other guests while they had work:
    what makes a run's slow minutes, apart from the code."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    total = sum(fields[:8])  # guest time is already in user
    return total - idle, fields[7], total


def steal_pct(before: tuple[int, int, int], after: tuple[int, int, int]) -> float:
    """The share of the machine's CPU time stolen between two :func:`machine_ticks`, in %."""
    return round(100.0 * (after[1] - before[1]) / max(after[2] - before[2], 1), 1)


def send_blocks(sock: socket.socket, payload: memoryview, size: int) -> None:
    """Send *size* bytes in BLOCK-sized slices of *payload*, then half-close."""
    left = size
    while left:
        n = min(left, BLOCK)
        sock.sendall(payload[:n])
        left -= n
    sock.shutdown(socket.SHUT_WR)


def throughput(port: int, size: int) -> float:
    """Send *size* bytes to *port*; return Gbit/s measured until the sink confirmed them."""
    payload = memoryview(os.urandom(BLOCK))
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    start = time.perf_counter()
    send_blocks(sock, payload, size)
    got = b""
    while len(got) < 8:
        chunk = sock.recv(8 - len(got))
        if not chunk:
            break
        got += chunk
    elapsed = time.perf_counter() - start
    sock.close()
    if int.from_bytes(got, "big") != size:
        raise RuntimeError("sink received %r of %d bytes" % (got, size))
    return size * 8 / elapsed / 1e9


def cps(port: int, workers: int, seconds: float) -> dict[str, float]:
    """Run the CPS client in a fresh process (gevent); return its measurements."""
    out = subprocess.run([sys.executable, __file__, "cps-client", str(port), str(workers), str(seconds)],
                         capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def run_cps_client(port: int, workers: int, seconds: float) -> None:
    from gevent import monkey

    monkey.patch_all()
    import gevent

    payload = b"x" * 64
    lat: list[float] = []
    errors = [0]
    stop_at = [0.0]

    def worker() -> None:
        while time.perf_counter() < stop_at[0]:
            t0 = time.perf_counter()
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.sendall(payload)
                got = b""
                while len(got) < 64:
                    chunk = s.recv(64 - len(got))
                    if not chunk:
                        break
                    got += chunk
                s.close()
                if got != payload:
                    errors[0] += 1
                    continue
            except OSError:
                errors[0] += 1
                continue
            lat.append(time.perf_counter() - t0)

    # warm-up (fills caches, starts pools) then the measured run
    stop_at[0] = time.perf_counter() + 0.5
    gevent.joinall([gevent.spawn(worker) for _ in range(workers)])
    lat.clear()
    errors[0] = 0
    start = time.perf_counter()
    stop_at[0] = start + seconds
    gevent.joinall([gevent.spawn(worker) for _ in range(workers)])
    elapsed = time.perf_counter() - start
    lat.sort()

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(len(lat) * p))] * 1000 if lat else 0.0

    print(json.dumps({"cps": len(lat) / elapsed, "p50_ms": pct(0.50), "p99_ms": pct(0.99),
                      "errors": errors[0], "count": len(lat)}))


# -- paths ---------------------------------------------------------------------------------


class Path_:
    """A way from the client to a server port: direct, or through npgevent (or, with *program*,
    Go NodePass) processes."""

    name = "direct"

    def __init__(self, program: list[str] | None = None) -> None:
        self.procs: list[subprocess.Popen] = []
        self.program = program  # None: npgevent

    def launch(self, url: str, env: dict[str, str] | None = None) -> None:
        if self.program is None:
            self.procs.append(spawn("-m", "npgevent", url, env=env))
        else:
            full = dict(os.environ)
            full.setdefault("NP_REPORT_INTERVAL", "5s")
            full.update(env or {})
            self.procs.append(subprocess.Popen([*self.program, url], env=full, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL))

    def open(self, target_port: int) -> int:
        return target_port

    def close(self) -> None:
        for p in self.procs:
            stop(p)
        self.procs.clear()

    def rss_kb(self) -> int:
        return sum(rss_kb(p.pid) for p in self.procs if p.poll() is None)

    def peak_rss_kb(self) -> int:
        return sum(rss_kb(p.pid, "VmHWM:") for p in self.procs if p.poll() is None)

    def settle(self, quiet: float = 1.5, timeout: float = 20.0) -> None:
        """Wait until the processes' sockets and RSS have not changed for *quiet* seconds: their
        pools are full, so the idle figures are a full pool's.  (Go NodePass's client may
        take seconds to start its pool: to its server the readiness probe of :func:`wait_port`
        is a failed handshake, after which it waits its 3 s service cooldown.)"""
        def state() -> list[tuple[int, int]]:
            return [(_open_sockets(p.pid), rss_kb(p.pid) >> 8) for p in self.procs if p.poll() is None]

        deadline = time.monotonic() + timeout
        last, since = state(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.25)
            now = state()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return

    def private_kb(self) -> int:
        """The anonymous share of :meth:`rss_kb`: memory the processes hold privately (the heap,
        Python's objects, relocated library data), without the pages of program and library
        files mapped from the page cache, which every process running them shares."""
        return sum(rss_kb(p.pid, "RssAnon:") for p in self.procs if p.poll() is None)


class ForwardPath(Path_):
    name = "forward"
    env: dict[str, str] | None = None

    def open(self, target_port: int) -> int:
        port = free_port()
        self.launch("client://127.0.0.1:%d/127.0.0.1:%d?mode=1&log=warn" % (port, target_port), env=self.env)
        wait_port(port)
        return port


class TunnelPath(Path_):
    """A server and a client process; users enter at the receiving side."""

    flow = "rev"
    tls = "0"
    quic = False
    env: dict[str, str] | None = None

    @property
    def name(self) -> str:  # type: ignore[override]
        return "tunnel-%s-%s" % (self.flow, "quic" if self.quic else "tls" + self.tls)

    def open(self, target_port: int) -> int:
        tport, uport = free_port(), free_port()
        q = "tls=%s%s&log=warn" % (self.tls, "&quic=1" if self.quic else "")
        if self.flow == "rev":
            server = "server://bench@127.0.0.1:%d/127.0.0.1:%d?mode=1&%s" % (tport, uport, q)
            client = "client://bench@127.0.0.1:%d/127.0.0.1:%d?mode=2&log=warn" % (tport, target_port)
        else:
            server = "server://bench@127.0.0.1:%d/127.0.0.1:%d?mode=2&%s" % (tport, target_port, q)
            client = "client://bench@127.0.0.1:%d/127.0.0.1:%d?mode=2&log=warn" % (tport, uport)
        self.launch(server, env=self.env)
        wait_port(tport)
        self.launch(client, env=self.env)
        wait_port(uport)
        time.sleep(2.0)  # let the pool fill
        return uport


def tunnel_path(flow: str, tls: str, quic: bool = False) -> type[Path_]:
    return type("Tunnel_%s_%s%s" % (flow, tls, "q" if quic else ""), (TunnelPath,),
                {"flow": flow, "tls": tls, "quic": quic})


PATHS: dict[str, type[Path_]] = {"forward": ForwardPath}
# single-end over 2 worker processes (NP_WORKERS: a Go peer ignores it); RSS is the parent's only
PATHS["forward-w2"] = type("ForwardW2", (ForwardPath,), {"name": "forward-w2", "env": {"NP_WORKERS": "2"}})
for _flow in ("rev", "fwd"):
    for _tls in ("0", "1"):
        PATHS["tunnel-%s-tls%s" % (_flow, _tls)] = tunnel_path(_flow, _tls)
        # the same tunnel with Go's handshake only: what authentication costs (the default,
        # auth=1, authenticates between npgevent peers)
        PATHS["tunnel-%s-tls%s-auth0" % (_flow, _tls)] = type(
            "Tunnel_%s_%s_a0" % (_flow, _tls), (PATHS["tunnel-%s-tls%s" % (_flow, _tls)],),
            {"env": {"NP_AUTH": "0"}, "name": property(lambda self: "tunnel-%s-tls%s-auth0" % (self.flow, self.tls))})
    PATHS["tunnel-%s-quic" % _flow] = tunnel_path(_flow, "1", quic=True)
    PATHS["tunnel-%s-quic16k" % _flow] = type("Tunnel_%s_q16k" % _flow, (PATHS["tunnel-%s-quic" % _flow],), {
        "env": {"NP_QUIC_DATAGRAM_SIZE": "16000"},
        "name": property(lambda self: "tunnel-%s-quic16k" % self.flow)})


def pool_memory(n: int, tls: str, program: list[str] | None = None) -> dict:
    """RSS per idle pool connection: a tunnel holding *n* idle connections vs. one holding 1
    (npgevent's, or with *program* Go NodePass's)."""
    out: dict = {"tls": tls, "connections": n}
    sizes = {}
    for count in (1, n):
        tport, uport = free_port(), free_port()
        ends = Path_(program)
        try:
            ends.launch("server://m@127.0.0.1:%d/127.0.0.1:%d?mode=1&tls=%s&max=%d&log=warn"
                        % (tport, uport, tls, count))
            wait_port(tport)
            ends.launch("client://m@127.0.0.1:%d/127.0.0.1:1?mode=2&min=%d&log=warn" % (tport, count))
            server, client = ends.procs
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if _open_sockets(server.pid) >= count + 2 and _open_sockets(client.pid) >= count + 1:
                    break
                time.sleep(0.2)
            time.sleep(2.0)
            sizes[count] = (rss_kb(server.pid), rss_kb(client.pid))
        finally:
            ends.close()
    out["server_kb_per_conn"] = round((sizes[n][0] - sizes[1][0]) / (n - 1), 2)
    out["client_kb_per_conn"] = round((sizes[n][1] - sizes[1][1]) / (n - 1), 2)
    out["server_rss_mb"] = round(sizes[n][0] / 1024, 1)
    out["client_rss_mb"] = round(sizes[n][1] / 1024, 1)
    return out


def _open_sockets(pid: int) -> int:
    try:
        return sum(1 for fd in os.listdir("/proc/%d/fd" % pid)
                   if os.readlink("/proc/%d/fd/%s" % (pid, fd)).startswith("socket:"))
    except OSError:
        return 0


def measure(path: Path_, size: int, seconds: float, skip_cps: bool) -> dict:
    result: dict = {"path": path.name}
    sink_port = free_port()
    sink = spawn(__file__, "sink", str(sink_port))
    echo_port = free_port()
    echo = spawn(__file__, "echo", str(echo_port))
    bulk_port = free_port()
    bulk = spawn(__file__, "bulk-echo", str(bulk_port))
    try:
        wait_port(sink_port)
        wait_port(echo_port)
        wait_port(bulk_port)
        port = path.open(sink_port)
        time.sleep(1.0)
        path.settle()
        if path.procs:
            result["idle_rss_mb"] = round(path.rss_kb() / 1024, 1)
        throughput(port, min(size, 64 << 20))  # warm-up
        result["gbit_s"] = round(throughput(port, size), 2)
        if path.procs:
            result["peak_rss_mb"] = round(path.peak_rss_kb() / 1024, 1)
        path.close()
        port = path.open(bulk_port)
        echo_throughput(port, min(size, 64 << 20))
        result["echo_gbit_s"] = round(echo_throughput(port, size), 2)
        path.close()
        if not skip_cps:
            port = path.open(echo_port)
            time.sleep(0.5)
            for workers in (1, 16):
                r = cps(port, workers, seconds)
                result["cps_%d" % workers] = round(r["cps"])
                result["p50_ms_%d" % workers] = round(r["p50_ms"], 2)
                result["p99_ms_%d" % workers] = round(r["p99_ms"], 2)
                result["errors_%d" % workers] = r["errors"]
            path.close()
    finally:
        path.close()
        stop(sink)
        stop(echo)
        stop(bulk)
    return result


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] in ("sink", "echo", "bulk-echo"):
        {"sink": run_sink, "echo": run_echo, "bulk-echo": run_bulk_echo}[sys.argv[1]](int(sys.argv[2]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "cps-client":
        run_cps_client(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--only", action="append", choices=sorted(PATHS), help="paths to run (default all)")
    ap.add_argument("--no-cps", action="store_true")
    ap.add_argument("--pool-memory", type=int, default=1000, metavar="N",
                    help="idle pool connections for the memory measurement (0 = skip)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results.json"))
    ap.add_argument("--go", default=os.environ.get("NPG_GO_NODEPASS", ""),
                    help="Go NodePass binary: measure direct, Go and npgevent side by side with npbench "
                         "(default $NPG_GO_NODEPASS)")
    ap.add_argument("--npbench", default=os.environ.get("NPG_NPBENCH", ""),
                    help="npbench binary (default $NPG_NPBENCH, else next to the Go binary)")
    ap.add_argument("--runs", type=int, default=1, help="with --go: repeat the comparison (spread)")
    args = ap.parse_args()
    # what an installed npgevent runs from (pip compiles it): without the bytecode, each
    # process would compile its sources at start, ~1 MB more RSS where PYTHONDONTWRITEBYTECODE
    # is set
    compileall.compile_dir(str(ROOT / "npgevent"), quiet=1)
    if args.go:
        from compare import compare_main

        return compare_main(args, PATHS)
    names = args.only or list(PATHS)
    results = [measure(Path_(), args.size_mib << 20, args.seconds, args.no_cps)]
    for name in names:
        results.append(measure(PATHS[name](), args.size_mib << 20, args.seconds, args.no_cps))
    direct = results[0]
    for r in results:
        r["gbit_ratio"] = round(r["gbit_s"] / direct["gbit_s"], 2)
        r["echo_ratio"] = round(r["echo_gbit_s"] / direct["echo_gbit_s"], 2)
        if "cps_16" in r:
            r["cps16_ratio"] = round(r["cps_16"] / direct["cps_16"], 2)
    cols = ["path", "gbit_s", "gbit_ratio", "echo_gbit_s", "echo_ratio", "cps_1", "p50_ms_1", "p99_ms_1", "cps_16", "cps16_ratio",
            "p50_ms_16", "p99_ms_16", "idle_rss_mb", "peak_rss_mb"]
    print("  ".join("%12s" % c for c in cols))
    for r in results:
        print("  ".join("%12s" % r.get(c, "-") for c in cols))
    memory = []
    if args.pool_memory and any(n.startswith("tunnel") and "quic" not in n for n in names):
        for tls in ("0", "1"):
            memory.append(pool_memory(args.pool_memory, tls))
            print("idle pool memory:", memory[-1])
    meta = {"nproc": os.cpu_count(), "python": sys.version.split()[0], "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "size_mib": args.size_mib, "seconds": args.seconds}
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results, "pool_memory": memory},
                                          indent=2) + "\n")
    print("wrote", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
