"""The block a ``workers=`` group shares (a ``memfd`` the parent makes and every worker maps).

Laid out, in this order:

* one :data:`ROW` per worker: its CHECK_POINT figures, written every report interval, which
  the parent sums into its one line;
* :data:`PROBER`: the worker the parent names to time PING's connect to the target;
* :data:`BUCKET`: ``rate=``'s token bucket, which every worker draws on
  (:class:`SharedRateLimiter`), so the rate is the group's, and a lone download may use all
  of it wherever it lands;
* :data:`LIVE`, one per worker: its live sessions, which every worker sums before it admits
  one (:class:`SharedSlots`), so ``slot=`` is the group's exact total.

The bucket is changed under an ``fcntl`` record lock on its bytes, which the kernel
releases if the holder dies; nothing waits while holding it.  A worker only ever writes its
own session cell (one aligned 8-byte store, read whole by the others), reserving a session
there before it checks the group's sum (:meth:`Board.admit`), and the parent clears the cell
of a worker that exited, so the sessions of a killed worker are not counted against the
rest.  A block made
by a parent from before a cell existed (npgevent upgraded in place, a worker restarted from
the new code) is shorter: the cells it lacks are not used (:attr:`Board.has_prober`,
:attr:`has_bucket`, :attr:`has_live`), and each worker then takes its part of the limits.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import mmap
import os
import struct
import time
from collections.abc import Callable, Iterator, Sequence

import gevent

from .relay.limit import RateLimiter, Slots

ROW = struct.Struct("<8q")  # pid (once serving), ping, tcps, udps, tcp_rx, tcp_tx, udp_rx, udp_tx
EMPTY = (0,) * 8
PROBER = struct.Struct("<q")  # after the rows: the index of the worker that times PING's connect
BUCKET = struct.Struct("<dd")  # after that: the rate= token bucket's tokens and its clock stamp
LIVE = struct.Struct("<q")  # after that, one per worker: its live sessions (TCP and UDP)


class Board:
    """The shared block of *count* workers: made here (*fd* None, the parent) or mapped from
    the descriptor a worker inherited."""

    def __init__(self, count: int, fd: int | None = None) -> None:
        self.count = count
        rows = count * ROW.size
        self._bucket_at = rows + PROBER.size
        self._live_at = self._bucket_at + BUCKET.size
        full = self._live_at + count * LIVE.size
        if fd is None:
            fd = os.memfd_create("npgevent-workers", 0)  # inherited by the workers (pass_fds)
            os.ftruncate(fd, full)
            size = full
        else:  # the longest layout the parent's block holds whole
            have = os.fstat(fd).st_size
            size = max((n for n in (rows, self._bucket_at, self._live_at, full) if n <= have), default=rows)
        self.has_prober = size >= self._bucket_at
        self.has_bucket = size >= self._live_at
        self.has_live = size >= full
        self._cells = struct.Struct("<%dq" % count)  # every worker's LIVE cell, read in one call
        self.fd = fd
        self.mm = mmap.mmap(fd, size)

    def write(self, index: int, row: Sequence[int]) -> None:
        ROW.pack_into(self.mm, index * ROW.size, *row)

    def read(self, index: int) -> tuple[int, ...]:
        return ROW.unpack_from(self.mm, index * ROW.size)

    def set_prober(self, index: int) -> None:
        PROBER.pack_into(self.mm, self.count * ROW.size, index)

    def prober(self) -> int | None:
        """The worker named to time PING's connect; None in a block without the cell."""
        if not self.has_prober:
            return None
        return int(PROBER.unpack_from(self.mm, self.count * ROW.size)[0])

    @contextlib.contextmanager
    def bucket(self) -> Iterator[list[float]]:
        """The shared bucket's ``[tokens, stamp]``, read and written back under an exclusive
        record lock on its bytes: it blocks the other workers' processes (not greenlets), so
        the holder must not wait inside."""
        at = self._bucket_at
        fcntl.lockf(self.fd, fcntl.LOCK_EX, BUCKET.size, at)
        try:
            cell = list(BUCKET.unpack_from(self.mm, at))
            yield cell
            BUCKET.pack_into(self.mm, at, *cell)
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, BUCKET.size, at)

    def admit(self, index: int, mine: int, limit: int) -> bool:
        """Whether worker *index*, holding *mine* sessions, may open one more under *limit*
        for the group.  No lock (a lock here cost two ``fcntl`` calls per session and 9 % of
        the connections per second of two workers): the session is *reserved* first, its cell
        raised to ``mine + 1``, and only then are the others' cells read; if the sum is over,
        the reservation is taken back.  Of two workers admitting at once, each sees the
        other's reservation or the other sees its own, so the group never passes the limit
        (near it, both may refuse: a session is never admitted without room)."""
        cell = self._live_at + index * LIVE.size
        if self._others(index) + mine >= limit:
            return False  # full: no reservation (a flood at the limit writes nothing)
        LIVE.pack_into(self.mm, cell, mine + 1)
        if self._others(index) + mine + 1 > limit:
            LIVE.pack_into(self.mm, cell, mine)
            return False
        return True

    def _others(self, index: int) -> int:
        """The live sessions of every worker but *index* (each cell read whole)."""
        cells = self._cells.unpack_from(self.mm, self._live_at)
        return sum(cells) - cells[index]

    def set_live(self, index: int, sessions: int) -> None:
        """Worker *index*'s live sessions (its own cell only: one aligned 8-byte store, which
        a reader sees whole; a lower count only frees room)."""
        if self.has_live:
            LIVE.pack_into(self.mm, self._live_at + index * LIVE.size, sessions)

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)


