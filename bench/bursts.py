#!/usr/bin/env python3
"""Bursts of new connections, one after another on one path, with idle pauses between them.

    python bench/bursts.py PATH [--go BIN] [--seconds 5] [--pauses 5,5,20,60]

``bench.py`` measures connections per second once per path, right after the echo load: for
Go NodePass's tunnels that is its best burst.  Its client pool adapts (the pool of
NodePassProject/pool v1.0.49: the refill interval grows by 100 ms per refill round while
the pool stands idle, up to ``NP_MAX_POOL_INTERVAL``, 1 s, and shrinks by 100 ms per round
once it runs low), so a burst that meets a pool idle for a while waits up to a second for
each refill.  This opens PATH (npgevent's, or Go's with ``--go``) and runs ``npbench cps``
with 16 workers once, then again after each pause, printing each burst's rate and p99.
"""

from __future__ import annotations

import argparse
import sys
import time

from compare import echo_target, find_npbench, npbench

import bench


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", choices=sorted(bench.PATHS))
    ap.add_argument("--go", help="measure this Go NodePass binary instead of npgevent")
    ap.add_argument("--npbench", help="npbench binary (default $NPG_NPBENCH, else beside the Go binary)")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--pauses", default="5,5,20,60", help="idle seconds before each later burst")
    args = ap.parse_args()
    nb = find_npbench(args.npbench, args.go)
    pauses = [float(p) for p in args.pauses.split(",") if p]
    target, server = echo_target(nb)
    path = bench.PATHS[args.path](program=[args.go] if args.go else None)
    try:
        addr = "127.0.0.1:%d" % path.open(target)
        path.settle()
        for i, pause in enumerate([0.0, *pauses]):
            time.sleep(pause)
            r = npbench(nb, "cps", "-addr", addr, "-workers", "16", "-dur", "%gs" % args.seconds, "-size", "64")
            print("burst %d (after %gs idle): %d connections/s, p99 %.1f ms, %d failed" % (
                i + 1, pause, r["cps"], r["p99_ms"], r["fail"]), flush=True)
    finally:
        path.close()
        bench.stop(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
