"""UDP through the tunnel: the receiving side's sessions and the dialling side's exchange.

One user address rides one pool connection: raw (every read is one datagram) with a
Go peer, length-framed between npgevent peers (extension level 1).  Both sides end a
session exactly ``NP_UDP_READ_TIMEOUT`` after its last datagram in either direction.
"""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING, Any

import gevent
from gevent import socket
from gevent.event import Event

from ..net.sockopt import can_write_nowait, format_addr, send_all, write_nowait
from ..pool.tcp import PoolConn
from ..protocol.signals import Launch
from ..protocol.udpframe import Deframer, FrameBatch, frame
from ..relay.hubread import HubReader
from ..relay.stats import UDP_RX, UDP_TX
from ..relay.udp import MAX_DATAGRAM, SessionTable, UdpSession

if TYPE_CHECKING:
    from .tunnel import TunnelCore


def keep_datagrams_whole(stream: Any) -> None:
    """Raw UDP (a Go peer) over a QUIC stream: each write is one datagram and must reach the
    peer in one read, so the stream keeps it in one frame (TCP and TLS need nothing)."""
    if hasattr(stream, "datagrams"):
        stream.datagrams = True


class _CutShort(Exception):
    """A write to the pool connection from a hub callback did not complete: *rest* is what
    the exchange's greenlet must write before the hub reads on."""

    def __init__(self, rest: bytes) -> None:
        super().__init__("write cut short")
        self.rest = rest


def udp_exchange(core: TunnelCore, conn: PoolConn, usock: socket.socket) -> None:
    """Pool connection <-> connected UDP socket until idle for NP_UDP_READ_TIMEOUT."""
    acct, limiter = core.inst.traffic.bytes, core.inst.limiter
    idle = core.opts.udp_read_timeout
    framed = core.npg >= 1
    bufsize = MAX_DATAGRAM if framed else core.opts.udp_data_buf_size
    last = [time.monotonic()]
    stream = conn.stream
    if not framed:
        keep_datagrams_whole(stream)
    # no socket timeouts: a watchdog ends the exchange exactly NP_UDP_READ_TIMEOUT after the
    # last datagram either way (a timeout per read would wait a whole new period each time)
    stream.settimeout(None)
    usock.settimeout(None)

    def down() -> None:  # target -> pool
        if limiter is None and can_write_nowait(stream):
            # from hub callbacks, down to this greenlet only to finish a write cut short
            def write(payload: bytes) -> None:
                written = write_nowait(stream, payload)
                if written != len(payload):
                    raise _CutShort(payload[written or 0:])

            def deliver(data: bytes) -> None:  # raw (a Go peer): each write is one datagram
                last[0] = time.monotonic()
                acct[UDP_RX] += len(data)
                write(data)

            batch = FrameBatch()

            def gather(data: bytes, more: bool) -> None:  # framed: one write per wake-up (flush)
                last[0] = time.monotonic()
                acct[UDP_RX] += len(data)
                if not more and not batch.size:  # a lone datagram (the reader stops here): at once
                    write(frame(data))
                elif batch.add(data):
                    write(batch.take())

            def flush() -> None:
                if batch.size:
                    write(batch.take())

            while True:
                try:
                    if framed:
                        HubReader(usock, gather, MAX_DATAGRAM, datagrams=True, flush=flush).serve()
                    else:
                        HubReader(usock, deliver, MAX_DATAGRAM, datagrams=True).serve()
                    return
                except _CutShort as cut:
                    send_all(stream, cut.rest)
        while True:
            try:
                data = usock.recv(MAX_DATAGRAM)
            except ConnectionRefusedError:
                continue
            last[0] = time.monotonic()
            acct[UDP_RX] += len(data)
            send_all(stream, frame(data) if framed else data)
            if limiter is not None:
                limiter.take(len(data))

    def up() -> None:  # pool -> target
        deframer = Deframer() if framed else None
        if limiter is None and HubReader.supports(stream):
            raw = usock._sock

            def deliver(data: bytes) -> None:  # in a hub callback: never waits
                last[0] = time.monotonic()
                for datagram in deframer.feed(data) if deframer is not None else (data,):
                    try:
                        raw.send(datagram)
                    except (BlockingIOError, ConnectionRefusedError):
                        continue  # a full buffer drops it, as UDP does; the target was unreachable
                    acct[UDP_TX] += len(datagram)

            HubReader(stream, deliver, bufsize).serve()
            return
        while True:
            data = stream.recv(bufsize)  # a TLS stream waits for its socket first
            if not data:
                return
            last[0] = time.monotonic()
            for datagram in deframer.feed(data) if deframer is not None else (data,):
                try:
                    usock.send(datagram)
                except ConnectionRefusedError:
                    continue
                acct[UDP_TX] += len(datagram)
                if limiter is not None:
                    limiter.take(len(datagram))

    def guarded(direction: Any) -> None:  # a greenlet must not end by raising (gevent prints it)
        try:
            direction()
        except OSError as exc:
            core.log.debug("UDP exchange ended: %s", exc)

    pair = [gevent.spawn(guarded, down), gevent.spawn(guarded, up)]
    try:
        while not any(g.dead for g in pair):
            left = idle - (time.monotonic() - last[0])
            if left <= 0:
                break
            gevent.wait(pair, timeout=left, count=1)
    finally:
        gevent.killall(pair, block=True)


