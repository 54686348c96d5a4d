"""Reading a stream in hub callbacks: a datagram costs no greenlet switch.

A UDP session's greenlet used to wake for every datagram from its far end, read it, pass it
on and go back to sleep: a switch pair and a failed read per datagram, about a fifth of a
relay's CPU per round trip.  :class:`HubReader` instead starts a libev read watcher on the
stream's descriptor and hands every ready chunk to *deliver* from the watcher's callback, in
the hub; the session's greenlet only waits for the end.

What may run in a hub callback is narrow: nothing that waits.  So *deliver* must not block
(UDP replies use a non-blocking ``sendto`` and drop on a full buffer), and only streams that
can be read without waiting qualify (:func:`nowait_reader`): plain gevent sockets, and
:class:`~npgevent.net.tls.TLSStream` through its ``recv_nowait``.  A stream with no descriptor
to watch that hands its chunks over in the hub itself (a
:class:`~npgevent.quic.stream.QuicStream` whose ``hub_served`` holds: its ``serve_in_hub``)
is served by that.  Anything else (a QUIC stream carrying a Go peer's raw datagrams, a
rate-limited session) keeps reading in its greenlet.

A callback reads at most :data:`READS_PER_WAKEUP` chunks, so a flooding peer can't hold the
hub; what is left on the socket wakes the watcher again (level-triggered), and what a TLS
stream already decrypted (which no socket event announces) is taken up by a follow-up
callback.  It stops without the read that would fail (a syscall and an exception) where it
can tell that nothing is left (:func:`drain_check`).  *flush*, if given, is called at the
end of every wake-up, after its last *deliver*, and *deliver* then takes a second argument:
whether the reader may read on after this chunk (nothing told it the stream is drained).  A
deliver that gathers (framed datagrams for one write,
:class:`~npgevent.protocol.udpframe.FrameBatch`) writes a lone chunk at once and the rest in
*flush*.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import Event

from ..errors import detached
from ..net.lightsock import PLAIN
from ..net.sockopt import has_input

READS_PER_WAKEUP = 16

#: reads what is ready without waiting: the bytes, ``None`` if nothing is, ``b""`` at the end
NowaitRead = Callable[[int], "bytes | None"]


def nowait_reader(stream: Any) -> NowaitRead | None:
    """A non-blocking read for *stream*, or None if it can't be read from the hub."""
    if type(stream) in PLAIN:
        raw = stream._sock  # the non-blocking stdlib socket under the gevent one

        def read(n: int) -> bytes | None:
            try:
                return raw.recv(n)
            except BlockingIOError:
                return None

        return read
    return getattr(stream, "recv_nowait", None)


def drain_check(stream: Any, size: int, datagrams: bool) -> Callable[[bytes], bool] | None:
    """What tells, after a read of *size* returned *data*, that another read would find nothing:
    a plain stream's read came back short; a UDP socket holds no other datagram
    (``FIONREAD``); a stream's own ``drained()`` (TLS: nothing decrypted inside, no bytes on the
    socket).  None: read until a read finds nothing."""
    if type(stream) in PLAIN:
        if datagrams:
            fd = stream.fileno()
            return lambda data: not has_input(fd)
        return lambda data: len(data) < size
    own: Callable[[], bool] | None = getattr(stream, "drained", None)
    if own is None:
        return None
    return lambda data: own()


def _serves_itself(stream: Any) -> bool:
    """Whether *stream* hands its chunks to a reader in the hub itself (``serve_in_hub``)."""
    return bool(getattr(stream, "hub_served", False))


class HubReader:
    """Feed what *stream* delivers to *deliver*, from hub callbacks, until it ends.

    *datagrams*: the stream is a UDP socket (an empty read is an empty datagram, not the end,
    and an ICMP "port unreachable" from the target is skipped, as the greenlet path does).
    """

    def __init__(self, stream: Any, deliver: Callable[..., None], size: int,
                 datagrams: bool = False, flush: Callable[[], None] | None = None) -> None:
        # a stream that serves itself takes neither (they are for sockets: UDP, gathering)
        own = _serves_itself(stream) and not datagrams and flush is None
        self._own: Callable[[Callable[..., None]], None] | None = stream.serve_in_hub if own else None
        read = nowait_reader(stream)
        if read is None and self._own is None:
            raise ValueError("%s can't be read from the hub" % type(stream).__name__)
        self._read = read
        self._stream = stream
        self._deliver = deliver
        self._size = size
        self._datagrams = datagrams
        self._flush = flush

    @staticmethod
    def supports(stream: Any) -> bool:
        """Whether :func:`nowait_reader` has a read for *stream* (asked per datagram by a
        session still reading in its greenlet: builds nothing), or it serves itself."""
        return type(stream) in PLAIN or hasattr(stream, "recv_nowait") or _serves_itself(stream)

    def serve(self) -> None:
        """Block the calling greenlet until the stream ends (return) or fails (raise)."""
        if self._own is not None:
            self._own(self._deliver)
            return
        loop = gevent.get_hub().loop
        ended = Event()
        failure: list[Exception] = []
        watcher = loop.io(self._stream.fileno(), 1)
        read, deliver, size, datagrams = self._read, self._deliver, self._size, self._datagrams
        assert read is not None  # a reader was found in __init__ unless the stream serves itself
        flush = self._flush
        buffered = getattr(self._stream, "has_buffered", None)
        drained = drain_check(self._stream, size, datagrams)
        # the follow-up callback (itself), through a list emptied at the end: a function that
        # named itself would be a cycle holding the session until the collector's next pass
        again: list[Callable[[], None]] = []

        def readable() -> None:
            if ended.is_set():
                return
            try:
                try:
                    for _ in range(READS_PER_WAKEUP):
                        try:
                            data = read(size)
                        except ConnectionRefusedError:
                            if datagrams:
                                continue
                            raise
                        if data is None:
                            return
                        if not data and not datagrams:
                            watcher.stop()
                            ended.set()
                            return
                        end = drained is not None and drained(data)
                        if flush is None:
                            deliver(data)
                        else:
                            deliver(data, not end)  # (data, more): it may gather
                        if end:
                            return
                    if buffered is not None and buffered():
                        loop.run_callback(again[0])  # decrypted bytes no socket event will announce
                finally:
                    if flush is not None:
                        flush()  # what this wake-up gathered, in one write (even if a read failed)
            except Exception as exc:  # the session ends with it; the hub carries on
                failure.append(detached(exc))
                watcher.stop()
                ended.set()

        again.append(readable)
        watcher.start(readable)
        if buffered is not None and buffered():
            loop.run_callback(readable)
        try:
            ended.wait()
        finally:
            ended.set()  # a follow-up callback still queued finds the reader over
            watcher.stop()
            watcher.close()
            again.clear()
        if failure:
            raise failure.pop()  # no local left holding it: its traceback holds this frame
