"""One QUIC connection inside the QUIC thread: :class:`NpProtocol`.

aioquic's protocol answers every datagram at once: it parses it, then builds and
sends whatever is due (``transmit``: a packet builder, a walk over every stream's
limits, the loss timer).  When a burst of packets is ready that walk runs once per
packet, and most of those runs send nothing, or one ACK each.  Here a datagram is
only parsed and its events handed on; the protocol is queued, and the loop's
iteration ends with :meth:`~npgevent.quic.thread.QuicThread.flush_transmits`, after the
transport has drained the socket (:class:`~npgevent.quic.loop.DrainingTransport`) and
gevent's calls have run: one ``transmit`` per connection per burst, whose ACK covers the
whole burst and carries the data gevent handed over meanwhile.  A datagram after which
nothing is due (:meth:`~npgevent.quic.connection.WindowedConnection.nothing_due`) queues no
``transmit`` at all, only resets the timer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.connection import QuicConnection

from ..net.sockopt import unmap
from .connection import WindowedConnection

if TYPE_CHECKING:
    from .thread import QuicThread


class NpProtocol(QuicConnectionProtocol):
    """One QUIC connection as seen by the thread."""

    def __init__(self, quic: QuicConnection, owner: QuicThread, role: str, **kw: Any) -> None:
        if type(quic) is QuicConnection:
            quic.__class__ = WindowedConnection
        super().__init__(quic, **kw)
        self.owner = owner
        self.role = role
        self.key = owner.new_conn_key()
        self.known: set[int] = set()  # streams seen: see remember()
        self._forget_at = 64
        self.terminated = False
        self.handshake_ip = ""  # server side: counted in owner.handshaking until it completes
        owner.protocols[self.key] = self

    @property
    def wquic(self) -> WindowedConnection:
        return cast(WindowedConnection, self._quic)

    def remember(self, sid: int) -> None:
        """Note stream *sid* as seen (a server tells a new stream by its first data).  Ids that
        aioquic has since discarded are dropped now and then: it ignores their frames, so no
        event comes for them again, and a long-lived connection's set stays the size of its
        open streams instead of growing by one id per session."""
        known = self.known
        known.add(sid)
        if len(known) > self._forget_at:
            known.intersection_update(self._quic._streams)
            self._forget_at = 2 * len(known) + 64

    def datagram_received(self, data: Any, addr: Any) -> None:
        # admission (who may talk to us) is decided before this, by AdmittingServer on the
        # server and by the connected socket on the client; what aioquic raises for one
        # datagram is that datagram's problem, never the thread's
        quic = self._quic
        try:
            now = self._loop.time()
            quic.receive_datagram(cast(bytes, data), addr, now=now)
            self._process_events()
            if self.key in self.owner.to_transmit:
                return  # an earlier datagram of this burst asked for the pass already
            if cast(WindowedConnection, quic).nothing_due(now):
                # the datagram asks for nothing yet (its ACK waits to ride on the answer):
                # no pass over the streams now, only the timer, for when the ACK falls due
                self._arm(quic.get_timer())
                return
        except Exception as exc:
            self.owner.drop("error", "QUIC datagram from %s dropped: %s: %s"
                            % (unmap(str(addr[0])), type(exc).__name__, exc))
        self.owner.transmit_later(self)

    def transmit(self) -> None:
        """Send what is due, then keep a timer for aioquic's next deadline (see :meth:`_arm`)."""
        self._transmit_task = None
        quic, loop, transport = self._quic, self._loop, cast(Any, self._transport)
        datagrams = quic.datagrams_to_send(now=loop.time())
        if datagrams:
            transport.send_batch(datagrams)
        self._arm(quic.get_timer())
        self.owner._after_transmit(self)

    def _arm(self, deadline: float | None) -> None:
        """aioquic's protocol cancels its timer and makes a new one whenever the deadline moves,
        which is after nearly every packet (the loss timer moves on with each one sent, the ACK
        timer comes and goes): a timer handle, a heap push and, later, the cancelled handle's
        pop, two or three times per round trip.  Here a timer that fires no later than the
        deadline is kept; when it fires early, :meth:`_handle_timer` sets it again for the
        deadline then current.  A deadline that moved earlier gets a new timer."""
        self._timer_at = deadline
        timer = self._timer
        if deadline is None or (timer is not None and timer.when() <= deadline):
            return
        if timer is not None:
            timer.cancel()
        self._timer = self._loop.call_at(deadline, self._handle_timer)

    def _handle_timer(self) -> None:
        self._timer = None
        deadline, loop = self._timer_at, self._loop
        if deadline is None:
            return  # nothing is due any more
        now = loop.time()
        if deadline > now + loop._clock_resolution:  # type: ignore[attr-defined]
            self._timer = loop.call_at(deadline, self._handle_timer)  # it moved on: fire then
            return
        self._timer_at = None
        self._quic.handle_timer(now=max(deadline, now))
        self._process_events()
        self.transmit()

    def quic_event_received(self, event: Any) -> None:
        self.owner._on_event(self, event)
