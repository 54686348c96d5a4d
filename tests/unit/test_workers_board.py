"""The workers' shared block (npgevent.workers.Board): rows, and the PING prober's cell."""

from __future__ import annotations

import os

import pytest

from npgevent.workers import ROW, Board

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
        board.write(count - 1, (1,) * 8)
        assert board.read(count - 1) == (1,) * 8
    finally:
        board.close()
