#!/usr/bin/env python3
"""CPU per event of the relay processes, under one ``npbench`` load: the method behind the
performance passes in bench/README.md.

    python bench/cpu.py PATH LOAD [--seconds 4] [--workers N] [--go BIN] [--tree DIR]
    python bench/cpu.py PATH LOAD --pairs 6 --base DIR     # old/new pairs, order flipped each pair

PATH is a path of ``bench.py`` (``forward``, ``tunnel-rev-tls0``, ...), LOAD one of ``cps``
(a new connection per 64-byte request), ``udp`` (512-byte round trips) or ``tput`` (echo
throughput; the event is a MiB).  The relay processes' ``utime``/``stime`` are read from
``/proc/<pid>/stat`` (children included) just before and after the load; a run prints the
rate and the CPU per event of each process, user and system, in microseconds, its minor
page faults per event, its context switches per event (``switches``: voluntary, the times it
went to sleep with nothing to do, each a wake-up later; and involuntary, every thread
counted), and ``busy_cores``: how many of the machine's cores were busy during
the load (every process, from ``/proc/stat``) and how many of them the relays took, and
``steal_pct``: the share of the machine's CPU time the hypervisor gave to other guests
meanwhile (a run's slow minutes).  ``--tree``
runs npgevent from another checkout (a ``git worktree`` of an older commit, say);
``--pairs`` alternates ``--base`` and this checkout, flipping the order every pair, and
prints the means: absolute figures drift 10-30 % between minutes on a shared machine, the
pairs' difference much less.  ``--spy DIR`` records a ``py-spy`` raw profile of each process
during the load, ``--perf DIR`` a ``perf record`` (cpu-clock) one, ``--strace DIR`` its
syscall counts (``strace -c``: it slows the process, so read counts per event, not rates).
"""

from __future__ import annotations

import argparse
import compileall
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from compare import echo_target, find_npbench, npbench

import bench

TICK = os.sysconf("SC_CLK_TCK")
SPY = ["py-spy", "record", "-r", "250", "-f", "raw", "-d", "{seconds}", "-p", "{pid}", "-o", "{out}/{pid}.txt"]
PERF = ["perf", "record", "-q", "-e", "cpu-clock", "-F", "2000", "-p", "{pid}", "-o", "{out}/{pid}.data",
        "--", "sleep", "{seconds}"]
STRACE = ["timeout", "-s", "INT", "{seconds}", "strace", "-c", "-f", "-p", "{pid}", "-o", "{out}/{pid}.strace"]
EVENTS = {"cps": "cps", "udp": "rtt_per_s", "tput": "gbit_s"}


def tree_pids(root: int) -> list[int]:
    """*root* and its descendants (the workers of a ``workers=`` instance)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_ticks(pid: int) -> tuple[int, int, int]:
    """(user, system) clock ticks and minor page faults of *pid* and its descendants."""
    user = system = faults = 0
    for p in tree_pids(pid):
        try:
            with open("/proc/%d/stat" % p) as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user, system, faults = user + int(fields[11]), system + int(fields[12]), faults + int(fields[7])
    return user, system, faults


def switches(pid: int) -> tuple[int, int]:
    """Voluntary and involuntary context switches of *pid*'s threads and its descendants'."""
    counts = [0, 0]
    for p in tree_pids(pid):
        try:
            tasks = os.listdir("/proc/%d/task" % p)
        except OSError:
            continue
        for task in tasks:
            try:
                with open("/proc/%d/task/%s/status" % (p, task)) as fh:
                    for line in fh:
                        if line.startswith("voluntary_ctxt_switches:"):
                            counts[0] += int(line.split()[1])
                        elif line.startswith("nonvoluntary_ctxt_switches:"):
                            counts[1] += int(line.split()[1])
            except OSError:
                continue
    return counts[0], counts[1]


def load_args(load: str, addr: str, seconds: float, workers: int) -> list[str]:
    if load == "cps":
        return ["cps", "-addr", addr, "-workers", str(workers), "-dur", "%gs" % seconds, "-size", "64"]
    if load == "udp":
        return ["udp", "-addr", addr, "-workers", str(workers), "-dur", "%gs" % seconds, "-size", "512"]
    return ["tput", "-addr", addr, "-bytes", str(seconds_bytes(seconds))]


def seconds_bytes(seconds: float) -> int:
    """The echo's size for a *seconds* load: 32 MiB a second (about a second per Gbit/s)."""
    return int(seconds * (32 << 20))


