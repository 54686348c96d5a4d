"""The gevent side of QUIC: :class:`QuicEngine`, the facade of one QUIC thread.

:class:`QuicEngine` owns the native :class:`~npgevent.quic.thread.QuicThread`
and the :class:`~npgevent.quic.bridge.Bridge`.  Greenlets call ``listen``,
``dial`` and ``open_stream``, which post work to the thread and wait on gevent
events for the answer.  The thread's batches arrive in the hub and are applied
to the streams (:class:`~npgevent.quic.stream.QuicStream`: append data, mark
FIN/reset, update write credit); those callbacks never block.

Shutdown: ``stop()`` asks the thread to close every connection and stop its
loop, waits (in gevent) for the thread to report its exit, closes the bridge
and fails any stream still open.  A crash in the thread is reported to
``on_failure`` so the tunnel core fails and restarts.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable
from typing import Any

from gevent.event import AsyncResult, Event

from ..errors import CoreError
from ..log import InstanceLog
from .bridge import Bridge
from .stream import QuicStream
from .thread import QuicThread


class QuicEngine:
    """The gevent-side facade of one QUIC thread."""

    def __init__(self, log: InstanceLog, keepalive: float, offload: bool = True) -> None:
        self.log = log
        self.bridge = Bridge()
        self.thread = QuicThread(self.bridge, self, keepalive, offload)
        self.streams: dict[tuple[int, int], QuicStream] = {}
        self.alive: set[int] = set()
        self.fingerprints: dict[int, str] = {}
        self.stream_count: collections.Counter[int] = collections.Counter()
        self.on_new_stream: Callable[[QuicStream], None] | None = None
        self.on_conn_closed: Callable[[int, str], None] | None = None
        self.on_failure: Callable[[str], None] | None = None
        self.failure = ""
        self._ready_event = Event()
        self._exit_event = Event()
        self._tokens = itertools.count(1)
        self._waiting: dict[int, AsyncResult] = {}
        self._dial_tokens: set[int] = set()
        self._listen_result: AsyncResult | None = None
        self.started = False

    # -- lifecycle ----------------------------------------------------------------------
    def start(self, timeout: float = 5.0) -> None:
        self.thread.start()
        self.started = True
        if not self._ready_event.wait(timeout):
            raise CoreError("QUIC thread did not start")

    def stop(self, timeout: float = 3.0) -> None:
        if not self.started:
            self.bridge.close()
            return
        self.started = False
        asked = not self.thread.exited and self.thread.call(self.thread.shutdown)
        if asked and not self._exit_event.wait(timeout):
            self.log.error("QUIC thread did not stop within %ss: abandoned, its sockets closed", timeout)
            self.thread.abandon()  # the port must be free for the next core
        self.bridge.close()
        for stream in list(self.streams.values()):
            stream._break("QUIC engine stopped")
        for token, waiter in list(self._waiting.items()):
            if not waiter.ready():
                waiter.set((None, None, "QUIC engine stopped") if token in self._dial_tokens
                           else (None, "QUIC engine stopped"))

    def conn_alive(self, conn: int) -> bool:
        return conn in self.alive

    # -- requests (greenlets) -----------------------------------------------------------
    def listen(self, host: str, port: int, config: Any, allowed_ip: str | None, timeout: float = 5.0) -> None:
        self._listen_result = AsyncResult()
        self.thread.call(self.thread.listen, host, port, config, allowed_ip)
        err = self._listen_result.get(timeout=timeout)
        if err:
            from ..net.sockopt import ListenError

            raise ListenError(None, err)

    def admit(self, ip: str, datagram_size: int = 0, timeout: float = 2.0) -> None:
        """Admit *ip* (the tunnel client) to the QUIC endpoint and wait until the thread has
        applied it, so that a peer dialling the instant it reads the handshake reply is let in."""
        token = next(self._tokens)
        waiter = self._waiting[token] = AsyncResult()
        try:
            if not self.thread.call(self.thread.set_allowed_ip, ip, datagram_size, token):
                raise CoreError("QUIC thread is not running")
            if waiter.wait(timeout) is None:
                raise CoreError("QUIC thread did not admit the client within %ss" % timeout)
        finally:
            self._waiting.pop(token, None)

    @property
    def drops(self) -> Any:
        """Datagrams and connections refused, by kind (a Counter owned by the thread)."""
        return self.thread.drops

    def dial(self, ip: str, port: int, config: Any, timeout: float) -> int:
        token = next(self._tokens)
        waiter = self._waiting[token] = AsyncResult()
        self._dial_tokens.add(token)
        self.thread.call(self.thread.dial, token, ip, port, config, timeout)
        try:
            conn, _fp, err = waiter.get(timeout=timeout + 2)
        finally:
            self._waiting.pop(token, None)
            self._dial_tokens.discard(token)
        if conn is None:
            raise ConnectionError("QUIC dial %s:%d: %s" % (ip, port, err))
        return int(conn)

    def open_stream(self, conn: int, timeout: float, proof: bytes = b"") -> QuicStream:
        """A new pool stream on *conn*, its hello (and *proof*) written."""
        token = next(self._tokens)
        waiter = self._waiting[token] = AsyncResult()
        self.thread.call(self.thread.open_stream, token, conn, proof)
        try:
            stream, err = waiter.get(timeout=timeout)
        except BaseException:
            self._waiting.pop(token, None)
            raise
        if stream is None:
            raise ConnectionError("QUIC stream: %s" % err)
        return stream

    def close_conn(self, conn: int) -> None:
        self.thread.call(self.thread.close_conn, conn)

    # -- callbacks from the thread (in the hub: must not block) -------------------------
    def _ready(self) -> None:
        self._ready_event.set()

    def _exited(self) -> None:
        self._exit_event.set()

    def _acked(self, token: int) -> None:
        waiter = self._waiting.get(token)
        if waiter is not None:
            waiter.set(True)

    def _log(self, level: str, text: str) -> None:
        getattr(self.log, level)("QUIC: %s", text)

    def _crashed(self, text: str) -> None:
        last = text.strip().splitlines()[-1] if text.strip() else "unknown error"
        self.log.error("QUIC thread error: %s", last)
        self.log.debug("QUIC thread error details:\n%s", text)
        self.failure = last
        if self.on_failure is not None:
            self.on_failure(last)

    def _listening(self, err: str | None) -> None:
        if self._listen_result is not None:
            self._listen_result.set(err)

    def _dialled(self, token: int, conn: int | None, fp: str, err: str) -> None:
        if conn is not None:
            self.alive.add(conn)
            self.fingerprints[conn] = fp
        waiter = self._waiting.pop(token, None)
        if waiter is not None:
            waiter.set((conn, fp, err))
        elif conn is not None:
            self.close_conn(conn)  # nobody waits any more

    def _opened(self, token: int, conn: int, sid: int | None, err: str) -> None:
        waiter = self._waiting.pop(token, None)
        if sid is None:
            if waiter is not None:
                waiter.set((None, err))
            return
        if waiter is None:  # the opener gave up: nobody will use this stream
            self.thread.call(self.thread.close_stream, conn, sid, True, True)
            return
        # register it here, in the hub, before the thread's next batch (which may already
        # carry the server's answer) is applied; the opener may resume only later
        stream = self.streams[(conn, sid)] = QuicStream(self, conn, sid)
        self.stream_count[conn] += 1
        waiter.set((stream, ""))

    def _batch(self, items: list[tuple[Any, ...]]) -> None:
        streams = self.streams
        for item in items:
            kind = item[0]
            if kind == "data":
                stream = streams.get((item[1], item[2]))
                if stream is not None:
                    stream._feed(item[3], item[4])
            elif kind == "credit":
                stream = streams.get((item[1], item[2]))
                if stream is not None:
                    stream._credit(item[3])
            elif kind == "new":
                conn, sid = item[1], item[2]
                self.alive.add(conn)
                stream = streams[(conn, sid)] = QuicStream(self, conn, sid)
                self.stream_count[conn] += 1
                if self.on_new_stream is not None:
                    self.on_new_stream(stream)
                else:
                    stream.close()
            elif kind in ("reset", "stop"):
                stream = streams.get((item[1], item[2]))
                if stream is not None:
                    stream._break("stream reset by the peer")
            elif kind == "closed":
                conn = item[1]
                self.alive.discard(conn)
                self.fingerprints.pop(conn, None)
                self.stream_count.pop(conn, None)
                for key in [k for k in streams if k[0] == conn]:
                    streams[key]._break("QUIC connection closed: %s" % item[2])
                if self.on_conn_closed is not None:
                    self.on_conn_closed(conn, item[2])
