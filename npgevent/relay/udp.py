"""UDP: one session per user address, behind a :class:`~npgevent.relay.udplistener.UdpListener`.

:class:`SessionTable` keys sessions by the user's ``ip:port``.  A new address
gets a session whose *opener* runs in its own greenlet (dialling a target or
taking a tunnel connection may block); datagrams that arrive meanwhile wait in
a small bounded backlog, sent first once the session is open (what comes while
it is written queues behind it).  A session ends after ``idle`` seconds without
traffic in either direction.  What a session does with its datagrams is up to the
owner: the single-end forwarder uses :class:`UdpTargetSession` (a connected UDP
socket per user address), which after the dial reads its target in hub callbacks
(:meth:`UdpSession.read_in_hub`, :mod:`npgevent.relay.hubread`): no greenlet switch per
datagram.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent import socket

from ..log import DEBUG, ERROR, InstanceLog
from ..net.dial import Dialer
from ..net.sockopt import format_addr
from .hubread import HubReader
from .limit import RateLimiter, Slots
from .stats import UDP_RX, UDP_TX
from .udplistener import MAX_DATAGRAM, UdpListener, kernel_drops

BACKLOG = 256


class UdpSession:
    """Base of one user address's session: subclasses implement open/send/recv."""

    def __init__(self, table: SessionTable, addr: Any) -> None:
        self.table = table
        self.addr = addr
        self.last = time.monotonic()
        self.ready = False
        self.closed = False
        self.backlog: list[bytes] = []
        self.greenlet: gevent.Greenlet | None = None
        # what deliver() could not do without waiting, for the writer greenlet, in order:
        # (True, datagram) = send() it; (False, rest) = write_rest() (a write cut short)
        self.pending: collections.deque[tuple[bool, bytes]] = collections.deque()
        self.writer: gevent.Greenlet | None = None
        self._timer: Any = None  # the idle watchdog's loop timer

    # -- implemented by subclasses ------------------------------------------
    def open(self) -> None:
        """Connect the far end (may block); raise OSError on failure."""
        raise NotImplementedError

    def send(self, data: bytes) -> None:
        """Forward one datagram from the user."""
        raise NotImplementedError

    def recv(self) -> bytes | None:
        """Block for one datagram for the user; None = session over.  No socket timeout: the
        idle watchdog (:meth:`_watch`) ends the session."""
        raise NotImplementedError

    def close_far(self) -> None:
        raise NotImplementedError

    def send_nowait(self, data: bytes) -> tuple[bool, bytes] | None:
        """Forward one datagram from the user without waiting: :meth:`deliver` runs in the
        listener's hub callback.  None when done, else what the writer greenlet must still do
        (see ``pending``).  By default everything goes through :meth:`send` in the writer."""
        return (True, data)

    def write_rest(self, rest: bytes) -> None:
        """Finish a write that :meth:`send_nowait` cut short (may block: the writer's)."""
        raise NotImplementedError

    def write_gathered(self) -> tuple[bool, bytes] | None:
        """Write, without waiting, what :meth:`send_nowait` gathered during this listener
        wake-up instead of writing it (after :meth:`SessionTable.gathered`); the result as
        :meth:`send_nowait`'s.  Nothing is gathered by default."""
        return None

    def read_in_hub(self) -> bool:
        """Serve the far end from hub callbacks until the session ends (then True), or False:
        read one datagram with :meth:`recv` in this greenlet, then ask again."""
        return False

    # -- driven by the table ------------------------------------------------
    def deliver(self, data: bytes) -> None:
        self.last = time.monotonic()
        if not self.ready:
            if len(self.backlog) < BACKLOG:
                self.backlog.append(data)
            else:
                self.table.dropped_backlog += 1
                self.table.total_backlog_drops += 1
            return
        if self.pending:  # the writer is at work: keep the order
            self._queue((True, data))
            return
        self._nowait(self.send_nowait, data)

    def flush(self) -> None:
        """The end of a listener wake-up in which this session gathered datagrams."""
        if not self.closed:
            self._nowait(self.write_gathered)

    def _nowait(self, write: Callable[..., tuple[bool, bytes] | None], *args: bytes) -> None:
        """A write from the listener's callback: what it leaves goes to the writer greenlet,
        and a failure ends the session."""
        try:
            todo = write(*args)
        except OSError as exc:
            self.table.log.debug("UDP send failed for %s: %s", format_addr(self.addr), exc)
            self.stop()
            return
        if todo is not None:
            self._queue(todo)

    def _queue(self, item: tuple[bool, bytes]) -> None:
        """Hand *item* to the writer greenlet; a full queue drops a datagram (counted as a
        session backlog drop; the rest of a cut write always fits: it comes first)."""
        if len(self.pending) >= BACKLOG:
            self.table.dropped_backlog += 1
            self.table.total_backlog_drops += 1
            return
        self.pending.append(item)
        if self.writer is None:
            self.writer = gevent.spawn(self._write_pending)

    def send_queued(self, pending: collections.deque[tuple[bool, bytes]]) -> int:
        """Write whole datagrams from the head of the writer's queue (may block: the writer's):
        how many, taken off only after the write.  One by default; a framed tunnel session
        writes a run of them in one write."""
        self.send(pending[0][1])
        return 1

    def _write_pending(self) -> None:
        pending = self.pending
        try:
            while pending and not self.closed:
                whole, data = pending[0]
                if whole:
                    done = self.send_queued(pending)
                else:
                    self.write_rest(data)
                    done = 1
                for _ in range(done):
                    pending.popleft()
        except OSError as exc:
            self.table.log.debug("UDP send failed for %s: %s", format_addr(self.addr), exc)
            self.stop()
        finally:
            self.writer = None

    def run(self) -> None:
        table = self.table
        try:
            try:
                self.open()
            except OSError as exc:
                table.log.limited(ERROR, "udp-open", "UDP session for %s: %s", format_addr(self.addr), exc)
                return
            self.ready = True
            if self.backlog:
                # what came while opening goes first, from the writer's queue, written by this
                # greenlet as the writer: what comes meanwhile queues behind it (in order, never
                # written into the middle of one of its frames by a hub callback), and runs of
                # it share a write
                self.pending.extend((True, data) for data in self.backlog)
                self.backlog = []
                if self.writer is None:
                    self.writer = gevent.getcurrent()
                    self._write_pending()
            self._watch()
            while not self.closed:
                if self.read_in_hub():
                    break
                try:
                    got = self.recv()
                except ConnectionRefusedError:
                    continue  # ICMP port unreachable from the target: keep the session
                if got is None:
                    break
                self.last = time.monotonic()
                table.reply(got, self.addr)
        except OSError as exc:
            table.log.debug("UDP session for %s ended: %s", format_addr(self.addr), exc)
        finally:
            self.closed = True
            if self._timer is not None:
                self._timer.close()
                self._timer = None
            # no cycle left: the greenlet keeps what ended it (a GreenletExit from stop(), with
            # its traceback, whose frames hold this session)
            self.greenlet = None
            table.forget(self)
            try:
                self.close_far()
            except OSError:
                pass

    def _watch(self) -> None:
        """End the session exactly ``idle`` seconds after its last datagram either way: one
        loop timer, re-armed only when it fires (no timeout object per blocking read)."""
        self._timer = gevent.get_hub().loop.timer(max(0.0, self.table.idle - (time.monotonic() - self.last)))
        self._timer.start(self._check_idle)

    def _check_idle(self) -> None:
        left = self.table.idle - (time.monotonic() - self.last)
        if self._timer is not None:
            self._timer.close()
        if left > 0 and not self.closed:
            self._timer = gevent.get_hub().loop.timer(left)
            self._timer.start(self._check_idle)
        else:
            self._timer = None
            self.stop()  # GreenletExit in the blocked read; run()'s finally cleans up

    def stop(self) -> None:
        self.closed = True
        if self.writer is not None and self.writer is not gevent.getcurrent():
            self.writer.kill(block=False)
        if self.greenlet is not None and self.greenlet is not gevent.getcurrent():
            self.greenlet.kill(block=False)


