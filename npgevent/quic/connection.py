"""The aioquic connection as NodePass's QUIC pool needs it: windows and datagram boundaries.

Three departures from aioquic's defaults, all in :class:`WindowedConnection`:

* **receive windows follow the application.**  aioquic doubles a stream's
  ``max_stream_data_local`` when the peer has sent half of it; here only
  :meth:`~WindowedConnection.grant` raises it, to what the gevent side has
  consumed plus :data:`WINDOW`, so a slow reader holds at most that much per
  stream and its peer waits, while other streams keep flowing.
* **raw datagrams stay whole.**  With a Go peer a UDP session rides a stream
  raw: the peer takes each read as one datagram.  aioquic fills packets with
  frames of several streams and cuts a frame where the packet ends, so one
  datagram could reach the peer as two reads.  For a stream whose datagram ends
  are marked (:meth:`~WindowedConnection.mark_datagram_end`), a frame never
  crosses a datagram end, and a datagram that does not fit in what is left of a
  packet waits for the next packet instead of being cut (unless it is larger
  than a whole packet, which no framing can help).
* **ACKs ride on data.**  aioquic acknowledges every packet 1 ms after it came and never
  sooner, so a request answered later than that cost an ACK-only packet each way (a
  packet built, encrypted, sent, received, decrypted and processed: ~60 us of Python at
  each end).  Here data written on a stream takes the pending ACK with it, an ACK is due at
  once after two ack-eliciting packets (RFC 9000's rule; aioquic's timer ignored it), and
  otherwise waits up to the 25 ms of ``max_ack_delay`` that aioquic announces to the peer
  (who allows for it in its loss timers).  The handshake keeps aioquic's rule.
* **a received packet that asks for nothing is not answered with a pass.**  After each
  datagram a relay asks ``datagrams_to_send``; about once per UDP round trip that pass finds
  nothing due (the packet's ACK waits to ride on the answer) and costs ~30 us of walking
  every stream and starting a packet it drops.  :meth:`~WindowedConnection.nothing_due` reads
  the same state the pass reads, and says so only when every part of it is idle; then only
  the timer is set again.  It reads aioquic's private state, so it is used only with the
  aioquic releases it was checked against (:data:`QUIET_CHECK`); elsewhere every datagram
  gets its pass, as before.
"""

from __future__ import annotations

import bisect
import types
from typing import Any

import aioquic
from aioquic import tls
from aioquic.quic.connection import QuicConnection, QuicConnectionState

#: per-stream receive window and send allowance (bytes)
WINDOW = 1 << 20
#: how long an ACK may wait for a packet to ride on: the max_ack_delay aioquic announces
ACK_DELAY = 0.025
#: ack-eliciting packets received that make an ACK due at once (RFC 9000, 13.2.2)
ACK_EVERY = 2
_ONE_RTT = tls.Epoch.ONE_RTT
CREDIT_STEP = WINDOW // 4
_PACKET_OVERHEAD = 64  # short header, packet number, AEAD tag, STREAM frame header: an upper bound
_CONNECTED = QuicConnectionState.CONNECTED
#: aioquic releases whose ``datagrams_to_send`` :meth:`WindowedConnection.nothing_due` mirrors
#: (``tests/unit/test_quic_quiet.py`` checks it against the installed one)
QUIET_RELEASES = ("1.7.",)
QUIET_CHECK = str(getattr(aioquic, "__version__", "")).startswith(QUIET_RELEASES)


