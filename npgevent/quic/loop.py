"""The QUIC thread's own asyncio loop and UDP sockets, built from original (unpatched) pieces.

:class:`NativeLoop` is an asyncio selector loop whose self-pipe is a real socketpair (a
gevent one would hand the thread's wake-ups to the hub) and whose datagram transports
drain the socket: :class:`DrainingTransport` reads every ready datagram (up to
:data:`DRAIN`) per wake-up where asyncio reads one, so a burst of packets costs one loop
iteration, its events reach gevent in one batch and each connection answers it once.

Calls from other threads (:meth:`NativeLoop.post`) and the work that ends an iteration
(:attr:`NativeLoop.after_iteration`: the QUIC thread sends what the iteration queued and
hands its events to gevent) are part of the loop's iteration, not asyncio handles: asyncio's
way (``call_soon_threadsafe``, ``call_soon``) costs a handle each and, for every handle
scheduled from inside an iteration, one more iteration with its own ``epoll_wait``, and
writes a byte to the self-pipe even while the loop is busy and will look anyway.  Here a
posting thread writes that byte only while the loop waits in ``epoll_wait`` (at most once
per wait), and the loop looks at its posted calls before every wait.
"""

from __future__ import annotations

import _socket
import asyncio
import collections
import heapq
import sys
from asyncio import selector_events
from collections.abc import Callable
from typing import Any

from gevent import monkey

from . import offload

RealSocket = monkey.get_original("socket", "socket")
_MSG_TRUNC = getattr(_socket, "MSG_TRUNC", 0x20)


def _real_socketpair() -> tuple[Any, Any]:
    """A socketpair of the standard library's own socket class.  ``socket.socketpair``, even
    the original function, wraps its ends in the module's ``socket`` class, which
    ``monkey.patch_all()`` made gevent's: such a socket made in this thread starts a second
    gevent hub (a libev loop and its epoll descriptor) there, and every wake-up of the loop
    would go through gevent's socket methods."""
    a, b = _socket.socketpair()
    return RealSocket(fileno=a.detach()), RealSocket(fileno=b.detach())


UDP_BUFFER = 4 << 20
DRAIN = 64  # datagrams read per wake-up of a UDP socket, at most


