"""Children die with their parent, even one that died before they could ask (npgevent.childproc)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")

# The middle process forks a child and writes its pid; with "late" it exits at once
# and the child arms only after it has been orphaned (the race a SIGKILLed master hits
# between fork and exec); with "armed" it waits until the child has armed, then exits;
# "handled" is "armed" in a parent with a SIGTERM handler (the daemon's), which the child
# inherits until it execs: the parent dies while the child is still on its way to exec.
MIDDLE = r"""
import os, signal, sys, time
from npgevent.childproc import die_with_parent
where, mode = sys.argv[1], sys.argv[2]
if mode == "handled":
    signal.signal(signal.SIGTERM, lambda *args: None)
parent = os.getpid()
pid = os.fork()
if pid == 0:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if mode == "late":
        end = time.monotonic() + 10
        while os.getppid() == parent and time.monotonic() < end:
            time.sleep(0.01)
    die_with_parent(parent)
    with open(os.path.join(where, "armed"), "w") as fh:
        fh.write("child went on")
    if mode == "handled":
        time.sleep(1.0)  # a loaded machine between the preexec function and exec
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(30)"])
    time.sleep(30)
    os._exit(0)
with open(os.path.join(where, "pid.tmp"), "w") as fh:
    fh.write(str(pid))
os.rename(os.path.join(where, "pid.tmp"), os.path.join(where, "pid"))
if mode in ("armed", "handled"):
    end = time.monotonic() + 10
    while not os.path.exists(os.path.join(where, "armed")) and time.monotonic() < end:
        time.sleep(0.01)
os._exit(0)
"""


def _alive(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"  # a zombie is dead here
    except OSError:
        return False


def _run(tmp_path, mode: str) -> int:
    subprocess.run([sys.executable, "-c", MIDDLE, str(tmp_path), mode], check=True, timeout=20)
    pid = int((tmp_path / "pid").read_text())
    end = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < end:
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, 9)
        pytest.fail("the child outlived its parent (%s)" % mode)
    return pid


def test_a_child_orphaned_before_it_armed_ends_at_once(tmp_path):
    _run(tmp_path, "late")
    assert not (tmp_path / "armed").exists()  # it never went on to exec


def test_an_armed_child_gets_sigterm_when_its_parent_dies(tmp_path):
    _run(tmp_path, "armed")
    assert (tmp_path / "armed").read_text() == "child went on"


def test_a_parent_dying_before_the_child_execs_is_not_lost_to_its_sigterm_handler(tmp_path):
    """The death signal reaches the child between its preexec function and exec, while it
    still carries the parent's SIGTERM handler: that handler must not swallow it (a master
    SIGKILLed right after it started an instance left the instance running)."""
    _run(tmp_path, "handled")
    assert (tmp_path / "armed").read_text() == "child went on"