class SessionTable:
    """User address -> session; owns the listener's reply path and the UDP slot count."""

    def __init__(
        self,
        factory: Callable[[SessionTable, Any], UdpSession],
        slots: Slots,
        idle: float,
        log: InstanceLog,
    ) -> None:
        self.factory = factory
        self.slots = slots
        self.idle = idle
        self.log = log
        self.sessions: dict[Any, UdpSession] = {}
        self.listener: UdpListener | None = None
        self.dropped_slot = 0  # datagrams refused at the slot limit
        self.dropped_backlog = 0  # datagrams over a session backlog (still opening, or a busy far end)
        self.dropped_send = 0  # replies dropped: the listener's send buffer was full
        self.total_slot_drops = self.total_backlog_drops = self.total_send_drops = 0  # (metrics)
        self._kernel_drops = 0
        self.inode = 0
        self._gathered: list[UdpSession] = []  # sessions to flush at this wake-up's end

    def attach(self, sock: socket.socket) -> UdpListener:
        try:
            self.inode = os.fstat(sock.fileno()).st_ino
        except OSError:
            self.inode = 0
        if self.log.enabled(DEBUG):  # the drop summary is a DEBUG line: no /proc scan otherwise
            self._kernel_drops = kernel_drops(self.inode)
        self.listener = UdpListener(sock, self.on_datagram, self.flush)
        return self.listener

    def gathered(self, session: UdpSession) -> None:
        """*session* holds datagrams to write at the end of this listener wake-up."""
        self._gathered.append(session)

    def flush(self) -> None:
        """The listener's wake-up is over: each session that gathered writes its batch."""
        if self._gathered:
            sessions, self._gathered = self._gathered, []
            for session in sessions:
                session.flush()

    def drops_report(self) -> str:
        """Datagrams dropped since the last report, by cause ('' if none); then reset."""
        kernel = kernel_drops(self.inode)
        counts = (("slot limit", self.dropped_slot), ("session backlog full", self.dropped_backlog),
                  ("socket buffer full", max(0, kernel - self._kernel_drops) + self.dropped_send))
        self.dropped_slot = self.dropped_backlog = self.dropped_send = 0
        self._kernel_drops = kernel
        return ", ".join("%d (%s)" % (n, why) for why, n in counts if n)

    def on_datagram(self, data: bytes, addr: Any) -> None:
        session = self.sessions.get(addr)
        if session is None:
            if not self.slots.acquire_udp():
                self.dropped_slot += 1
                self.total_slot_drops += 1
                self.log.limited(ERROR, "udp-slot", "UDP slot limit reached (%d): datagram from %s dropped",
                               self.slots.limit, format_addr(addr))
                return
            session = self.factory(self, addr)
            self.sessions[addr] = session
            session.greenlet = gevent.spawn(session.run)
        session.deliver(data)

    def reply(self, data: bytes, addr: Any) -> None:
        if self.listener is not None:
            self.listener.sendto(data, addr)

    def reply_now(self, data: bytes, addr: Any) -> None:
        """:meth:`reply` from a hub callback: never waits.  A full send buffer drops the
        datagram (counted as a socket-buffer drop), as the kernel would on the way in."""
        if self.listener is None:
            return
        try:
            self.listener.socket._sock.sendto(data, addr)
        except BlockingIOError:
            self.dropped_send += 1
            self.total_send_drops += 1

    def forget(self, session: UdpSession) -> None:
        if self.sessions.get(session.addr) is session:
            del self.sessions[session.addr]
            self.slots.release_udp()

    def close(self) -> None:
        sessions = list(self.sessions.values())
        for session in sessions:
            session.stop()
        gevent.joinall([s.greenlet for s in sessions if s.greenlet is not None], timeout=1)