class SharedRateLimiter(RateLimiter):
    """``rate=``'s token bucket for the whole ``workers=`` group: its state lives in the
    board, so every worker draws on the same tokens.  The same bucket as one process's
    (burst, debt, the sleep after a take that overdraws it), at the instance's full rate."""

    __slots__ = ("_board",)

    def __init__(self, rate_bytes: float, board: Board, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(rate_bytes, clock=clock)
        self._board = board

    def _load(self, cell: list[float]) -> None:
        tokens, stamp = cell
        now = self._clock()
        if not (math.isfinite(tokens) and math.isfinite(stamp)) or stamp > now or tokens < -60 * self.rate:
            tokens, stamp = self.burst, now  # a new block (stamp 0 refills it) or a torn write
        self._tokens, self._stamp = tokens, stamp

    def take(self, n: int) -> None:
        with self._board.bucket() as cell:
            self._load(cell)
            tokens = self._refill() - n
            cell[:] = [tokens, self._stamp]
        if tokens < 0:
            gevent.sleep(-tokens / self.rate)  # outside the lock

    def try_take(self, n: float = 1.0) -> bool:
        with self._board.bucket() as cell:
            self._load(cell)
            granted = super().try_take(n)
            cell[:] = [self._tokens, self._stamp]
        return granted


class SharedSlots(Slots):
    """``slot=`` for the whole ``workers=`` group: a session is admitted while the group's
    live sessions (every worker's cell, summed under the lock) are below the limit, wherever
    it lands.  ``tcp`` and ``udp`` stay this worker's own counts (its CHECK_POINT figures)."""

    __slots__ = ("_board", "_index")

    def __init__(self, limit: int, board: Board, index: int) -> None:
        super().__init__(limit)
        self._board = board
        self._index = index
        board.set_live(index, 0)  # a restarted worker starts from none

    def acquire_tcp(self) -> bool:
        if not self._board.admit(self._index, self.tcp + self.udp, self.limit):
            return False
        self.tcp += 1
        return True

    def release_tcp(self) -> None:
        self.tcp -= 1
        self._board.set_live(self._index, self.tcp + self.udp)

    def acquire_udp(self) -> bool:
        if not self._board.admit(self._index, self.tcp + self.udp, self.limit):
            return False
        self.udp += 1
        return True

    def release_udp(self) -> None:
        self.udp -= 1
        self._board.set_live(self._index, self.tcp + self.udp)