def run_once(args: argparse.Namespace, tree: Path | None) -> dict[str, Any]:
    """Open the path (npgevent from *tree*, or Go with ``--go``), load it, read its CPU."""
    bench.ROOT = tree or bench.ROOT  # where spawn() runs npgevent from
    path = bench.PATHS[args.path](program=[args.go] if args.go else None)
    target, server = echo_target(args.npbench)
    spies: list[subprocess.Popen] = []
    try:
        addr = "127.0.0.1:%d" % path.open(target)
        time.sleep(args.warm)
        npbench(args.npbench, *load_args(args.load, addr, 1.0, args.workers))  # warm-up
        pids = [p.pid for p in path.procs]
        for folder, command in ((args.spy, SPY), (args.perf, PERF), (args.strace, STRACE)):
            if folder:
                os.makedirs(folder, exist_ok=True)
                spies += [subprocess.Popen([a.format(pid=pid, seconds=int(args.seconds), out=folder) for a in command],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for pid in pids]
        before = [cpu_ticks(pid) for pid in pids]
        switched = [switches(pid) for pid in pids]
        machine_before = bench.machine_ticks()
        start = time.monotonic()
        result = npbench(args.npbench, *load_args(args.load, addr, args.seconds, args.workers))
        elapsed = time.monotonic() - start
        machine_after = bench.machine_ticks()
        after = [cpu_ticks(pid) for pid in pids]
        switched = [(a[0] - b[0], a[1] - b[1]) for a, b in zip([switches(pid) for pid in pids], switched, strict=True)]
        for spy in spies:
            spy.wait(timeout=60)
    finally:
        path.close()
        bench.stop(server)
    rate = float(result[EVENTS[args.load]])
    events = seconds_bytes(args.seconds) / (1 << 20) if args.load == "tput" else rate * elapsed
    us = 1e6 / TICK / max(events, 1.0)
    cpu = [[round((a[0] - b[0]) * us, 1), round((a[1] - b[1]) * us, 1)] for a, b in zip(after, before, strict=True)]
    faults = [round((a[2] - b[2]) / max(events, 1.0), 2) for a, b in zip(after, before, strict=True)]
    # how many of the machine's cores were busy during the load (every process), and the
    # relays' share of them: a load that keeps every core busy is bound by the CPU per event
    # of all its processes together, which more processes per relay would not lower
    busy, _steal, total = (a - b for a, b in zip(machine_after, machine_before, strict=True))
    cores = os.cpu_count() or 1
    relays = sum((a[0] - b[0]) + (a[1] - b[1]) for a, b in zip(after, before, strict=True)) / TICK / elapsed
    return {"rate": round(rate, 3), "cpu_us": cpu, "faults": faults,
            "switches": [[round(v / max(events, 1.0), 2), round(n / max(events, 1.0), 2)] for v, n in switched],
            "busy_cores": [round(busy / max(total, 1) * cores, 2), round(relays, 2)],
            "steal_pct": bench.steal_pct(machine_before, machine_after), "result": result}


def mean(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    cpu = [[round(sum(r["cpu_us"][i][j] for r in rows) / n, 1) for j in (0, 1)] for i in range(len(rows[0]["cpu_us"]))]
    return {"rate": round(sum(r["rate"] for r in rows) / n, 3), "cpu_us": cpu,
            "steal_pct": round(sum(r["steal_pct"] for r in rows) / n, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", choices=sorted(bench.PATHS))
    ap.add_argument("load", choices=sorted(EVENTS))
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--workers", type=int, default=1, help="npbench workers (cps, udp)")
    ap.add_argument("--warm", type=float, default=1.0, help="seconds between opening the path and the load")
    ap.add_argument("--go", default="", help="measure this Go NodePass binary instead of npgevent")
    ap.add_argument("--npbench", default=os.environ.get("NPG_NPBENCH", ""))
    ap.add_argument("--tree", type=Path, help="run npgevent from this checkout")
    ap.add_argument("--pairs", type=int, default=0, help="alternate --base and --tree (or this checkout)")
    ap.add_argument("--base", type=Path, help="the checkout to compare against with --pairs")
    ap.add_argument("--spy", default="", help="write py-spy raw profiles into this folder")
    ap.add_argument("--perf", default="", help="write perf (cpu-clock) profiles into this folder")
    ap.add_argument("--strace", default="", help="write strace -c syscall counts into this folder")
    args = ap.parse_args()
    args.npbench = find_npbench(args.npbench, args.go)
    new = (args.tree or bench.ROOT).resolve()
    trees = [new] if not args.pairs else [(args.base or new).resolve(), new]
    for tree in trees:
        compileall.compile_dir(str(tree / "npgevent"), quiet=1)
    if not args.pairs:
        print(run_once(args, new))
        return 0
    rows: dict[Path, list[dict[str, Any]]] = {t: [] for t in trees}
    for i in range(args.pairs):
        for tree in (trees if i % 2 == 0 else trees[::-1]):
            r = run_once(args, tree)
            rows[tree].append(r)
            print("pair %d %-5s rate %s cpu_us %s steal %s%%" % (i + 1, "base" if tree == trees[0] else "new",
                                                                 r["rate"], r["cpu_us"], r["steal_pct"]))
            sys.stdout.flush()
    for tree, label in zip(trees, ("base", "new"), strict=True):
        print("mean %-5s %s" % (label, mean(rows[tree])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
