"""Direct, Go NodePass and npgevent side by side, measured by ``npbench`` in one run.

    NPG_GO_NODEPASS=.../nodepass python bench/bench.py [--only tunnel-rev-tls0] [--runs 3]

Each path (single-end forwarding, tunnels) is opened once with the Go program
and once with npgevent, against ``npbench serve`` (TCP and UDP echo), and
measured with the same ``npbench`` commands: echo throughput, connections per
second with 16 and 1 workers (a new connection per 64-byte request), UDP round
trips per second (4 workers, 512 bytes) and the relay's RSS (and its private, anonymous share);
with ``--pool-memory N``, the RSS each end adds per idle pool connection (N connections
against one, tls=0 and tls=1), Go's and npgevent's.  The figures that
steer the project are the ratios npgevent / Go from one run: absolute figures
drift 10-30 % between runs and machines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import ROOT, Path_, free_port, machine_ticks, pool_memory, steal_pct, stop, wait_port

METRICS: list[tuple[str, str, bool | None]] = [  # (key, label, higher is better; None: no ratio)
    ("echo_gbit_s", "echo Gbit/s", True),
    ("cps_16", "CPS@16", True),
    ("p99_ms_16", "p99 ms@16", False),
    ("cps_1", "CPS@1", True),
    ("udp_rtt_s", "UDP rtt/s", True),
    ("udp_loss", "UDP lost", False),
    ("idle_rss_mb", "idle RSS MB", False),
    ("idle_private_mb", "idle private MB", False),  # RssAnon: without shared file pages
    ("steal_pct", "CPU steal %", None),  # the machine's, during the loads: no ratio
]
DEFAULT_PATHS = ["forward", "tunnel-rev-tls0", "tunnel-rev-tls1", "tunnel-rev-quic"]


def npbench(binary: str, *args: str, timeout: float = 120.0) -> dict[str, Any]:
    out = subprocess.run([binary, *args], capture_output=True, text=True, timeout=timeout)
    line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "{}"
    result: dict[str, Any] = json.loads(line)
    if out.returncode != 0 or "error" in result:
        raise RuntimeError("npbench %s: %s %s" % (" ".join(args), result.get("error", ""), out.stderr.strip()))
    return result


def find_npbench(explicit: str | None, go: str | None = None) -> str:
    """The ``npbench`` binary: *explicit* (``--npbench``), else ``$NPG_NPBENCH``, else the one
    beside the Go NodePass binary (*go*, else ``$NPG_GO_NODEPASS``); exits with a one-line error
    if it is not an executable file."""
    found = explicit or os.environ.get("NPG_NPBENCH", "")
    if not found:
        go = go or os.environ.get("NPG_GO_NODEPASS", "")
        found = os.path.join(os.path.dirname(os.path.abspath(go)), "npbench") if go else ""
    if not (found and os.path.isfile(found) and os.access(found, os.X_OK)):
        raise SystemExit("npbench not found%s: --npbench, NPG_NPBENCH or NPG_GO_NODEPASS "
                         "(see ../shared/tools/README.md)" % (" at " + found if found else ""))
    return found


def echo_target(bench_bin: str) -> tuple[int, subprocess.Popen]:
    """``npbench serve`` (TCP and UDP echo) on a free loopback port, started and answering: its
    port and process (give it to :func:`bench.stop`)."""
    port = free_port()
    proc = subprocess.Popen([bench_bin, "serve", "-listen", "127.0.0.1:%d" % port],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
    except BaseException:
        stop(proc)
        raise
    return port, proc


def measure(path: Path_, bench_bin: str, seconds: float, size: int) -> dict[str, Any]:
    """One path, one program: every metric through ``npbench``."""
    target, server = echo_target(bench_bin)
    result: dict[str, Any] = {}
    try:
        port = path.open(target)
        time.sleep(1.0)
        path.settle()
        addr = "127.0.0.1:%d" % port
        if path.procs:
            result["idle_rss_mb"] = round(path.rss_kb() / 1024, 1)
            result["idle_private_mb"] = round(path.private_kb() / 1024, 1)
        npbench(bench_bin, "tput", "-addr", addr, "-bytes", str(min(size, 64 << 20)))  # warm-up
        ticks = machine_ticks()
        result["echo_gbit_s"] = round(npbench(bench_bin, "tput", "-addr", addr, "-bytes", str(size))["gbit_s"], 3)
        dur = "%gs" % seconds
        for workers in (16, 1):
            r = npbench(bench_bin, "cps", "-addr", addr, "-workers", str(workers), "-dur", dur, "-size", "64")
            result["cps_%d" % workers] = round(r["cps"])
            result["p99_ms_%d" % workers] = round(r["p99_ms"], 2)
            result["cps_fail_%d" % workers] = r["fail"]
        r = npbench(bench_bin, "udp", "-addr", addr, "-workers", "4", "-dur", dur, "-size", "512")
        result["udp_rtt_s"] = round(r["rtt_per_s"])
        result["udp_loss"] = r["loss"]
        result["steal_pct"] = steal_pct(ticks, machine_ticks())
        if path.procs:
            result["peak_rss_mb"] = round(path.peak_rss_kb() / 1024, 1)
    finally:
        path.close()
        stop(server)
    return result


def ratio(ours: Any, theirs: Any) -> str:
    if not isinstance(ours, (int, float)) or not isinstance(theirs, (int, float)) or not theirs:
        return "-"
    return "%.2f" % (ours / theirs)


def compare_main(args: argparse.Namespace, paths: dict[str, type[Path_]]) -> int:
    go = os.path.abspath(os.path.expanduser(args.go))
    bench_bin = args.npbench or os.path.join(os.path.dirname(go), "npbench")
    for what, binary in (("Go NodePass", go), ("npbench", bench_bin)):
        if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
            raise SystemExit("%s not found at %s (see ../shared/tools/README.md)" % (what, binary))
    names = args.only or DEFAULT_PATHS
    size = args.size_mib << 20
    runs: list[dict[str, Any]] = []
    for run in range(args.runs):
        direct = measure(Path_(), bench_bin, args.seconds, size)
        table: dict[str, Any] = {"direct": direct}
        for name in names:
            table[name] = {"go": measure(paths[name](program=[go]), bench_bin, args.seconds, size),
                           "npgevent": measure(paths[name](), bench_bin, args.seconds, size)}
        runs.append(table)
        print("run %d of %d" % (run + 1, args.runs))
        print("%-18s %-15s %10s %10s %10s %8s" % ("path", "metric", "direct", "go", "npgevent", "npg/go"))
        for name in names:
            for key, label, better in METRICS:
                g, n = table[name]["go"].get(key, "-"), table[name]["npgevent"].get(key, "-")
                print("%-18s %-15s %10s %10s %10s %8s" % (name, label, direct.get(key, "-"), g, n,
                                                          ratio(n, g) if better is not None else "-"))
    memory = []
    if args.pool_memory > 1:
        for tls in ("0", "1"):
            both = {"go": pool_memory(args.pool_memory, tls, [go]), "npgevent": pool_memory(args.pool_memory, tls)}
            memory.append(both)
            print("tls=%s: KB per idle pool connection (server, client): Go %s, %s; npgevent %s, %s" % (
                tls, both["go"]["server_kb_per_conn"], both["go"]["client_kb_per_conn"],
                both["npgevent"]["server_kb_per_conn"], both["npgevent"]["client_kb_per_conn"]))
    meta = {"nproc": os.cpu_count(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), "size_mib": args.size_mib,
            "seconds": args.seconds, "go": go}
    out = Path(args.json if args.json != str(ROOT / "bench" / "results.json") else ROOT / "bench" / "compare.json")
    out.write_text(json.dumps({"meta": meta, "runs": runs, "pool_memory": memory}, indent=2) + "\n")
    print("wrote", out)
    return 0
