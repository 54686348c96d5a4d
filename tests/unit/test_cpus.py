"""workers=auto's CPU count: the affinity mask and the cgroup CPU quota (npgevent.cpus).

Each case builds a /proc/self (mountinfo, cgroup) and a cgroup tree in a temporary
directory, laid out as the kernel shows them on a pure v2 host, a v1 host, a container with
its own cgroup namespace, and a container whose mount shows a subtree.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from npgevent import cpus


def layout(tmp_path: Path, mounts: list[str], groups: list[str], files: dict[str, str]) -> str:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "mountinfo").write_text("".join(line.replace("ROOT", str(tmp_path)) + "\n" for line in mounts))
    (proc / "cgroup").write_text("".join(line + "\n" for line in groups))
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(proc)


V2_MOUNT = "30 23 0:26 / ROOT/cg rw,nosuid - cgroup2 cgroup2 rw,nsdelegate"
V1_MOUNT = "32 31 0:29 / ROOT/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct"
CPUSET_MOUNT = "34 31 0:31 / ROOT/cpuset rw,relatime - cgroup cgroup rw,cpuset"


def test_v2_quota_of_the_process_cgroup(tmp_path):
    proc = layout(tmp_path, [V2_MOUNT], ["0::/system.slice/np.service"],
                  {"cg/system.slice/np.service/cpu.max": "150000 100000\n",
                   "cg/system.slice/cpu.max": "max 100000\n"})
    assert cpus.cgroup_cpu_quota(proc) == 1.5


def test_v2_the_tightest_ancestor_wins(tmp_path):
    proc = layout(tmp_path, [V2_MOUNT], ["0::/a/b/c"],
                  {"cg/a/b/c/cpu.max": "400000 100000", "cg/a/b/cpu.max": "max 100000",
                   "cg/a/cpu.max": "50000 100000", "cg/cpu.max": "800000 100000"})
    assert cpus.cgroup_cpu_quota(proc) == 0.5


def test_v2_no_quota_anywhere(tmp_path):
    proc = layout(tmp_path, [V2_MOUNT], ["0::/user.slice"], {"cg/user.slice/cpu.max": "max 100000"})
    assert cpus.cgroup_cpu_quota(proc) is None


def test_v1_cpu_controller_quota(tmp_path):
    proc = layout(tmp_path, [CPUSET_MOUNT, V1_MOUNT],
                  ["5:cpuset:/", "4:cpu,cpuacct:/docker/abc", "0::/"],
                  {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "200000\n",
                   "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
                   "cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert cpus.cgroup_cpu_quota(proc) == 2.0


def test_a_container_mount_showing_its_own_subtree(tmp_path):
    """Without a cgroup namespace, a container's mount shows /docker/abc as its root and
    /proc/self/cgroup the full path: the quota is on the mount point itself."""
    mount = "40 39 0:29 /docker/abc ROOT/cpu rw - cgroup cgroup rw,cpu"
    proc = layout(tmp_path, [mount], ["3:cpu:/docker/abc"],
                  {"cpu/cpu.cfs_quota_us": "100000", "cpu/cpu.cfs_period_us": "100000"})
    assert cpus.cgroup_cpu_quota(proc) == 1.0


def test_a_cgroup_namespace_root(tmp_path):
    proc = layout(tmp_path, [V2_MOUNT], ["0::/"], {"cg/cpu.max": "300000 100000"})
    assert cpus.cgroup_cpu_quota(proc) == 3.0


@pytest.mark.parametrize("text", ["", "garbage", "100000", "1e5 100000", "100000 0", "-5 100000",
                                  "\xff\xfe", "100000 100000 100000"])
def test_malformed_quota_files_count_as_no_quota(tmp_path, text):
    proc = layout(tmp_path, [V2_MOUNT], ["0::/x"], {"cg/x/cpu.max": text})
    assert cpus.cgroup_cpu_quota(proc) is None


@pytest.mark.parametrize(("mounts", "groups"), [
    ([], ["0::/x"]),                                    # no cgroup mounted
    ([V2_MOUNT], []),                                   # the process in no cgroup
    (["garbage", "1 2 3", " - "], ["0::/x", "::", "x"]),  # malformed lines
    (["40 39 0:29 /other ROOT/cg rw - cgroup2 cgroup2 rw"], ["0::/x"]),  # not under the mount
])
def test_nothing_certain_counts_as_no_quota(tmp_path, mounts, groups):
    proc = layout(tmp_path, mounts, groups, {"cg/x/cpu.max": "100000 100000", "cg/cpu.max": "100000 100000"})
    assert cpus.cgroup_cpu_quota(proc) is None


def test_no_proc_files_count_as_no_quota(tmp_path):
    assert cpus.cgroup_cpu_quota(str(tmp_path / "missing")) is None


def test_usable_cpus_is_the_smaller_of_affinity_and_quota_rounded_up(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    cases = (("150000 100000", 2), ("20000 100000", 1), ("max 100000", 8), ("1600000 100000", 8))
    for n, (quota, expected) in enumerate(cases):
        root = tmp_path / str(n)
        root.mkdir()
        proc = layout(root, [V2_MOUNT], ["0::/"], {"cg/cpu.max": quota})
        assert cpus.usable_cpus(proc) == expected, quota


def test_usable_cpus_of_this_process_is_within_its_affinity():
    assert 1 <= cpus.usable_cpus() <= len(os.sched_getaffinity(0))
