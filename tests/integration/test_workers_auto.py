"""workers=auto through the CLI: one worker per CPU the process may use, not per CPU of the
machine.  The narrowing is made for real: ``taskset`` for the affinity, and a cgroup the test
creates (and removes) for a CPU quota, skipped where the machine allows neither."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import EchoPair, NpProcess, children, free_port, wait_serving

from npgevent.cpus import usable_cpus

pytestmark = pytest.mark.timeout(60)
NPGEVENT = [sys.executable, "-m", "npgevent"]


def run_auto(program: list[str]) -> tuple[int, int]:
    """Start a workers=auto forwarder with *program*; (its worker processes, 'Workers:' lines)."""
    echo = EchoPair()
    port = free_port()
    proc = NpProcess("client://127.0.0.1:%d/127.0.0.1:%d?workers=auto" % (port, echo.port), program=program)
    try:
        wait_serving(port)
        return len(children(proc.pid)), proc.count(r"Workers:")
    finally:
        proc.close()
        echo.close()


@pytest.mark.skipif(shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2,
                    reason="needs taskset and two CPUs to run on")
def test_pinned_to_one_cpu_auto_is_one_process():
    pinned = ["taskset", "-c", str(min(os.sched_getaffinity(0))), *NPGEVENT]
    assert run_auto(pinned) == (0, 0)


@contextlib.contextmanager
def one_cpu_cgroup() -> Iterator[Path]:
    """A new cgroup with a quota of one CPU, under the v1 ``cpu`` controller or the v2
    hierarchy (where its root delegates ``cpu``); skip where it can't be made."""
    group: Path | None = None
    name = "npgevent-test-%s" % uuid.uuid4().hex[:8]
    try:
        v1 = next((Path(p) for p in ("/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct")
                   if os.path.exists(os.path.join(p, "cpu.cfs_quota_us"))), None)
        if v1 is not None:
            group = v1 / name
            group.mkdir()
            (group / "cpu.cfs_period_us").write_text("100000")
            (group / "cpu.cfs_quota_us").write_text("100000")
        else:
            root = Path("/sys/fs/cgroup")
            if "cpu" not in (root / "cgroup.subtree_control").read_text().split():
                pytest.skip("the cgroup v2 root does not delegate the cpu controller")
            group = root / name
            group.mkdir()
            (group / "cpu.max").write_text("100000 100000")
    except OSError as exc:
        pytest.skip("cannot make a cgroup with a CPU quota here: %s" % exc)
    assert group is not None
    try:
        yield group
    finally:
        # empty once the forwarder and its workers (which die with it) have exited
        deadline = time.monotonic() + 10
        while (group / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.05)
        group.rmdir()


@pytest.mark.skipif(usable_cpus() < 2, reason="needs two CPUs to use")
def test_a_one_cpu_quota_makes_auto_one_process():
    with one_cpu_cgroup() as group:
        inside = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(group), *NPGEVENT]
        assert run_auto(inside) == (0, 0)
    assert run_auto(NPGEVENT)[1] == 1  # outside it, the same machine runs one per CPU
