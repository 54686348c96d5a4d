"""The daemon's gevent settings and monkey patching (npgevent.__main__)."""

from __future__ import annotations

import subprocess
import sys

import gevent
import pytest

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
print("patched", len(seen))
"""


@pytest.mark.timeout(60)
def test_the_daemon_patches_everything_without_reading_any_package_entry_points():
    """gevent would read every installed distribution's entry points three times (~300 ms of
    start-up): the daemon's patch reads none, patches the socket module all the same, still
    announces the events to in-process subscribers, and puts gevent's function back."""
    out = subprocess.run([sys.executable, "-c", PATCH_PROBE], capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("patched "), out.stdout
