"""Single-end forwarding (client run mode 1): a plain TCP/UDP port forwarder.

``client://127.0.0.1:8080/target:80`` listens on the tunnel address and relays
each TCP connection and each UDP source address (a session with a connected UDP
socket to the target) to the target group, with failover, ``dial=``, ``read=``,
``rate=``, ``slot=``, ``proxy=1`` and ``notcp``/``noudp``.

A TCP connection is dialled at accept, in the hub; when its target is up at once
(loopback, this host) the session relays from hub callbacks alone
(:class:`~npgevent.relay.tcphub.HubSession`) and no greenlet runs for it unless a
direction turns bulk.  A dial that has to wait, fails over or needs a DNS lookup,
and sessions with ``read=``, ``rate=`` or ``proxy=1``, run in a greenlet
(gevent ``StreamServer``, a session job plus one for the reverse direction).

Every ``NP_REPORT_INTERVAL`` it logs the CHECK_POINT line with ``MODE=1``,
``POOL=0`` and ``PING`` = TCP connect time to a target (0 if unreachable); a
worker process hands the figures to its parent instead (:mod:`npgevent.workers`),
and times that connect only while the parent names it the group's prober.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import gevent
from gevent import socket

from ..log import ERROR, checkpoint_line
from ..net.dial import Attempt, Dialer, DialError
from ..net.sockopt import format_addr, send_all
from ..protocol.proxyproto import proxy_v1
from ..relay.listeners import Listeners
from ..relay.stats import TCP_RX, TCP_TX
from ..relay.tcp import relay
from ..relay.tcphub import HubSession
from ..relay.udp import SessionTable, UdpSession, UdpTargetSession
from .common import Core, Instance


class ForwardCore(Core):
    """Single-end TCP+UDP forwarder on the client URL's tunnel address."""

    mode = 1

    def __init__(self, inst: Instance, tcp_listener: socket.socket | None = None) -> None:
        super().__init__(inst)
        self._pre_listener = tcp_listener
        self.dialer = Dialer(inst.spec.targets, inst.resolver, source_ip=self.opts.dial,
                             tcp_timeout=self.opts.tcp_dial_timeout, log=self.log,
                             events=inst.events)
        self.listeners = Listeners(self.opts, inst.slots, self.log, self.sessions.spawn)

    def _start(self) -> None:
        tunnel = self.inst.spec.tunnel
        sock, self._pre_listener = self._pre_listener, None
        self.listeners.open(tunnel, self._handle_tcp, self._new_udp_session,
                            ip=self.inst.resolver.listen_ip(tunnel.host), tcp_sock=sock,
                            tcp_start=self._start_tcp)
        self.spawn_task(self._report)

    # -- TCP ---------------------------------------------------------------------
    def _start_tcp(self, conn: socket.socket, addr: Any) -> bool:
        """At accept, in the hub: dial, and where the target is up at once relay from hub
        callbacks alone (no greenlet for the session); a dial that has to wait or fail over
        goes on in a session job.  Sessions that need a greenlet's relay (``read=``,
        ``rate=``, ``proxy=1``) or log each exchange (debug) take the handler's path."""
        if not self.hub_sessions():
            return False
        started = self.dialer.start_tcp()
        if isinstance(started, Attempt):
            self.sessions.spawn(self.listeners.run_tcp, self._handle_tcp, conn, addr, started)
            return True
        target = started[0]
        HubSession(conn, target, self.inst.traffic.bytes, TCP_RX, TCP_TX, self.opts.tcp_data_buf_size,
                   partial(self._end_tcp, conn, target)).start(self.sessions)
        return True

    def _end_tcp(self, conn: socket.socket, target: socket.socket, _err: BaseException | None) -> None:
        target.close()
        self.listeners.end_tcp(conn)

    def _handle_tcp(self, conn: socket.socket, addr: Any, attempt: Attempt | None = None) -> None:
        """One user connection (its slot is held by the listener)."""
        inst, log = self.inst, self.log
        try:
            target, where = self.dialer.dial_tcp(attempt=attempt)
        except (DialError, OSError) as exc:
            log.limited(ERROR, "dial", "Dial target failed for %s: %s", format_addr(addr), exc)
            return
        try:
            if log.enabled(10):
                log.debug("Target connection: %s <-> %s", format_addr(addr), where)
            if self.opts.proxy:
                send_all(target, proxy_v1(addr, target.getpeername()))
            reason = relay(conn, target, inst.traffic.bytes, TCP_RX, TCP_TX,
                           limiter=inst.limiter, idle=self.opts.read,
                           bufsize=self.opts.tcp_data_buf_size)
            if log.enabled(10):
                log.debug("Exchange complete: %s <-> %s: %s", format_addr(addr), where, reason)
        except OSError as exc:
            log.debug("Exchange failed: %s: %s", format_addr(addr), exc)
        finally:
            target.close()

    # -- UDP ---------------------------------------------------------------------
    def _new_udp_session(self, table: SessionTable, addr: Any) -> UdpSession:
        return UdpTargetSession(table, addr, self.dialer, self.inst.traffic.bytes,
                                self.inst.limiter)

    # -- reporting ---------------------------------------------------------------
    def _report(self) -> None:
        inst = self.inst
        while True:
            ping = self.dialer.probe_ms() if inst.probes_target() else 0
            t = inst.traffic
            if inst.checkpoint_sink is not None:  # a worker: the parent logs the sum
                inst.checkpoint_sink((ping, inst.slots.tcp, inst.slots.udp, t.tcp_rx, t.tcp_tx,
                                      t.udp_rx, t.udp_tx))
            else:
                self.log.event(checkpoint_line(1, ping, 0, inst.slots.tcp, inst.slots.udp,
                                               t.tcp_rx, t.tcp_tx, t.udp_rx, t.udp_tx))
            self.listeners.report_drops()
            gevent.sleep(self.opts.report_interval)

    # -- teardown ----------------------------------------------------------------
    def _stop_accepting(self) -> None:
        self.listeners.stop_accepting()

    def _close(self) -> None:
        self.listeners.close()
        if self._pre_listener is not None:
            self._pre_listener.close()
            self._pre_listener = None
