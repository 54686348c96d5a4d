"""The daemon's gevent settings and monkey patching (npgevent.__main__)."""

from __future__ import annotations

import functools
import subprocess
import sys

import gevent
import pytest
from helpers import NpProcess, echo_roundtrip, wait_serving

from npgevent.__main__ import configure_gevent


def _spawned_stack() -> object:
    g = gevent.spawn(lambda: None)
    g.join(timeout=5)
    return g.spawning_stack


def test_greenlets_record_no_spawning_stack_unless_the_environment_asks():
    saved = gevent.config.track_greenlet_tree
    try:
        gevent.config.track_greenlet_tree = True
        configure_gevent({})
        assert _spawned_stack() is None

        gevent.config.track_greenlet_tree = True  # as GEVENT_TRACK_GREENLET_TREE=1 would
        configure_gevent({"GEVENT_TRACK_GREENLET_TREE": "1"})
        assert _spawned_stack() is not None
    finally:
        gevent.config.track_greenlet_tree = saved


PATCH_PROBE = r"""
import importlib.metadata, socket, sys
def no_scan(*a, **k):
    raise AssertionError("entry points read")
importlib.metadata.entry_points = no_scan
importlib.metadata.distributions = no_scan
from gevent import events
seen = []
events.subscribers.append(lambda ev: seen.append(type(ev).__name__))
from npgevent.__main__ import patch_gevent
patch_gevent()
import gevent.socket, gevent.events
assert socket.socket is gevent.socket.socket, socket.socket
assert "GeventDidPatchAllEvent" in seen, seen
assert gevent.events.notify_and_call_entry_points.__name__ == "notify_and_call_entry_points"
print("patched", len(seen), "ssl" in sys.modules or "_ssl" in sys.modules)
"""


@functools.cache
def _ssl_at_start_up() -> bool:
    """Whether this interpreter has imported ``ssl`` before any code runs (a ``.pth`` file or
    ``sitecustomize`` of the environment can): then no process here can be without it."""
    probe = "import sys; print('_ssl' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
    return out.stdout.strip() == "True"


@pytest.mark.timeout(60)
def test_the_daemon_patches_without_reading_package_entry_points_or_importing_ssl():
    """gevent would read every installed distribution's entry points three times (~300 ms of
    start-up): the daemon's patch reads none, patches the socket module all the same, still
    announces the events to in-process subscribers, and puts gevent's function back.  It
    leaves the ``ssl`` module alone, so nothing has imported it."""
    out = subprocess.run([sys.executable, "-c", PATCH_PROBE], capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("patched "), out.stdout
    if not _ssl_at_start_up():
        assert out.stdout.split()[-1] == "False", "patching imported ssl"


@pytest.mark.timeout(60)
def test_a_single_end_forwarder_never_loads_the_ssl_module_or_libssl(tcp_echo, port):
    """Patching ``ssl`` would import it and map the system's libssl (~4 MB of RSS) in a
    process that has no use for it: a forwarder that serves and relays has neither."""
    if _ssl_at_start_up():
        pytest.skip("this interpreter imports ssl at start-up (its site packages do)")
    with NpProcess("client://127.0.0.1:%d/127.0.0.1:%d" % (port, tcp_echo.port)) as np:
        np.wait_for("Client started")
        wait_serving(port)
        with open("/proc/%d/maps" % np.pid) as fh:
            maps = fh.read()
        assert "_ssl." not in maps and "libssl" not in maps, [
            line for line in maps.splitlines() if "ssl" in line]
        assert echo_roundtrip(port, b"still relays") == b"still relays"
        assert np.stop() == 0
