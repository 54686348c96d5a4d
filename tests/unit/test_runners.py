"""Parked worker greenlets (npgevent.relay.runners): reuse, kills, bounds."""

from __future__ import annotations

import gevent
import pytest
from gevent.event import Event
from greenlet import getcurrent

from npgevent.relay import runners


@pytest.fixture(autouse=True)
def _no_parked_workers():
    runners._parked.pop(gevent.get_hub(), None)
    yield
    runners._parked.pop(gevent.get_hub(), None)


def test_a_job_returns_its_value_and_the_next_job_reuses_the_worker():
    first = runners.run(lambda x: (x * 2, getcurrent()), 21)
    first.join(timeout=5)
    assert first.dead
    value, worker = first.value
    assert value == 42 and runners.parked() == 1

    second = runners.run(getcurrent)
    second.join(timeout=5)
    assert second.value is worker  # the same greenlet, no new one
    assert runners.parked() == 1


def test_kill_ends_a_blocked_job_and_the_worker_carries_on():
    release = Event()
    blocked = runners.run(release.wait)
    gevent.sleep(0)  # let it start and block
    with gevent.Timeout(5):
        blocked.kill(block=True)
    assert blocked.dead and blocked.value is None
    assert runners.parked() == 1

    after = runners.run(lambda: "fine")
    after.join(timeout=5)
    assert after.value == "fine"


def test_a_job_killed_before_it_started_never_runs():
    ran = []
    doomed = runners.run(ran.append, "doomed")
    doomed.kill(block=False)  # before the loop started it
    doomed.join(timeout=5)
    assert doomed.dead and ran == []
    gevent.sleep(0.05)
    assert ran == []


def test_a_kill_that_comes_late_does_not_reach_the_workers_next_job():
    hold = Event()
    first = runners.run(lambda: (hold.wait(), getcurrent())[1])
    gevent.sleep(0)
    loop = gevent.get_hub().loop
    later: list[runners.Job] = []
    hold.set()  # 1: 'first' wakes, ends, its worker parks
    loop.run_callback(lambda: later.append(runners.run(lambda: (gevent.sleep(0.05), getcurrent())[1])))  # 2
    first.kill(block=False)  # 3: the throw meant for 'first' is decided after 2 handed out the worker
    first.join(timeout=5)
    gevent.sleep(0.01)
    later[0].join(timeout=5)
    assert later[0].value is first.value  # same worker, and its job ran to the end


def test_at_most_keep_workers_stay_parked_after_a_burst():
    gate = Event()
    jobs = [runners.run(gate.wait) for _ in range(runners.KEEP + 8)]
    gevent.sleep(0)
    gate.set()
    for job in jobs:
        job.join(timeout=5)
    assert all(job.dead for job in jobs)
    assert runners.parked() == runners.KEEP


def test_an_exception_in_a_job_is_reported_and_the_worker_survives(monkeypatch):
    reported = []
    hub = gevent.get_hub()
    monkeypatch.setattr(hub, "handle_error", lambda *args: reported.append(args[2]))

    def boom() -> None:
        raise ValueError("bug in a job")

    failed = runners.run(boom)
    failed.join(timeout=5)
    assert failed.dead and [str(e) for e in reported] == ["bug in a job"]
    again = runners.run(lambda: "ok")
    again.join(timeout=5)
    assert again.value == "ok"


def test_sessions_count_join_and_kill_like_a_group():
    sessions = runners.Sessions()
    gate = Event()
    done = []
    jobs = [sessions.spawn(lambda i=i: (gate.wait(), done.append(i))) for i in range(5)]
    assert len(sessions) == 5 and not sessions.join(timeout=0.05)
    gate.set()
    assert sessions.join(timeout=5) and len(sessions) == 0
    assert sorted(done) == list(range(5)) and all(job.dead for job in jobs)

    stuck = [sessions.spawn(Event().wait) for _ in range(3)]
    gevent.sleep(0)
    sessions.kill(block=True, timeout=5)  # GreenletExit in each, as Group.kill
    assert len(sessions) == 0 and all(job.dead for job in stuck)


def test_sessions_that_carry_on_are_adopted_and_drained_by_their_new_owner():
    old, survivors = runners.Sessions(), runners.Sessions()
    gate = Event()
    old.spawn(gate.wait)
    old.spawn(gate.wait)
    gevent.sleep(0)
    survivors.adopt(old)
    assert len(old) == 0 and old.join(timeout=0) and len(survivors) == 2
    gate.set()
    assert survivors.join(timeout=5) and len(survivors) == 0


def test_session_handlers_reuse_parked_workers():
    """A user connection's handler costs a job on a parked worker, not a new greenlet: no
    frame stack mapped and unmapped, no Greenlet object, per connection."""
    sessions = runners.Sessions()
    first = sessions.spawn(getcurrent)
    first.join(timeout=5)
    for _ in range(20):
        job = sessions.spawn(getcurrent)
        job.join(timeout=5)
        assert job.value is first.value
