"""The daemon's gevent settings (npgevent.__main__)."""

from __future__ import annotations

import gevent

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