class WindowedConnection(QuicConnection):
    """A QuicConnection whose stream receive windows follow the application.

    aioquic doubles ``max_stream_data_local`` when the peer has sent half of it;
    here only :meth:`grant` raises it, to what was consumed plus :data:`WINDOW`.
    Instances are created by aioquic's server as plain ``QuicConnection``; the
    protocol switches their class (this subclass adds methods; its one table,
    the datagram ends, is created on first use).
    """

    def _write_stream_limits(self, builder: Any, space: Any, stream: Any) -> None:
        # called for every stream of the connection for every packet built: the common case
        # (nothing to announce) returns at once
        if stream.max_stream_data_local_sent == stream.max_stream_data_local:
            return
        receiver = stream.receiver
        saved = receiver.highest_offset
        receiver.highest_offset = 0  # keeps aioquic's grow-on-receipt condition false
        try:
            super()._write_stream_limits(builder, space, stream)
        finally:
            receiver.highest_offset = saved

    # -- acknowledgements (module docstring) ---------------------------------------------
    _unacked = 0  # ack-eliciting 1-RTT packets received since this end last sent an ACK

    def _payload_received(self, context: Any, plain: bytes, crypto_frame_required: bool = False) -> Any:
        eliciting, probing = super()._payload_received(context, plain, crypto_frame_required)
        if eliciting and context.epoch is _ONE_RTT:  # (handshake epochs: aioquic's own rule)
            self._unacked += 1
            due = context.time + (ACK_DELAY if self._unacked < ACK_EVERY else 0.0)
            space = self._spaces[_ONE_RTT]
            if space.ack_at is None or space.ack_at > due:
                space.ack_at = due  # aioquic then leaves it alone
        return eliciting, probing

    def _write_ack_frame(self, builder: Any, space: Any, now: float) -> None:
        super()._write_ack_frame(builder, space, now)
        if space is self._spaces.get(_ONE_RTT):
            self._unacked = 0

    def nothing_due(self, now: float) -> bool:
        """True when ``datagrams_to_send(now)`` would build no packet: a connected, confirmed
        connection on one validated path, no ACK due, and nothing pending in any of the
        frames aioquic's application pass writes (control frames, limits, crypto, pings,
        datagrams, and for every stream its limit, reset, stop and data).  Lost frames put
        themselves back into exactly this state, so a loss reads as "due".  False whenever
        in doubt (an aioquic release not in :data:`QUIET_RELEASES`)."""
        if not QUIET_CHECK:
            return False
        space = self._spaces.get(_ONE_RTT)
        if (self._state is not _CONNECTED or self._close_pending or not self._handshake_confirmed
                or space is None or (space.ack_at is not None and space.ack_at <= now)
                or self._probe_pending or self._ping_pending or self._datagrams_pending
                or self._handshake_done_pending or self._retire_connection_ids
                or self._streams_blocked_pending or len(self._network_paths) != 1
                or (self._is_client and self._remote_preferred_address is not None)):
            return False
        path = self._network_paths[0]
        if not path.is_validated or path.remote_challenges:
            return False
        if not self._crypto_streams[_ONE_RTT].sender.buffer_is_empty:
            return False
        for cid in self._host_cids:
            if not cid.was_sent:
                return False
        max_data = self._local_max_data
        if max_data.value != max_data.sent or max_data.used * 2 > max_data.value:
            return False
        for limit in (self._local_max_streams_bidi, self._local_max_streams_uni):
            # aioquic holds MAX_STREAMS back while the peer has more streams left to open
            # than the update would grant
            if limit.value != limit.sent and limit.sent - limit.used < limit.value - limit.sent:
                return False
        queue = self._streams_queue
        if len(queue) != len(self._streams):
            return False
        # the streams that sent last are at the end of aioquic's queue: under bulk data, the
        # one with more to send is found first
        for stream in reversed(queue):
            sender = stream.sender
            if (not sender.buffer_is_empty or sender.reset_pending or stream.receiver.stop_pending
                    or stream.max_stream_data_local_sent != stream.max_stream_data_local
                    or (sender.is_finished and stream.receiver.is_finished)):
                return False
        return True

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        super().send_stream_data(stream_id, data, end_stream)
        space = self._spaces.get(_ONE_RTT)
        if space is not None and space.ack_at is not None:
            space.ack_at = space.largest_received_time  # due now: it rides on this data

    def grant(self, stream_id: int, consumed: int) -> bool:
        stream = self._streams.get(stream_id)
        if stream is None or not stream.max_stream_data_local:
            return False
        want = consumed + WINDOW
        if want > stream.max_stream_data_local:
            stream.max_stream_data_local = want
            return True
        return False

    def peer_fingerprint(self) -> str:
        """``sha256:..`` of the certificate the peer presented ('' if none)."""
        cert = getattr(self.tls, "_peer_certificate", None)
        if cert is None:
            return ""
        from ..net.tls import fingerprint

        return fingerprint(cert)

    def stream_sent(self, stream_id: int) -> int | None:
        stream = self._streams.get(stream_id)
        return None if stream is None else int(stream.sender.highest_offset)

    # -- datagram boundaries (raw UDP towards a Go peer) --------------------------------
    def mark_datagram_end(self, stream_id: int) -> None:
        """Everything written to *stream_id* so far ends a datagram."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        table = self.__dict__.get("_datagram_ends")
        if table is None:
            # from now on this connection writes its stream frames through the method below
            # (aioquic calls it per frame: connections that never carry a raw datagram, which
            # is all of them between npgevent peers, don't pay for the check)
            table = self.__dict__["_datagram_ends"] = {}
            self.__dict__["_write_stream_frame"] = types.MethodType(
                WindowedConnection._write_whole_datagrams, self)
        table.setdefault(stream_id, []).append(stream.sender._buffer_stop)

    def _write_whole_datagrams(self, builder: Any, space: Any, stream: Any, max_offset: int) -> int:
        """aioquic's ``_write_stream_frame``, keeping marked datagrams whole (module docstring)."""
        table: dict[int, list[int]] = self.__dict__["_datagram_ends"]  # made with this hook
        ends = table.get(stream.stream_id)
        if ends:
            start = stream.sender.next_offset
            done = bisect.bisect_right(ends, start)
            del ends[:done]  # datagrams wholly sent (their retransmissions are cut by the next end)
            if not ends:
                table.pop(stream.stream_id, None)
            else:
                end = ends[0]
                max_offset = min(max_offset, end)
                need = end - start + _PACKET_OVERHEAD
                if builder.remaining_flight_space < need <= self._max_datagram_size:
                    return 0  # keep it whole: it starts the next packet
        return int(QuicConnection._write_stream_frame(self, builder, space, stream, max_offset))

    def forget_datagram_ends(self, stream_id: int) -> None:
        table = self.__dict__.get("_datagram_ends")
        if table:
            table.pop(stream_id, None)