class UdpTargetSession(UdpSession):
    """Single-end: a connected UDP socket to a target per user address."""

    def __init__(self, table: SessionTable, addr: Any, dialer: Dialer, acct: list[int],
                 limiter: RateLimiter | None) -> None:
        super().__init__(table, addr)
        self.dialer = dialer
        self.acct = acct
        self.limiter = limiter
        self.sock: socket.socket | None = None

    def open(self) -> None:
        self.sock, target = self.dialer.dial_udp()
        self.sock.settimeout(None)
        self.table.log.debug("Target connection: %s <-> %s", format_addr(self.addr), target)

    def send(self, data: bytes) -> None:
        assert self.sock is not None
        try:
            self.sock.send(data)
        except ConnectionRefusedError:
            return  # the target port was unreachable a moment ago; UDP carries on
        self.acct[UDP_TX] += len(data)
        if self.limiter is not None:
            self.limiter.take(len(data))

    def send_nowait(self, data: bytes) -> tuple[bool, bytes] | None:
        if self.limiter is not None:
            return (True, data)  # shaping may have to wait: the writer greenlet does it
        assert self.sock is not None
        try:
            self.sock._sock.send(data)
        except BlockingIOError:
            return (True, data)
        except ConnectionRefusedError:
            return None  # the target port was unreachable a moment ago; UDP carries on
        self.acct[UDP_TX] += len(data)
        return None

    def recv(self) -> bytes | None:
        assert self.sock is not None
        data = self.sock.recv(MAX_DATAGRAM)
        self.acct[UDP_RX] += len(data)
        if self.limiter is not None:
            self.limiter.take(len(data))
        return data

    def close_far(self) -> None:
        if self.sock is not None:
            self.sock.close()

    def read_in_hub(self) -> bool:
        """The target's datagrams are read and answered in hub callbacks
        (:class:`~npgevent.relay.hubread.HubReader`): no greenlet switch per datagram.  Not
        with ``rate=``: the limiter may have to wait, which a hub callback can't."""
        if self.limiter is not None:
            return False
        assert self.sock is not None
        table, addr, acct = self.table, self.addr, self.acct

        def deliver(data: bytes) -> None:
            self.last = time.monotonic()
            acct[UDP_RX] += len(data)
            table.reply_now(data, addr)

        HubReader(self.sock, deliver, MAX_DATAGRAM, datagrams=True).serve()
        return True
