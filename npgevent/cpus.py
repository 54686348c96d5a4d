"""How many CPUs this process may use: what ``workers=auto`` starts one worker per.

Two things narrow the machine's CPU count, and both are common where npgevent runs:

* the **affinity mask** (``taskset``, systemd's ``CPUAffinity=``, a container's cpuset):
  the CPUs the scheduler may put the process on;
* a **cgroup CPU quota** (``docker run --cpus=2``, a Kubernetes CPU limit, systemd's
  ``CPUQuota=``): the CPU time it may use per period, however many CPUs it may run on.
  Workers beyond the quota would only be throttled in turn.

:func:`usable_cpus` is the smaller of the two, the quota rounded up (a 1.5-CPU limit makes
two workers, a 0.5-CPU one makes one).  The quota is read the way the kernel applies it:
from the process's own cgroup and every ancestor up to the hierarchy's mount (the tightest
wins), in cgroup v2 (``cpu.max``) or in v1's ``cpu`` controller
(``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``).  Anything unreadable or malformed there
counts as no quota: the count can only be narrowed by what is certain.
"""

from __future__ import annotations

import math
import os

PROC = "/proc/self"


def usable_cpus(proc: str = PROC) -> int:
    """The CPUs this process may use (see the module docstring); *proc* is ``/proc/self``."""
    try:
        count = len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no affinity call on this platform
        count = os.cpu_count() or 1
    quota = cgroup_cpu_quota(proc)
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return count


def cgroup_cpu_quota(proc: str = PROC) -> float | None:
    """The tightest CPU quota over this process's cgroup and its ancestors, in CPUs (1.5 =
    one and a half CPUs' time per period), or None if there is none or it can't be read."""
    try:
        with open(os.path.join(proc, "mountinfo"), encoding="utf-8", errors="replace") as f:
            mounts = f.read()
        with open(os.path.join(proc, "cgroup"), encoding="utf-8", errors="replace") as f:
            groups = f.read()
    except OSError:
        return None
    found: list[float] = []
    for version, point, path in _cpu_hierarchies(mounts, groups):
        found.extend(_quotas_up(version, point, path))
    return min(found) if found else None


def _cpu_hierarchies(mounts: str, groups: str) -> list[tuple[int, str, str]]:
    """(version, mount point, the process's directory under it) for the cgroup v2 hierarchy
    and the v1 ``cpu`` one, where mounted and the process is in them."""
    paths: dict[int, str] = {}
    for line in groups.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            paths[2] = parts[2]
        elif "cpu" in parts[1].split(","):
            paths[1] = parts[2]
    out = []
    for line in mounts.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        tail = line.split(" - ", 1)[1].split()
        if len(tail) < 3:
            continue
        fstype, options = tail[0], tail[2].split(",")
        version = 2 if fstype == "cgroup2" else 1 if fstype == "cgroup" and "cpu" in options else 0
        if version not in paths:
            continue
        root, point, path = fields[3], fields[4], paths.pop(version)
        if root != "/" and (path == root or path.startswith(root + "/")):
            path = path[len(root):]  # the mount shows a subtree (a container's own cgroup)
        elif root != "/":
            continue  # the process's cgroup is not under this mount
        out.append((version, point, os.path.normpath(point + "/" + path.lstrip("/"))))
    return out


def _quotas_up(version: int, point: str, path: str) -> list[float]:
    """The quotas set on directory *path* and each parent up to the mount *point*."""
    found = []
    while True:
        quota = _quota(path, version)
        if quota is not None:
            found.append(quota)
        if path == point or len(path) <= len(point):
            return found
        path = os.path.dirname(path)


def _quota(directory: str, version: int) -> float | None:
    try:
        if version == 2:
            with open(os.path.join(directory, "cpu.max"), encoding="ascii") as f:
                quota, period = f.read().split()
            if quota == "max":
                return None
        else:
            with open(os.path.join(directory, "cpu.cfs_quota_us"), encoding="ascii") as f:
                quota = f.read().strip()
            with open(os.path.join(directory, "cpu.cfs_period_us"), encoding="ascii") as f:
                period = f.read().strip()
        q, p = int(quota), int(period)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if q <= 0 or p <= 0:  # v1's -1: no quota
        return None
    return q / p
