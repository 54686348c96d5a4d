"""The QUIC thread: one native OS thread running an asyncio loop with aioquic.

The thread is started with the *original* ``_thread.start_new_thread`` (after
``monkey.patch_all()`` ``threading.Thread`` would be a greenlet), and its
asyncio loop is built from original pieces too: an ``EpollSelector``, real
sockets for the UDP endpoints and for the loop's self-pipe.  Nothing in this
thread uses a gevent object or a patched lock; it never logs directly (records
are sent to the hub through the :class:`~npgevent.quic.bridge.Bridge`).

Everything here runs in the thread, driven by calls from gevent
(:meth:`QuicThread.call`), and reports back in batches: per loop iteration,
stream data, new streams, resets, write credit and closed connections are
collected and handed to the gevent side in one message.

Flow control: receive windows follow what the gevent side consumes
(:mod:`npgevent.quic.connection`); on the send side the gevent side may have at
most ``WINDOW`` bytes handed over but not yet on the wire, and
:meth:`QuicThread._after_transmit` reports the sent offset of streams with
pending data ("credit"), which releases blocked writers.  Who may connect is
decided by :mod:`npgevent.quic.admission`.

Every packet crosses both threads, and a thread keeps the GIL from the other for up to the
switch interval (5 ms by default): once the QUIC thread starts, :data:`SWITCH_INTERVAL`.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import sys
import traceback
from collections.abc import Callable
from typing import Any, cast

from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from gevent import monkey

from ..log import Throttle
from .admission import AdmittingServer
from .bridge import Bridge
from .connection import CREDIT_STEP, WindowedConnection
from .loop import NativeLoop, RealSocket, tune
from .protocol import NpProtocol

_start_new_thread = monkey.get_original("_thread", "start_new_thread")
_get_native_id = monkey.get_original("_thread", "get_native_id")
_RealSelector = monkey.get_original("selectors", "DefaultSelector")

_STOP_SENDING: Any = getattr(events, "StopSendingReceived", None)
#: s: how long a thread may keep the GIL while the other waits (see module docstring)
SWITCH_INTERVAL = 0.0005


class QuicThread:
    """The thread side of the QUIC engine (see module docstring).

    *sink* is the gevent-side object: the thread calls its ``_batch``,
    ``_listening``, ``_dialled``, ``_opened``, ``_log`` and ``_crashed`` methods
    through the bridge.
    """

    def __init__(self, bridge: Bridge, sink: Any, keepalive: float, offload: bool = True) -> None:
        self.bridge = bridge
        self.sink = sink
        self.keepalive = keepalive
        self.offload = offload  # segmentation offload on this thread's sockets (quic_offload)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.protocols: dict[int, NpProtocol] = {}
        self.servers: list[tuple[Any, AdmittingServer]] = []
        self.sockets: list[Any] = []  # every UDP socket of this thread (closed from outside if it hangs)
        self.allowed_ip: str | None = None  # server: the one IP admitted ("" = nobody, None = anyone)
        self.creating_ip = ""  # set by AdmittingServer while aioquic may create a connection
        self.handshaking: collections.Counter[str] = collections.Counter()
        self.handshaking_total = 0
        self.drops: collections.Counter[str] = collections.Counter()  # read by tests and the engine
        self._throttle = Throttle()
        self._conn_seq = 0
        self._batch: list[tuple[Any, ...]] = []
        self.to_transmit: dict[int, NpProtocol] = {}  # see transmit_later
        # (conn, sid) -> last reported sent offset, for streams with data not yet on the wire
        self._writing: dict[tuple[int, int], int] = {}
        self._reported: dict[tuple[int, int], int] = {}  # the same, for streams all sent
        self._written: dict[tuple[int, int], int] = {}  # (conn, sid) -> bytes handed over
        self.exited = False
        self.native_id = 0  # the OS thread id, once running (shows in /proc/<pid>/task)

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        sys.setswitchinterval(SWITCH_INTERVAL)
        _start_new_thread(self._main, ())

    def _main(self) -> None:
        loop: asyncio.AbstractEventLoop | None = None
        self.native_id = _get_native_id()
        try:
            loop = NativeLoop(_RealSelector())
            loop.offload = self.offload
            loop.set_exception_handler(self._loop_error)
            self.loop = loop
            loop.after_iteration = self._end_of_iteration
            self.bridge.loop = loop
            loop.call_soon(self.bridge.to_gevent, self.sink._ready)
            loop.call_later(self.keepalive, self._keepalive)
            loop.run_forever()
        except BaseException:
            self.bridge.to_gevent(self.sink._crashed, traceback.format_exc(limit=8))
        finally:
            try:
                if loop is not None:
                    loop.close()
            except BaseException:
                pass
            self.exited = True
            self.bridge.to_gevent(self.sink._exited)

    def call(self, fn: Callable[..., Any], *args: Any) -> bool:
        """From gevent: run ``fn(*args)`` in this thread."""
        return self.bridge.to_thread(self._guard, fn, args)

    def _guard(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception:
            self._guard_error(traceback.format_exc(limit=8))

    def _loop_error(self, _loop: Any, context: dict[str, Any]) -> None:
        """asyncio's exception handler: an error in a callback of the loop.  Network input
        reaches aioquic through callbacks, so none of these takes the tunnel down: they are
        counted and logged (rate-limited).  A future nobody awaited that failed with a
        connection error (a dial given up) is routine and logged at DEBUG only."""
        exc = context.get("exception")
        message = str(context.get("message") or "error")
        if isinstance(exc, ConnectionError) and "never retrieved" in message:
            self.drop("noise", "QUIC: %s: %r" % (message, exc))
            return
        self.drop("loop", "QUIC loop error: %s: %r" % (message, exc), level="error")

    def _guard_error(self, text: str) -> None:
        """A call from gevent failed: a bug on our side, so the tunnel restarts."""
        self.bridge.to_gevent(self.sink._crashed, text)

    def drop(self, kind: str, text: str, level: str = "debug") -> None:
        """Count one refused or failed input of *kind*; log it at most once per 5 s per kind."""
        self.drops[kind] += 1
        suppressed = self._throttle.admit(kind)
        if suppressed is not None:
            self.log(level, text + self._throttle.suffix(suppressed))

    def shutdown(self) -> None:
        """Close every connection and endpoint, then stop the loop (runs in the thread)."""
        for protocol in list(self.protocols.values()):
            try:
                protocol.close()
            except Exception:
                pass
        for transport, server in self.servers:
            try:
                server.close()
            except Exception:
                transport.close()
        self.servers.clear()
        assert self.loop is not None
        self.loop.call_later(0.05, self.loop.stop)

    def abandon(self) -> None:
        """From gevent, when the thread did not stop in time: close its sockets from outside,
        so that the ports are free for the next core; the thread is left to die alone."""
        for sock in self.sockets:
            try:
                sock.close()
            except OSError:
                pass

    def log(self, level: str, text: str) -> None:
        self.bridge.to_gevent(self.sink._log, level, text)

    def new_conn_key(self) -> int:
        self._conn_seq += 1
        return self._conn_seq

    # -- endpoints --------------------------------------------------------------------
    def listen(self, host: str, port: int, config: QuicConfiguration, allowed_ip: str | None) -> None:
        self.allowed_ip = allowed_ip
        assert self.loop is not None
        self.loop.create_task(self._listen(host, port, config))

    async def _listen(self, host: str, port: int, config: QuicConfiguration) -> None:
        import socket as std

        family = std.AF_INET6 if ":" in host or host == "" else std.AF_INET
        sock = RealSocket(family, std.SOCK_DGRAM)
        self.sockets.append(sock)
        try:
            if family == std.AF_INET6:
                sock.setsockopt(std.IPPROTO_IPV6, std.IPV6_V6ONLY, 0)
            tune(sock)
            sock.bind((host or "::", port))
            sock.setblocking(False)
            assert self.loop is not None
            transport, server = await self.loop.create_datagram_endpoint(
                lambda: AdmittingServer(self, configuration=config, create_protocol=self._server_protocol),
                sock=sock)
        except OSError as exc:
            sock.close()
            reason = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            self.bridge.to_gevent(self.sink._listening, "listen udp %s:%d: %s" % (host, port, reason))
            return
        self.servers.append((transport, server))
        self.bridge.to_gevent(self.sink._listening, None)

    def set_allowed_ip(self, ip: str | None, datagram_size: int = 0, token: int = 0) -> None:
        self.allowed_ip = ip
        for _transport, server in self.servers:
            if datagram_size:  # connections created from now on (the client dials after the handshake)
                server._configuration.max_datagram_size = datagram_size
        if token:
            self.bridge.to_gevent(self.sink._acked, token)

    def _server_protocol(self, connection: QuicConnection, stream_handler: Any = None) -> NpProtocol:
        protocol = NpProtocol(connection, self, "server")
        if self.creating_ip:
            protocol.handshake_ip = self.creating_ip
            self.handshaking[self.creating_ip] += 1
            self.handshaking_total += 1
        return protocol

    def _handshake_over(self, protocol: NpProtocol) -> None:
        ip = protocol.handshake_ip
        if ip:
            protocol.handshake_ip = ""
            self.handshaking_total -= 1
            self.handshaking[ip] -= 1
            if self.handshaking[ip] <= 0:
                del self.handshaking[ip]

    def set_certificate(self, config: QuicConfiguration, cert: Any, key: Any) -> None:
        config.certificate = cert
        config.private_key = key

    def dial(self, token: int, ip: str, port: int, config: QuicConfiguration, timeout: float) -> None:
        assert self.loop is not None
        self.loop.create_task(self._dial(token, ip, port, config, timeout))

    async def _dial(self, token: int, ip: str, port: int, config: QuicConfiguration, timeout: float) -> None:
        import socket as std

        family = std.AF_INET6 if ":" in ip else std.AF_INET
        sock = RealSocket(family, std.SOCK_DGRAM)
        self.sockets = [s for s in self.sockets if s.fileno() != -1]  # forget the closed ones
        self.sockets.append(sock)
        protocol: NpProtocol | None = None
        try:
            tune(sock)
            sock.bind(("::" if family == std.AF_INET6 else "0.0.0.0", 0))
            sock.connect((ip, port))  # the kernel drops datagrams from anyone but the server
            sock.setblocking(False)
            assert self.loop is not None
            _transport, protocol = await self.loop.create_datagram_endpoint(
                lambda: NpProtocol(WindowedConnection(configuration=config), self, "client"), sock=sock)
            protocol.connect((ip, port))
            await asyncio.wait_for(protocol.wait_connected(), timeout)
        except Exception as exc:
            timed_out = isinstance(exc, asyncio.TimeoutError)
            reason = "timed out" if timed_out else (str(exc) or type(exc).__name__)
            if protocol is not None:
                self.protocols.pop(protocol.key, None)
                protocol.close()
            else:
                sock.close()
            self.bridge.to_gevent(self.sink._dialled, token, None, "", reason)
            return
        self.bridge.to_gevent(self.sink._dialled, token, protocol.key, protocol.wquic.peer_fingerprint(), "")

    # -- streams ----------------------------------------------------------------------
    def open_stream(self, token: int, conn: int, proof: bytes = b"") -> None:
        """Open a pool stream with NodePass's hello, and the pool *proof* of an authenticated
        tunnel in the same packet."""
        protocol = self.protocols.get(conn)
        if protocol is None or protocol.terminated:
            self.bridge.to_gevent(self.sink._opened, token, conn, None, "connection closed")
            return
        quic = protocol._quic
        try:
            sid = quic.get_next_available_stream_id()
            quic.send_stream_data(sid, b"\x00" + proof)  # NodePass's stream hello
        except Exception as exc:  # StreamLimitReached and the like
            self.bridge.to_gevent(self.sink._opened, token, conn, None, str(exc) or type(exc).__name__)
            return
        protocol.remember(sid)
        self._written[(conn, sid)] = 0
        protocol.transmit()
        self.bridge.to_gevent(self.sink._opened, token, conn, sid, "")

    def send(self, conn: int, sid: int, data: bytes, fin: bool, datagram: bool = False) -> None:
        """Queue *data* on a stream; *datagram*: it is one raw datagram, to be kept whole."""
        protocol = self.protocols.get(conn)
        if protocol is None or protocol.terminated:
            self._push(("reset", conn, sid))
            return
        try:
            protocol._quic.send_stream_data(sid, data, end_stream=fin)
        except Exception:
            self._push(("reset", conn, sid))
            return
        if datagram:
            protocol.wquic.mark_datagram_end(sid)
        key = (conn, sid)
        self._written[key] = self._written.get(key, 0) + len(data)
        if key not in self._writing:
            self._writing[key] = self._reported.pop(key, 0)
        self.transmit_later(protocol)

    def grant(self, conn: int, sid: int, consumed: int) -> None:
        protocol = self.protocols.get(conn)
        if protocol is not None and not protocol.terminated and protocol.wquic.grant(sid, consumed):
            self.transmit_later(protocol)

    def close_stream(self, conn: int, sid: int, reset: bool, stop: bool) -> None:
        key = (conn, sid)
        self._writing.pop(key, None)
        self._reported.pop(key, None)
        self._written.pop(key, None)
        protocol = self.protocols.get(conn)
        if protocol is None or protocol.terminated:
            return
        protocol.wquic.forget_datagram_ends(sid)
        quic = protocol._quic
        try:
            if reset:
                quic.reset_stream(sid, 0)
            if stop:
                quic.stop_stream(sid, 0)
        except Exception:
            pass
        self.transmit_later(protocol)

    def close_conn(self, conn: int) -> None:
        protocol = self.protocols.get(conn)
        if protocol is not None:
            protocol.close()

    # -- events from aioquic ------------------------------------------------------------
    def _on_event(self, protocol: NpProtocol, event: Any) -> None:
        conn = protocol.key
        if isinstance(event, events.StreamDataReceived):
            sid = event.stream_id
            if sid not in protocol.known:
                if protocol.role != "server":
                    return  # a stream we did not open: ignore
                protocol.remember(sid)
                self._written[(conn, sid)] = 0
                self._push(("new", conn, sid))
            self._push_data(conn, sid, event.data, event.end_stream)
        elif isinstance(event, events.StreamReset):
            self._push(("reset", conn, event.stream_id))
        elif _STOP_SENDING is not None and isinstance(event, _STOP_SENDING):
            self._push(("stop", conn, cast(Any, event).stream_id))
        elif isinstance(event, events.HandshakeCompleted):
            self._handshake_over(protocol)
        elif isinstance(event, events.ConnectionTerminated):
            self._handshake_over(protocol)
            protocol.terminated = True
            self.protocols.pop(conn, None)
            for key in [k for k in self._written if k[0] == conn]:
                self._written.pop(key, None)
                self._writing.pop(key, None)
                self._reported.pop(key, None)
            code = event.error_code
            reason = event.reason_phrase or ("error 0x%x" % code if code else "closed")
            self._push(("closed", conn, reason))

    def transmit_later(self, protocol: NpProtocol) -> None:
        """*protocol* has something to send (it parsed a datagram, or gevent handed it data):
        it sends once, at the end of this loop iteration (:meth:`_end_of_iteration`), however
        many datagrams and calls from gevent the iteration brings."""
        self.to_transmit[protocol.key] = protocol

    def _end_of_iteration(self) -> None:
        """What the loop iteration produced: one ``transmit`` per connection with something
        to send, then its events (and the write credit that reports) to gevent in one batch.
        Packets first: handed the batch earlier, the hub would wake only to wait for the GIL
        while this thread builds them, and each hand-over of a contended GIL costs futex
        calls (measured: more system time per round trip, fewer round trips)."""
        if self.to_transmit:
            self.flush_transmits()
        if self._batch:
            self._flush_batch()

    def flush_transmits(self) -> None:
        """One ``transmit`` per connection with something to send (see :meth:`transmit_later`)."""
        pending = self.to_transmit
        while pending:
            _key, protocol = pending.popitem()
            try:
                protocol.transmit()
            except Exception as exc:
                self.drop("error", "QUIC transmit failed: %s: %s" % (type(exc).__name__, exc))

    def _push_data(self, conn: int, sid: int, data: bytes, fin: bool) -> None:
        batch = self._batch
        last = batch[-1] if batch else None
        if last is not None and last[0] == "data" and last[1] == conn and last[2] == sid and not last[4]:
            last[3].append(data)
            batch[-1] = ("data", conn, sid, last[3], fin)
        else:
            self._push(("data", conn, sid, [data], fin))

    def _push(self, item: tuple[Any, ...]) -> None:
        self._batch.append(item)  # handed over at the end of the iteration

    def _flush_batch(self) -> None:
        batch, self._batch = self._batch, []
        self.bridge.to_gevent(self.sink._batch, batch)

    def _after_transmit(self, protocol: NpProtocol) -> None:
        """Report write credit in steps of :data:`CREDIT_STEP`: a writer blocks only with more
        than that outstanding, so smaller reports would wake the hub for nothing (once per
        datagram on a UDP session)."""
        if not self._writing:
            return
        quic = protocol.wquic
        conn = protocol.key
        for key in [k for k in self._writing if k[0] == conn]:
            sent = quic.stream_sent(key[1])
            if sent is None:
                self._writing.pop(key, None)
                continue
            reported = self._writing[key]
            if sent - reported >= CREDIT_STEP:
                self._writing[key] = reported = sent
                self._push(("credit", conn, key[1], sent))
            if sent >= self._written.get(key, 0):
                del self._writing[key]
                self._reported[key] = reported

    def _keepalive(self) -> None:
        assert self.loop is not None
        for protocol in list(self.protocols.values()):
            if not protocol.terminated:
                try:
                    protocol._quic.send_ping(0)
                    protocol.transmit()
                except Exception:
                    pass
        self.loop.call_later(self.keepalive, self._keepalive)