class DrainingTransport(selector_events._SelectorDatagramTransport):  # type: ignore[name-defined]
    """Reads every datagram that is ready (up to :data:`DRAIN`) per wake-up, where asyncio reads
    one.  Fewer loop iterations per packet, and the events of one burst (say, both packets of a
    Go peer's raw datagram that quic-go cut in two) reach gevent in one batch.

    With segmentation offload (:mod:`npgevent.quic.offload`) a run of datagrams crosses the
    kernel in one call each way: :meth:`send_batch` sends runs with GSO while :attr:`gso`
    holds, and a socket on which the kernel took GRO (:attr:`gro`) is read with
    ``recvmsg`` and its coalesced runs split again.  ``recvfrom`` asks for
    :data:`~npgevent.quic.offload.RECV_SIZE` bytes, not asyncio's 256 KiB, which glibc may
    serve with an ``mmap`` and ``munmap`` per datagram (16.8 against 1.9 us here)."""

    max_size = offload.RECV_SIZE
    gso = True  # cleared for good on this socket once the kernel refuses a run
    gro = False
    runs_sent = 0  # runs of datagrams sent in one call each (read by tests and bench/)
    runs_read = 0  # coalesced runs received and split

    def _read_ready(self) -> None:
        sock, protocol = self._sock, self._protocol
        if self.gro:
            self._read_runs(sock, protocol)
            return
        for _ in range(DRAIN):
            if self._conn_lost:
                return
            try:
                data, addr = sock.recvfrom(self.max_size)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                protocol.error_received(exc)
                return
            protocol.datagram_received(data, addr)

    def _read_runs(self, sock: Any, protocol: Any) -> None:
        read = 0
        while read < DRAIN:
            if self._conn_lost:
                return
            try:
                data, ancdata, flags, addr = sock.recvmsg(self.max_size, offload.ANC_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                protocol.error_received(exc)
                return
            size = offload.gro_size(ancdata) if ancdata else 0
            if flags & _MSG_TRUNC:  # cut short: only a coalesced run's whole datagrams are whole
                data = data[:len(data) // size * size] if size else b""
                if not data:
                    read += 1
                    continue
            if not size or len(data) <= size:
                read += 1
                protocol.datagram_received(data, addr)
                continue
            self.runs_read += 1
            for datagram in offload.split(data, size):
                read += 1
                protocol.datagram_received(datagram, addr)

    def send_batch(self, datagrams: list[tuple[bytes, Any]]) -> None:
        """Send *datagrams* (``(data, addr)``, in order): runs of them in one GSO call each
        while the socket allows it, the rest with :meth:`sendto`."""
        if len(datagrams) < 2 or not self.gso:
            for data, addr in datagrams:
                self.sendto(data, addr)
            return
        sock = self._sock
        connected = self._extra["peername"]
        for run, addr, size in offload.runs(datagrams):
            if len(run) > 1 and self.gso and not self._buffer and not self._conn_lost:
                try:
                    if connected:
                        sock.sendmsg(run, offload.segment_cmsg(size))
                    else:
                        sock.sendmsg(run, offload.segment_cmsg(size), 0, addr)
                    self.runs_sent += 1
                    continue
                except (BlockingIOError, InterruptedError):
                    pass  # sendto buffers them, in order
                except OSError as exc:
                    if exc.errno in offload.UNSUPPORTED:
                        self.gso = False
                    # anything else (say, a refusal the peer's ICMP left) is sendto's to report
            for data in run:
                self.sendto(data, addr)


class NativeLoop(asyncio.SelectorEventLoop):
    """An asyncio loop whose self-pipe is a real socketpair (not a gevent one), whose
    datagram transports drain the socket, which runs calls posted from other threads and
    ends each iteration with :attr:`after_iteration` (see the module docstring)."""

    after_iteration: Callable[[], None] | None = None
    offload = True  # segmentation offload (GSO, GRO) on the datagram transports made from now on

    def __init__(self, selector: Any = None) -> None:
        super().__init__(selector)
        self._posted: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = collections.deque()
        # True while the loop may be blocked in the selector (always, on the fallback path)
        self.polling = True
        self._woken = False  # a byte was written to the self-pipe and is not read yet
        # the iteration below is asyncio's BaseEventLoop._run_once as of 3.8-3.13, whose
        # internals it uses; on other versions the loop runs asyncio's own iteration and a
        # post always wakes it
        self._lean = sys.version_info < (3, 14) and all(hasattr(self, name) for name in (
            "_ready", "_scheduled", "_stopping", "_timer_cancelled_count", "_clock_resolution",
            "_process_events"))

    def post(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> bool:
        """From any thread: run ``fn(*args)`` in the loop's next iteration, in order; False if
        the loop is closed.  *fn* must not raise (the calls behind it would wait)."""
        if self.is_closed():
            return False
        self._posted.append((fn, args))
        if self.polling and not self._woken:
            self._woken = True
            self._write_to_self()  # type: ignore[attr-defined]
        return True

    def _read_from_self(self) -> None:
        # cleared once the pipe is empty, not before: a post in between finds _woken set and
        # writes nothing, while its byte would already be read (and the next wait not woken)
        super()._read_from_self()  # type: ignore[misc]
        self._woken = False

    def _run_posted(self) -> None:
        posted = self._posted
        while posted:
            fn, args = posted.popleft()
            fn(*args)

    def _run_once(self) -> None:
        loop: Any = self  # asyncio's private attributes, which typeshed leaves out
        if not self._lean:
            asyncio.SelectorEventLoop._run_once(loop)  # type: ignore[attr-defined]
            self._run_posted()
            self._end_iteration()
            return
        # asyncio's BaseEventLoop._run_once (3.8-3.13), with the posted calls and the end of
        # the iteration added, and polling set around the wait
        scheduled = loop._scheduled
        sched_count = len(scheduled)
        if sched_count > 100 and loop._timer_cancelled_count / sched_count > 0.5:
            live = [handle for handle in scheduled if not handle._cancelled]
            for handle in scheduled:
                if handle._cancelled:
                    handle._scheduled = False
            heapq.heapify(live)
            loop._scheduled = scheduled = live
            loop._timer_cancelled_count = 0
        else:
            while scheduled and scheduled[0]._cancelled:
                loop._timer_cancelled_count -= 1
                heapq.heappop(scheduled)._scheduled = False
        ready = loop._ready
        self.polling = True
        if ready or loop._stopping or self._posted:
            timeout: float | None = 0
        elif scheduled:
            timeout = min(max(0.0, scheduled[0]._when - self.time()), 86400.0)
        else:
            timeout = None
        event_list = loop._selector.select(timeout)
        self.polling = False
        loop._process_events(event_list)
        event_list = None
        end_time = self.time() + loop._clock_resolution
        while scheduled:
            handle = scheduled[0]
            if handle._when >= end_time:
                break
            handle = heapq.heappop(scheduled)
            handle._scheduled = False
            ready.append(handle)
        if self._posted:
            self._run_posted()
        for _ in range(len(ready)):
            handle = ready.popleft()
            if not handle._cancelled:
                handle._run()
        handle = None
        self._end_iteration()

    def _end_iteration(self) -> None:
        hook = self.after_iteration
        if hook is not None:
            hook()

    def _make_datagram_transport(self, sock: Any, protocol: Any, address: Any = None, waiter: Any = None,
                                 extra: Any = None) -> Any:
        transport = DrainingTransport(self, sock, protocol, address, waiter, extra)
        transport.gso = self.offload
        transport.gro = self.offload and offload.enable_gro(sock)
        return transport

    def _make_self_pipe(self) -> None:
        self._ssock, self._csock = _real_socketpair()
        self._ssock.setblocking(False)
        self._csock.setblocking(False)
        # the same bookkeeping as asyncio's own _make_self_pipe (private asyncio API)
        self._internal_fds += 1  # type: ignore[attr-defined]
        self._add_reader(self._ssock.fileno(), self._read_from_self)  # type: ignore[attr-defined]


def tune(sock: Any) -> None:
    import socket as std

    for opt in (std.SO_RCVBUF, std.SO_SNDBUF):
        try:
            sock.setsockopt(std.SOL_SOCKET, opt, UDP_BUFFER)
        except OSError:
            pass