class TunnelUdpSession(UdpSession):
    """Receiving side: one pool connection per user address, launched with ``#2``.

    Until the first answer, the session is listed in ``core.awaiting`` and keeps what it sent
    (at most :data:`UNANSWERED` datagrams): if the peer names its pool connection in the TLS
    verify signal (a Go peer may pick a connection we just launched on, and closes it), the
    session relaunches on another connection and sends them again.
    """

    UNANSWERED = 32
    VERDICT_WAIT = 0.5  # s: an unanswered session that meets EOF waits this long for a verify signal

    def __init__(self, table: SessionTable, addr: Any, core: TunnelCore) -> None:
        super().__init__(table, addr)
        self.core = core
        self.conn: PoolConn | None = None
        self.framed = core.npg >= 1
        self.deframer = Deframer() if self.framed else None
        self.batch = FrameBatch()  # framed datagrams of this listener wake-up, for one write
        self.writing: list[bytes] = []  # the datagrams the writer greenlet is writing
        self.queue: list[bytes] = []
        self.unanswered: list[bytes] | None = []  # None once answered
        self.relaunch = False
        self.verdict = Event()

    def lost_to_verify(self) -> None:
        """Called by the control loop: our launch went to the connection the peer verifies."""
        self.relaunch = True
        self.verdict.set()
        if self.conn is not None:
            fp = getattr(self.conn.stream, "peer_fingerprint", lambda: "")()
            if fp:
                self.core.log.info("TLS cert verified: %s", fp)
            self.core.log.debug("UDP launch on %s crossed the TLS verify signal: relaunching", self.conn.cid)
            self.conn.close()

    def open(self) -> None:
        core = self.core
        conn = core.pool.take_any(core.opts.pool_get_timeout)
        if conn is None:
            raise OSError("request timeout: no idle pool connection")
        self.conn = conn
        if self.unanswered is not None:
            core.awaiting[conn.cid] = self
        if not self.framed:
            keep_datagrams_whole(conn.stream)
        conn.stream.settimeout(None)  # the session's idle watchdog ends it
        core.log.debug("Tunnel connection: get %s <- pool active %d", conn.cid, core.pool.active)
        core.send_signal(Launch(True, format_addr(self.addr), conn.cid))
        core.log.debug("UDP launch signal: cid %s -> %s", conn.cid, core.peer)

    def send(self, data: bytes) -> None:
        assert self.conn is not None
        self._sent(data)
        self._write(data)
        limiter = self.core.inst.limiter
        if limiter is not None:
            limiter.take(len(data))

    def send_queued(self, pending: collections.deque[tuple[bool, bytes]]) -> int:
        """Framed (an npgevent peer): the whole datagrams at the head of the writer's queue, up
        to :data:`~npgevent.protocol.udpframe.BATCH_BYTES`, in one write.  Once a write to the
        pool connection has had to wait, what the user sends meanwhile queues here; written
        one by one (a TLS record and a syscall each) the queue would stay behind for good.
        :attr:`writing` holds the run while it is written (a relaunch replays it)."""
        if not self.framed:  # raw (a Go peer): one datagram per write, as the base class does
            self.writing = [pending[0][1]]
            done = super().send_queued(pending)
            self.writing = []
            return done
        assert self.conn is not None
        batch = FrameBatch()
        run = self.writing = []
        for whole, data in pending:  # nothing runs meanwhile: no other greenlet touches it
            if not whole:
                break  # the rest of a cut write: after this run, by the writer
            self._sent(data)
            run.append(data)
            if batch.add(data):
                break
        size = batch.size - 2 * len(run)
        send_all(self.conn.stream, batch.take())
        self.writing = []  # not on a kill: the relaunch needs it
        limiter = self.core.inst.limiter
        if limiter is not None:
            limiter.take(size)
        return len(run)

    def _sent(self, data: bytes) -> None:
        """Count a datagram from the user, and keep it for a relaunch until answered."""
        self.core.inst.traffic.bytes[UDP_RX] += len(data)
        if self.unanswered is not None and len(self.unanswered) < self.UNANSWERED:
            self.unanswered.append(data)

    def send_nowait(self, data: bytes) -> tuple[bool, bytes] | None:
        if self.core.inst.limiter is not None:
            return (True, data)  # shaping may have to wait: the writer greenlet does it
        assert self.conn is not None
        batch, listener = self.batch, self.table.listener
        if (self.framed and (batch.size or (listener is not None and listener.more_queued))
                and can_write_nowait(self.conn.stream)):
            # another datagram is queued: gather, and the listener's wake-up ends with one
            # write of all of them (flush); a lone datagram is written at once, as below
            self._sent(data)
            if not batch.size:
                self.table.gathered(self)
            return self.write_gathered() if batch.add(data) else None
        payload = frame(data) if self.framed else data
        written = write_nowait(self.conn.stream, payload)
        if written is None:
            return (True, data)
        self._sent(data)
        return None if written == len(payload) else (False, payload[written:])

    def write_rest(self, rest: bytes) -> None:
        assert self.conn is not None
        send_all(self.conn.stream, rest)

    def write_gathered(self) -> tuple[bool, bytes] | None:
        if not self.batch.size or self.conn is None:
            return None
        payload = self.batch.take()
        written = write_nowait(self.conn.stream, payload)
        if written == len(payload):
            return None
        return (False, payload[written or 0:])  # the writer greenlet finishes it

    def _write(self, data: bytes) -> None:
        assert self.conn is not None
        send_all(self.conn.stream, frame(data) if self.framed else data)

    def read_in_hub(self) -> bool:
        """Once answered (the relaunch logic of :meth:`recv` no longer applies), the pool
        connection is read in hub callbacks (:class:`~npgevent.relay.hubread.HubReader`):
        no greenlet switch per datagram (a QUIC stream serves itself there, as
        :class:`~npgevent.relay.hubread.HubReader` says).  Not with ``rate=``, nor for a Go
        peer's raw datagrams over QUIC."""
        conn = self.conn
        if (self.unanswered is not None or conn is None or self.core.inst.limiter is not None
                or not HubReader.supports(conn.stream)):
            return False
        table, addr, traffic = self.table, self.addr, self.core.inst.traffic.bytes

        def deliver_one(datagram: bytes) -> None:
            self.last = time.monotonic()
            traffic[UDP_TX] += len(datagram)
            table.reply_now(datagram, addr)

        for datagram in self.queue:  # deframed by the last recv, not yet delivered
            deliver_one(datagram)
        self.queue.clear()
        deframer = self.deframer
        if deframer is not None:
            def deliver(data: bytes) -> None:
                for datagram in deframer.feed(data):
                    deliver_one(datagram)

            HubReader(conn.stream, deliver, 65536).serve()
        else:
            HubReader(conn.stream, deliver_one, self.core.opts.udp_data_buf_size).serve()
        return True

    def recv(self) -> bytes | None:
        while True:
            try:
                datagram = self._read()
            except OSError:
                if not self._lost():
                    raise
                datagram = None
            if datagram is None and self._lost():
                self._relaunch()
                continue
            break
        if datagram is None:
            return None
        if self.unanswered is not None:  # answered: nothing to replay any more
            self.unanswered = None
            self._unlist()
        self.core.inst.traffic.bytes[UDP_TX] += len(datagram)
        return datagram

    def _read(self) -> bytes | None:
        assert self.conn is not None
        if self.deframer is not None:
            while not self.queue:
                data = self.conn.stream.recv(65536)
                if not data:
                    return None
                self.queue.extend(self.deframer.feed(data))
            return self.queue.pop(0)
        datagram = self.conn.stream.recv(self.core.opts.udp_data_buf_size)
        return datagram or None

    def _lost(self) -> bool:
        """The connection ended before any answer: was it the peer's verify connection?  The
        signal may come a moment after the connection's end, so wait for it briefly."""
        if not self.relaunch and self.unanswered is not None:
            self.verdict.wait(self.VERDICT_WAIT)
        return self.relaunch

    def _relaunch(self) -> None:
        self.relaunch = False
        self.verdict.clear()
        if self.writer is not None:
            self.writer.kill(block=True)  # it may be writing to the old connection
            # the run it was writing: what the replay below sends again leaves the queue (the
            # first UNANSWERED datagrams of a session are kept for it, the rest are not)
            pending, replayed = self.pending, self.unanswered or []
            for data in self.writing:
                if not (pending and pending[0][1] is data and any(d is data for d in replayed)):
                    break
                pending.popleft()
        self.writing = []
        # the rest of a write cut short belongs to the old connection (its datagram is replayed
        # below with the others); datagrams not yet written go out on the new one
        kept = [item for item in self.pending if item[0]]
        self.pending.clear()
        self.open()
        for data in self.unanswered or ():
            self._write(data)
        for item in kept:
            self._queue(item)

    def _unlist(self) -> None:
        """Off ``core.awaiting`` (if this session is still listed under its connection)."""
        if self.conn is not None and self.core.awaiting.get(self.conn.cid) is self:
            del self.core.awaiting[self.conn.cid]

    def close_far(self) -> None:
        if self.conn is not None:
            self._unlist()
            self.conn.close()
