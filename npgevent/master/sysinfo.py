"""Host metrics for ``GET /info``, read from /proc as NodePass does (Linux only)."""

from __future__ import annotations

import platform
import sys

import gevent

_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "i386": "386",
         "i686": "386", "armv7l": "arm", "armv6l": "arm", "ppc64le": "ppc64le", "s390x": "s390x",
         "riscv64": "riscv64", "mips": "mips", "mips64": "mips64"}
_SKIP_NET = ("lo", "veth", "docker", "podman", "br-", "virbr")


def goos() -> str:
    return {"linux": "linux", "darwin": "darwin", "win32": "windows"}.get(sys.platform, sys.platform)


def goarch() -> str:
    machine = platform.machine().lower()
    return _ARCH.get(machine, machine)


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as fh:
        for line in fh:
            if line.startswith("cpu "):
                nums = [int(x) for x in line.split()[1:]]
                return sum(nums), nums[3]
    raise OSError("no cpu line in /proc/stat")


def cpu_percent(interval: float = 0.1) -> int:
    try:
        total1, idle1 = _cpu_times()
        gevent.sleep(interval)
        total2, idle2 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return -1
    dt = total2 - total1
    if dt <= 0:
        return 0
    return min(100, (dt - (idle2 - idle1)) * 100 // dt)


def memory() -> dict[str, int]:
    info: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts:
                    info[key] = int(parts[0]) * 1024
    except (OSError, ValueError):
        return {"mem_total": 0, "mem_used": 0, "swap_total": 0, "swap_used": 0}
    return {
        "mem_total": info.get("MemTotal", 0),
        "mem_used": info.get("MemTotal", 0) - info.get("MemAvailable", 0),
        "swap_total": info.get("SwapTotal", 0),
        "swap_used": info.get("SwapTotal", 0) - info.get("SwapFree", 0),
    }


def network() -> dict[str, int]:
    rx = tx = 0
    try:
        with open("/proc/net/dev") as fh:
            for line in list(fh)[2:]:
                fields = line.replace(":", ": ", 1).split()
                name = fields[0].rstrip(":")
                if name.startswith(_SKIP_NET) or len(fields) < 10:
                    continue
                rx += int(fields[1])
                tx += int(fields[9])
    except (OSError, ValueError):
        return {"netrx": 0, "nettx": 0}
    return {"netrx": rx, "nettx": tx}


def disks() -> dict[str, int]:
    read = written = 0
    try:
        with open("/proc/diskstats") as fh:
            for line in fh:
                f = line.split()
                if len(f) < 14:
                    continue
                name = f[2]
                if "loop" in name or "ram" in name or name.startswith(("dm-", "md")) or name[-1:].isdigit():
                    continue
                read += int(f[5]) * 512
                written += int(f[9]) * 512
    except (OSError, ValueError):
        return {"diskr": 0, "diskw": 0}
    return {"diskr": read, "diskw": written}


def uptime() -> int:
    try:
        with open("/proc/uptime") as fh:
            return int(float(fh.read().split()[0]))
    except (OSError, ValueError, IndexError):
        return 0


def host_metrics() -> dict[str, int]:
    """cpu (-1 if unknown), memory, swap, network and disk counters, host uptime."""
    if not sys.platform.startswith("linux"):
        return {"cpu": -1, "mem_total": 0, "mem_used": 0, "swap_total": 0, "swap_used": 0,
                "netrx": 0, "nettx": 0, "diskr": 0, "diskw": 0, "sysup": 0}
    out = {"cpu": cpu_percent()}
    out.update(memory())
    out.update(network())
    out.update(disks())
    out["sysup"] = uptime()
    return out

