#!/usr/bin/env python3
"""What spreading a tunnel over two processes per end could buy on this machine, at most.

    python bench/split_bound.py PATH LOAD [--rounds 3] [--seconds 5] [--go BIN]

docs/scaling.md designs a tunnel whose user sessions are spread over several data processes
per end behind one control connection.  Before building it, this measures its upper bound:
the same load, from two ``npbench`` processes at once, carried either by **one** tunnel (both
load generators on it) or by **two** independent tunnels (one each: two server and two client
processes, no signal or pool shared, so none of the coordination the design would add).
Rounds alternate the two (order flipped every round) in the same minutes; with ``--go`` the
one-tunnel layout of Go NodePass is measured in each round too.  The gain of "two" over
"one" is the most the design could give here: its control process would only add to it.

LOAD: ``udp`` (two ``npbench udp`` of 2 workers each: the bench's 4 round trips in
flight), ``cps`` (two of 8 workers: the bench's 16) or ``tput`` (two echo streams of
``--mib`` MiB each).  PATH: a tunnel path of ``bench.py`` (``tunnel-rev-tls1``...).
"""

from __future__ import annotations

import argparse
import compileall
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from compare import echo_target, find_npbench, npbench

import bench

SPLIT = {"udp": 2, "cps": 8}  # workers per npbench process
KEY = {"udp": "rtt_per_s", "cps": "cps", "tput": "gbit_s"}


def load_args(load: str, addr: str, seconds: float, mib: int) -> list[str]:
    if load == "tput":
        return ["tput", "-addr", addr, "-bytes", str(mib << 20)]
    extra = ["-size", "64"] if load == "cps" else ["-size", "512"]
    return [load, "-addr", addr, "-workers", str(SPLIT[load]), "-dur", "%gs" % seconds, *extra]


def concurrent(bench_bin: str, argvs: list[list[str]]) -> list[dict[str, Any]]:
    """Run the npbench commands at the same time (one thread each); their JSON results."""
    with ThreadPoolExecutor(len(argvs)) as pool:
        return list(pool.map(lambda argv: npbench(bench_bin, *argv, timeout=180.0), argvs))


def layout(path_cls: type[bench.Path_], tunnels: int, bench_bin: str, load: str,
           seconds: float, mib: int, program: list[str] | None) -> float:
    """Open *tunnels* tunnels of *path_cls* to one echo target, run two load generators spread
    over them, return the summed rate."""
    target, server = echo_target(bench_bin)
    paths = [path_cls(program=program) for _ in range(tunnels)]
    try:
        ports = [p.open(target) for p in paths]
        for p in paths:
            p.settle()
        addrs = ["127.0.0.1:%d" % ports[i % tunnels] for i in range(2)]
        if load == "tput":  # warm-up, as bench.py
            concurrent(bench_bin, [load_args(load, a, seconds, 8) for a in addrs])
        results = concurrent(bench_bin, [load_args(load, a, seconds, mib) for a in addrs])
        return sum(float(r[KEY[load]]) for r in results)
    finally:
        for p in paths:
            p.close()
        bench.stop(server)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", choices=[n for n in bench.PATHS if n.startswith("tunnel-")])
    ap.add_argument("load", choices=sorted(KEY))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--mib", type=int, default=64, help="MiB per echo stream (tput)")
    ap.add_argument("--go", default=os.environ.get("NPG_GO_NODEPASS"), help="Go NodePass binary")
    ap.add_argument("--npbench", help="npbench binary (default $NPG_NPBENCH, else beside the Go binary)")
    args = ap.parse_args()
    args.npbench = find_npbench(args.npbench, args.go)
    compileall.compile_dir(str(bench.ROOT / "npgevent"), quiet=1)
    cls = bench.PATHS[args.path]
    rates: dict[str, list[float]] = {"one": [], "two": [], "go": []}
    for rnd in range(args.rounds):
        order = ["one", "two"] if rnd % 2 == 0 else ["two", "one"]
        if args.go:
            order.append("go")
        for what in order:
            tunnels = 2 if what == "two" else 1
            program = [args.go] if what == "go" else None
            rates[what].append(layout(cls, tunnels, args.npbench, args.load, args.seconds,
                                      args.mib, program))
            time.sleep(0.5)
        print("round %d: %s" % (rnd + 1, "  ".join("%s %.3f" % (k, v[-1]) for k, v in rates.items() if v)),
              flush=True)
    one, two = sum(rates["one"]) / len(rates["one"]), sum(rates["two"]) / len(rates["two"])
    line = "%s %s: one tunnel %.3f, two tunnels %.3f (two/one %.2f)" % (args.path, args.load, one, two, two / one)
    if rates["go"]:
        go = sum(rates["go"]) / len(rates["go"])
        line += "; Go one tunnel %.3f (one/Go %.2f, two/Go %.2f)" % (go, one / go, two / go)
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
