"""The gevent side of a QUIC stream: socket-like :class:`QuicStream`.

:class:`QuicStream` looks to the relay like a socket: ``recv``/``recv_into``
(blocking the calling greenlet, honouring ``settimeout``), ``sendall`` (blocking
while more than the send window is in flight), ``shutdown(SHUT_WR)`` (FIN, so
half-close works), ``close`` (reset/stop-sending if not finished both ways),
``probe`` for the pool, and :meth:`~QuicStream.serve_in_hub` for readers that run in
hub callbacks.  Every byte consumed is reported back in steps so the thread can widen
the peer's window: a stream never buffers more than ``WINDOW`` bytes.  Its engine
(:class:`~npgevent.quic.engine.QuicEngine`) applies the thread's batches to it, in the hub.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gevent import socket
from gevent.event import Event

from ..errors import detached
from .connection import CREDIT_STEP, WINDOW

if TYPE_CHECKING:
    from .engine import QuicEngine

CHUNK = 65536


class QuicStream:
    """One bidirectional QUIC stream, used by greenlets like a socket."""

    def __init__(self, engine: QuicEngine, conn: int, sid: int) -> None:
        self.engine = engine
        self.conn = conn
        self.sid = sid
        self._chunks: collections.deque[bytes] = collections.deque()
        self._fin = False  # the peer finished sending
        self._broken = ""  # reset / connection closed
        self._wfin = False  # we finished sending
        self.closed = False
        self._readable = Event()
        self._writable = Event()
        self.consumed = 0
        self._granted = 0
        self.written = 0
        self.sent = 0
        self.timeout: float | None = None
        #: every sendall is one raw datagram (UDP towards a Go peer): kept whole on the wire
        self.datagrams = False
        #: set by :meth:`serve_in_hub`: called in the hub instead of waking a reader greenlet
        self._on_ready: Callable[[], None] | None = None

    # -- fed by the engine (in the hub; never blocks) -----------------------------------
    def _feed(self, chunks: list[bytes], fin: bool) -> None:
        self._chunks.extend(c for c in chunks if c)
        if fin:
            self._fin = True
        self._wake()

    def _break(self, why: str) -> None:
        if not self._broken:
            self._broken = why
        self._wake()
        self._writable.set()

    def _wake(self) -> None:
        on_ready = self._on_ready
        if on_ready is not None:
            on_ready()  # serve_in_hub(): the chunks go on from here, in the hub
        else:
            self._readable.set()

    def _credit(self, sent: int) -> None:
        if sent > self.sent:
            self.sent = sent
            self._writable.set()

    # -- reading ------------------------------------------------------------------------
    def _wait_readable(self) -> bool:
        """Block until data, FIN or an error; False at a clean end of stream."""
        while not self._chunks:
            if self._fin:
                return False
            if self._broken or self.closed:
                raise ConnectionResetError(self._broken or "stream closed")
            self._readable.clear()
            if not self._readable.wait(self.timeout):
                raise socket.timeout("timed out")
        return True

    def recv(self, n: int) -> bytes:
        """Up to *n* bytes of what has arrived, across chunks, as a socket (and quic-go's
        Read) returns them: a Go peer's raw datagram that came in two frames is read whole."""
        if not self._wait_readable():
            return b""
        chunks = self._chunks
        first = chunks[0]
        if len(first) >= n or len(chunks) == 1:
            if len(first) <= n:
                chunks.popleft()
                data = first
            else:
                data, chunks[0] = first[:n], first[n:]
        else:
            buf = bytearray()
            while chunks and len(buf) < n:
                piece = chunks.popleft()
                take = n - len(buf)
                if len(piece) > take:
                    chunks.appendleft(piece[take:])
                    piece = piece[:take]
                buf += piece
            data = bytes(buf)
        self._consume(len(data))
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        want = nbytes or len(buffer)
        if not self._wait_readable():
            return 0
        view = memoryview(buffer)
        got = 0
        chunks = self._chunks
        while chunks and got < want:
            first = chunks[0]
            take = min(len(first), want - got)
            view[got : got + take] = first[:take]
            if take == len(first):
                chunks.popleft()
            else:
                chunks[0] = first[take:]
            got += take
        self._consume(got)
        return got

    @property
    def hub_served(self) -> bool:
        """Whether :meth:`serve_in_hub` may read this stream: not where each write is one raw
        datagram (a Go peer's UDP), whose peer's datagram may come as two chunks that
        :meth:`recv` joins."""
        return not self.datagrams

    def serve_in_hub(self, deliver: Callable[[bytes], None]) -> None:
        """Hand every chunk that arrives to *deliver* in the hub, as the engine applies the
        thread's batch, and block the calling greenlet until the stream ends (return) or
        breaks (``ConnectionResetError``; what *deliver* raised, raised here).  What a
        :class:`~npgevent.relay.hubread.HubReader` does for a socket: the reader greenlet is
        not woken per chunk, a switch pair saved per datagram of a UDP session.  *deliver*
        must not wait; the chunks are consumed as they are delivered (the peer's window
        follows).  No read timeout: the session's own watchdog ends it."""
        ended = Event()
        failure: list[Exception] = []
        chunks = self._chunks

        def ready() -> None:
            if ended.is_set():
                return
            try:
                while chunks:
                    chunk = chunks.popleft()
                    self._consume(len(chunk))
                    deliver(chunk)
            except Exception as exc:  # the session ends with it; the hub carries on
                failure.append(detached(exc))
                ended.set()
                return
            if self._fin or self._broken or self.closed:
                ended.set()

        self._on_ready = ready
        try:
            ready()  # what came before
            ended.wait()
        finally:
            ended.set()
            self._on_ready = None
        if failure:
            raise failure.pop()  # no local left holding it: its traceback holds this frame
        if self._broken or (self.closed and not self._fin):
            raise ConnectionResetError(self._broken or "stream closed")

    def _consume(self, n: int) -> None:
        self.consumed += n
        if self.consumed - self._granted >= CREDIT_STEP:
            self._granted = self.consumed
            self.engine.thread.call(self.engine.thread.grant, self.conn, self.sid, self.consumed)

    # -- writing ------------------------------------------------------------------------
    def sendall(self, data: Any, flags: int = 0) -> None:
        view = memoryview(data).cast("B")
        total = len(view)
        off = 0
        while off < total:
            room = self._room()
            if room <= 0 or (self.datagrams and room < total - off):  # a datagram goes in one piece
                self._writable.clear()
                if not self._writable.wait(self.timeout):
                    raise socket.timeout("timed out")
                continue
            n = min(room, total - off, CHUNK)
            self._hand_over(bytes(view[off : off + n]))
            off += n

    def send_nowait(self, data: bytes) -> int:
        """:meth:`sendall` if *data* fits the send window now (then ``len(data)``), else 0."""
        n = len(data)
        if n > CHUNK or self._room() < n:
            return 0
        self._hand_over(bytes(data))
        return n

    def _room(self) -> int:
        """What may be handed to the thread now (BrokenPipeError if the stream can't send)."""
        if self._broken or self.closed or self._wfin:
            raise BrokenPipeError(self._broken or "stream closed for writing")
        return WINDOW - (self.written - self.sent)

    def _hand_over(self, chunk: bytes) -> None:
        self.written += len(chunk)
        thread = self.engine.thread
        if not thread.call(thread.send, self.conn, self.sid, chunk, False, self.datagrams):
            raise BrokenPipeError("QUIC engine stopped")

    def shutdown(self, how: int) -> None:
        if how in (socket.SHUT_WR, socket.SHUT_RDWR) and not self._wfin and not self.closed:
            self._wfin = True
            thread = self.engine.thread
            thread.call(thread.send, self.conn, self.sid, b"", True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        engine = self.engine
        if engine.streams.pop((self.conn, self.sid), None) is not None and engine.stream_count[self.conn] > 0:
            engine.stream_count[self.conn] -= 1
        thread = engine.thread
        # abort what is not finished: reset our direction, ask the peer to stop its own
        thread.call(thread.close_stream, self.conn, self.sid, not self._wfin, not self._fin)
        self._wake()
        self._writable.set()

    def settimeout(self, value: float | None) -> None:
        self.timeout = value

    # -- pool support -------------------------------------------------------------------
    def probe(self) -> bool:
        """False if the stream is unusable: closed, reset, its connection gone, or finished by
        the peer without any data.  Data followed by FIN is a live session whose launch signal
        has not been handled yet (the user sent its request and half-closed at once)."""
        if self.closed or self._broken or not self.engine.conn_alive(self.conn):
            return False
        return not (self._fin and not self._chunks)

    @property
    def has_pending(self) -> bool:
        return bool(self._chunks) or self._fin

    def peer_fingerprint(self) -> str:
        return self.engine.fingerprints.get(self.conn, "")
