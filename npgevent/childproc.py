"""Child processes that die with their parent (master instances, workers).

:func:`die_with_parent` runs in the child between ``fork`` and ``exec``
(``preexec_fn``).  ``PR_SET_PDEATHSIG`` only covers a parent that dies *after*
the call: one killed between the fork and the ``prctl`` (a master SIGKILLed
right after it started an instance) would leave the child running as an orphan,
so the child checks that its parent is still the one that forked it and ends
at once otherwise.  Until it execs, the child also carries the parent's signal
handlers: a parent that dies then would have its death signal caught by the
daemon's SIGTERM handler in the child and lost at the exec, so the child puts
SIGTERM back to its default first (until the new program installs its own, the
signal ends the child).
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int, setpgid: bool = False) -> None:
    """In the child: SIGTERM when ``parent`` dies; exit now if it already has."""
    if setpgid:
        os.setpgid(0, 0)
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.signal.restype = ctypes.c_void_p
        libc.signal(ctypes.c_int(signal.SIGTERM), ctypes.c_void_p(0))  # SIG_DFL, before the prctl
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except Exception:
        return
    if os.getppid() != parent:  # the parent died before the prctl: nobody will signal
        os._exit(1)


def preexec(setpgid: bool = False) -> Callable[[], None] | None:
    """A ``preexec_fn`` for a child of this process (``None`` where not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    return functools.partial(die_with_parent, os.getpid(), setpgid)
