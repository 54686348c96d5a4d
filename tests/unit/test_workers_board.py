"""The workers' shared block (npgevent.workerboard): rows, the PING prober's cell, the rate=
bucket the workers share (SharedRateLimiter) and their live sessions (SharedSlots)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from npgevent.workerboard import BUCKET, LIVE, PROBER, ROW, Board, SharedRateLimiter, SharedSlots

pytestmark = pytest.mark.timeout(10)


def test_a_new_block_names_worker_0_and_a_worker_sees_what_the_parent_sets() -> None:
    parent = Board(3)
    worker = Board(3, os.dup(parent.fd))  # a worker maps the same memfd it inherited
    try:
        assert parent.has_prober and worker.prober() == 0
        parent.set_prober(2)
        assert worker.prober() == 2
        worker.write(1, (11, 0, 1, 2, 3, 4, 5, 6))
        assert parent.read(1) == (11, 0, 1, 2, 3, 4, 5, 6)
        assert parent.prober() == 2  # the rows and the cell don't overlap
    finally:
        worker.close()
        parent.close()


@pytest.mark.parametrize("count", [3, 64])  # 64 rows fill a 4 KiB page exactly
def test_a_block_from_a_parent_without_the_cell_has_no_prober(count: int) -> None:
    fd = os.memfd_create("npgevent-test-board", 0)
    os.ftruncate(fd, count * ROW.size)  # what a parent from before the cell made
    board = Board(count, fd)
    try:
        assert not board.has_prober and board.prober() is None  # every worker times PING then
        assert not board.has_bucket and not board.has_live  # and takes its part of the limits
        board.write(count - 1, (1,) * 8)
        assert board.read(count - 1) == (1,) * 8
    finally:
        board.close()


def test_a_block_from_a_parent_without_the_bucket_keeps_its_prober() -> None:
    fd = os.memfd_create("npgevent-test-board", 0)
    os.ftruncate(fd, 2 * ROW.size + PROBER.size)
    board = Board(2, fd)
    try:
        assert board.has_prober and not board.has_bucket and not board.has_live
        board.set_prober(1)
        assert board.prober() == 1
    finally:
        board.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_two_workers_draw_on_one_bucket() -> None:
    """Tokens one worker takes are gone for the other; the refill is at the full rate once,
    not once per worker."""
    parent = Board(2)
    one, two = Board(2, os.dup(parent.fd)), Board(2, os.dup(parent.fd))
    clock = Clock()
    a = SharedRateLimiter(100_000, one, clock=clock)  # burst 16 KiB
    b = SharedRateLimiter(100_000, two, clock=clock)
    try:
        assert a.try_take(16384)  # a new block is a full bucket
        assert not b.try_take(1)  # emptied for both
        clock.now += 0.1  # 10,000 bytes of refill, for the group
        assert b.try_take(6000) and a.try_take(4000) and not a.try_take(1) and not b.try_take(1)
        clock.now += 1.0
        assert a.try_take(16384) and not b.try_take(1)  # the burst caps the refill
    finally:
        one.close()
        two.close()
        parent.close()


def test_a_take_that_overdraws_sleeps_off_the_groups_debt(monkeypatch) -> None:
    import npgevent.workerboard as workerboard

    slept: list[float] = []
    monkeypatch.setattr(workerboard.gevent, "sleep", slept.append)
    parent = Board(2)
    other = Board(2, os.dup(parent.fd))
    clock = Clock()
    a = SharedRateLimiter(100_000, parent, clock=clock)
    b = SharedRateLimiter(100_000, other, clock=clock)
    try:
        a.take(16384 + 50_000)  # half a second in debt
        assert slept == [pytest.approx(0.5)]
        b.take(10_000)  # the other worker pays the debt too
        assert slept[-1] == pytest.approx(0.6)
    finally:
        other.close()
        parent.close()


@pytest.mark.parametrize("cell", [(float("nan"), 0.0), (0.0, float("inf")), (0.0, 10**9), (-1e300, 999.0)])
def test_a_torn_or_garbage_bucket_is_a_full_one(cell: tuple[float, float]) -> None:
    board = Board(1)
    clock = Clock()
    try:
        BUCKET.pack_into(board.mm, ROW.size + PROBER.size, *cell)
        limiter = SharedRateLimiter(100_000, board, clock=clock)
        assert limiter.try_take(16384) and not limiter.try_take(1)
    finally:
        board.close()


def test_the_bucket_lock_holds_across_processes() -> None:
    """A process holding the bucket's lock keeps another process's take waiting."""
    board = Board(1)
    holder = (
        "import os, sys, time\n"
        "from npgevent.workerboard import Board\n"
        "board = Board(1, int(sys.argv[1]))\n"
        "with board.bucket():\n"
        "    print('held', flush=True)\n"
        "    time.sleep(0.5)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", holder, str(board.fd)], pass_fds=(board.fd,),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        began = time.monotonic()
        SharedRateLimiter(100_000, board).try_take(1)
        assert time.monotonic() - began >= 0.3
    finally:
        proc.wait(timeout=5)
        board.close()


def test_a_block_from_a_parent_without_the_session_cells_keeps_its_bucket() -> None:
    fd = os.memfd_create("npgevent-test-board", 0)
    os.ftruncate(fd, 3 * ROW.size + PROBER.size + BUCKET.size)
    board = Board(3, fd)
    try:
        assert board.has_prober and board.has_bucket and not board.has_live
        board.set_live(2, 5)  # no cell: nothing written
        assert SharedRateLimiter(100_000, board).try_take(1)
    finally:
        board.close()


def test_slots_are_the_groups_wherever_a_session_lands() -> None:
    """slot=3 over two workers: three sessions in all, taken on either; one ending anywhere
    makes room anywhere."""
    parent = Board(2)
    one, two = Board(2, os.dup(parent.fd)), Board(2, os.dup(parent.fd))
    try:
        a, b = SharedSlots(3, one, 0), SharedSlots(3, two, 1)
        assert a.acquire_tcp() and a.acquire_udp() and a.acquire_tcp()  # all three on worker 0
        assert not b.acquire_tcp() and not b.acquire_udp() and not a.acquire_tcp()
        a.release_udp()
        assert b.acquire_udp() and not a.acquire_tcp()
        assert (a.tcp, a.udp, b.tcp, b.udp) == (2, 0, 0, 1)  # each worker's own counts
        b.release_udp()
        a.release_tcp()
        assert b.acquire_tcp() and b.acquire_tcp() and not b.acquire_tcp()
    finally:
        one.close()
        two.close()
        parent.close()


def test_a_dead_workers_sessions_are_cleared_and_a_restarted_one_starts_from_none() -> None:
    parent = Board(2)
    worker = Board(2, os.dup(parent.fd))
    try:
        dead = SharedSlots(2, worker, 0)
        assert dead.acquire_tcp() and dead.acquire_tcp()
        other = SharedSlots(2, parent, 1)
        assert not other.acquire_tcp()  # the group is full while worker 0's sessions live
        parent.set_live(0, 0)  # the parent saw worker 0 exit (Supervisor._bank)
        assert other.acquire_tcp() and other.acquire_tcp() and not other.acquire_tcp()
        other.release_tcp()
        other.release_tcp()
        LIVE.pack_into(parent.mm, 2 * ROW.size + PROBER.size + BUCKET.size, 2)  # cell 0 full again
        assert not other.acquire_tcp()
        SharedSlots(2, worker, 0)  # worker 0 started again: its cell is its own, empty
        assert other.acquire_tcp()
    finally:
        worker.close()
        parent.close()


def test_a_full_group_refuses_with_no_system_call_and_no_write(monkeypatch) -> None:
    """A flood of new UDP sources at the limit asks for a session per datagram: a group
    that is full says no from the cells alone, with no lock and nothing reserved."""
    import npgevent.workerboard as workerboard

    parent = Board(2)
    other = Board(2, os.dup(parent.fd))
    try:
        SharedSlots(1, other, 1).acquire_udp()  # the other worker holds the only slot
        calls: list[tuple] = []
        monkeypatch.setattr(workerboard.fcntl, "lockf", lambda *a: calls.append(a))
        slots = SharedSlots(1, parent, 0)
        writes: list[tuple] = []
        real_pack = workerboard.LIVE.pack_into
        monkeypatch.setattr(workerboard, "LIVE", type("L", (), {
            "size": workerboard.LIVE.size, "unpack_from": workerboard.LIVE.unpack_from,
            "pack_into": lambda *a: writes.append(a) or real_pack(*a)}))
        assert not any(slots.acquire_udp() for _ in range(100))
        assert calls == [] and writes == []
    finally:
        other.close()
        parent.close()


def test_a_reservation_that_meets_another_is_taken_back() -> None:
    """Two workers admitting at once for the last slot: the one that finds the other's
    reservation when it checks refuses and lowers its own cell again."""
    parent = Board(2)
    other = Board(2, os.dup(parent.fd))
    try:
        mine, theirs = SharedSlots(2, parent, 0), SharedSlots(2, other, 1)
        assert theirs.acquire_tcp()  # one of two taken
        looks = []
        real = Board._others

        def others(board: Board, index: int) -> int:
            looks.append(index)
            if len(looks) == 2:  # between worker 0's first look and its check: worker 1 reserves
                other.set_live(1, 2)
            return real(board, index)

        Board._others = others  # type: ignore[method-assign]
        try:
            assert not mine.acquire_tcp()
        finally:
            Board._others = real  # type: ignore[method-assign]
        assert mine.tcp == 0 and parent.mm[2 * ROW.size + PROBER.size + BUCKET.size] == 0  # taken back
    finally:
        other.close()
        parent.close()
