"""The master's periodic tasks (stale checks, the hourly backup and restart of errored
instances) make no call once stop() has begun, even one whose wake-up was already due."""

from __future__ import annotations

from types import SimpleNamespace

import gevent
import gevent.event
import pytest

from npgevent.master.core import Master

pytestmark = pytest.mark.timeout(10)


def test_a_task_whose_wake_up_is_due_as_stop_begins_makes_no_call(monkeypatch):
    calls: list[str] = []
    due = gevent.event.Event()
    master = Master.__new__(Master)  # stop()'s collaborators only, as fakes

    def shutdown_all() -> None:
        due.set()  # the task's wake-up is queued before stop() kills it

    def stop_all() -> None:
        calls.append("stop_all")
        gevent.idle()  # stopping instances switches: the queued wake-up runs now

    master.opts = SimpleNamespace(shutdown_timeout=1.0)
    master.hub = SimpleNamespace(shutdown_all=shutdown_all)
    master.instances = SimpleNamespace(stop_all=stop_all, save_now=lambda: None)
    master.log = SimpleNamespace(info=lambda *a: None)
    master.store = SimpleNamespace(path="-")
    master.server = None
    master.metrics_server = None
    master.running = gevent.event.Event()
    naps: list[float] = []

    def nap(seconds: float) -> None:  # the sleep of the task's loop, woken by stop()
        naps.append(seconds)
        if len(naps) > 1:
            raise gevent.GreenletExit  # a loop that went round again: end it here
        due.wait()

    task = gevent.Greenlet(master._every, 60.0, lambda: calls.append("restart_errored"))
    master.tasks = [task]
    monkeypatch.setattr(gevent, "sleep", nap)
    task.start()
    gevent.idle()  # the task sleeps
    master.stop()
    task.join(5)
    monkeypatch.undo()
    assert task.dead and calls == ["stop_all"] and master.tasks == []
