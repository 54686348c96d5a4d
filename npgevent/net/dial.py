"""Outbound dials to the target group: round robin, failover, source IP.

One target: dial it.  Several: start at a round-robin index, then try each in
order until one connects (NodePass's failover); all failed -> one error naming
every target.  A name resolving to several addresses tries them in turn.

``dial=<ip>`` binds outbound sockets to that source address; if binding fails
(address not on this host, wrong family) npgevent logs it once and falls back
to ``auto`` for good, as Go does.

:meth:`Dialer.start_tcp` begins a dial inside a hub callback (single-end forwarding calls it
at accept): a target whose address is known and that connects at once (loopback, this host)
is ready before any greenlet runs; anything else becomes an :class:`Attempt` that
:meth:`Dialer.dial_tcp` finishes in a greenlet with the same order, failover and errors.
"""

from __future__ import annotations

import errno
import itertools
import os
import time
from typing import Any

from gevent import socket

from ..log import InstanceLog
from ..url import HostPort
from . import lightsock
from .resolver import Resolver
from .sockopt import connect_finish, connect_numeric, connect_start, tune_tcp, tune_udp


class DialError(OSError):
    """No target could be reached (message names them and why)."""


def family_of(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def sockaddr(ip: str, port: int) -> tuple[str, int]:
    return (ip, port)


class Attempt:
    """A TCP dial that :meth:`Dialer.start_tcp` began in the hub and a greenlet finishes:
    the targets in this dial's order, the first one's addresses (empty: not looked up yet),
    and the connect to the first address (under way with *err* EINPROGRESS/EINTR, or failed
    with *err* and no socket)."""

    __slots__ = ("err", "ips", "order", "sock")

    def __init__(self, order: list[HostPort], ips: list[str], sock: socket.socket | None,
                 err: int) -> None:
        self.order, self.ips, self.sock, self.err = order, ips, sock, err


class Dialer:
    """Dials TCP and UDP to the instance's targets."""

    def __init__(
        self,
        targets: tuple[HostPort, ...],
        resolver: Resolver,
        *,
        source_ip: str = "auto",
        tcp_timeout: float = 5.0,
        log: InstanceLog | None = None,
        events: Any = None,
    ) -> None:
        if not targets:
            raise ValueError("at least one target is required")
        self.targets = targets
        self.resolver = resolver
        self.source_ip = None if source_ip == "auto" else source_ip
        self.tcp_timeout = tcp_timeout
        self.log = log or InstanceLog("none")
        self.events = events  # npgevent.metrics.Events: counts dials that failed on every target
        self._rr = itertools.count()

    def _order(self) -> list[HostPort]:
        n = len(self.targets)
        if n == 1:
            return [self.targets[0]]
        start = next(self._rr) % n
        return [self.targets[(start + i) % n] for i in range(n)]

    def _bind_source(self, sock: socket.socket, family: int) -> None:
        if self.source_ip is None:
            return
        try:
            if family_of(self.source_ip) != family:
                raise OSError(errno.EAFNOSUPPORT, "address family mismatch")
            sock.bind((self.source_ip, 0))
        except OSError as exc:
            self.log.error("Dial address %s unusable (%s): falling back to auto",
                           self.source_ip, exc.strerror or exc)
            self.source_ip = None

    def dial_tcp(self, timeout: float | None = None,
                 attempt: Attempt | None = None) -> tuple[socket.socket, HostPort]:
        """Connect to the next target (with failover); return (socket, target).  With
        *attempt* (from :meth:`start_tcp`), go on from there: its connect first, then the rest
        of its order."""
        failures: list[str] = []
        timeout = timeout or self.tcp_timeout
        order = self._order() if attempt is None else attempt.order
        for n, target in enumerate(order):
            try:
                if n == 0 and attempt is not None:
                    return self._resume_tcp(target, attempt, timeout), target
                return self._connect_tcp(target, timeout), target
            except OSError as exc:
                failures.append("%s: %s" % (target, _reason(exc)))
        if self.events is not None:
            self.events.dial_failures += 1
        raise DialError("dial tcp failed: " + "; ".join(failures))

    def start_tcp(self) -> tuple[socket.socket, HostPort] | Attempt:
        """Start a dial without waiting, in a hub callback: (socket, target) when the first
        target in order connected at once (loopback, a target on this host), else an
        :class:`Attempt` for :meth:`dial_tcp` to finish in a greenlet (a connect under way or
        failed, or none when the target's address needs a lookup)."""
        order = self._order()
        target = order[0]
        ips = self.resolver.resolve_now(target.host)
        if not ips:
            return Attempt(order, [], None, 0)
        ip = ips[0]
        family = family_of(ip)
        try:
            sock = lightsock.tcp_socket(family)
        except OSError as exc:
            return Attempt(order, ips, None, exc.errno or errno.EIO)
        if self.source_ip is not None:
            self._bind_source(sock, family)
        err = connect_start(sock._sock, (ip, target.port))
        if not err:
            tune_tcp(sock)
            return sock, target
        if err in (errno.EINPROGRESS, errno.EINTR):
            return Attempt(order, ips, sock, err)
        sock.close()
        return Attempt(order, ips, None, err)

    def _connect_tcp(self, target: HostPort, timeout: float,
                     ips: list[str] | None = None) -> socket.socket:
        last: OSError | None = None
        for ip in self.resolver.resolve(target.host) if ips is None else ips:
            family = family_of(ip)
            sock = lightsock.tcp_socket(family)
            try:
                self._bind_source(sock, family)
                connect_numeric(sock, sockaddr(ip, target.port), timeout)
                tune_tcp(sock)
                return sock
            except OSError as exc:
                sock.close()
                last = exc
        assert last is not None
        raise last

    def _resume_tcp(self, target: HostPort, attempt: Attempt, timeout: float) -> socket.socket:
        """The first target of *attempt*: its connect, then the target's other addresses."""
        if not attempt.ips:  # nothing started: the address needed a lookup
            return self._connect_tcp(target, timeout)
        sock = attempt.sock
        if sock is not None:
            try:
                connect_finish(sock, attempt.err, timeout)
                tune_tcp(sock)
                return sock
            except BaseException as exc:
                sock.close()
                if not isinstance(exc, OSError) or len(attempt.ips) == 1:
                    raise
        elif len(attempt.ips) == 1:
            raise OSError(attempt.err, os.strerror(attempt.err))
        return self._connect_tcp(target, timeout, attempt.ips[1:])

    def dial_udp(self) -> tuple[socket.socket, HostPort]:
        """A connected UDP socket to the next target (with failover on resolution/bind)."""
        failures: list[str] = []
        for target in self._order():
            try:
                for ip in self.resolver.resolve(target.host):
                    family = family_of(ip)
                    sock = socket.socket(family, socket.SOCK_DGRAM)
                    try:
                        self._bind_source(sock, family)
                        sock.connect(sockaddr(ip, target.port))
                        tune_udp(sock)
                        return sock, target
                    except OSError:
                        sock.close()
                        raise
            except OSError as exc:
                failures.append("%s: %s" % (target, _reason(exc)))
        if self.events is not None:
            self.events.dial_failures += 1
        raise DialError("dial udp failed: " + "; ".join(failures))

    def probe_ms(self) -> int:
        """TCP connect time to the first reachable target in ms (0 if none): the single-end PING."""
        start = time.monotonic()
        try:
            sock, _ = self.dial_tcp()
        except OSError:
            return 0
        elapsed = int((time.monotonic() - start) * 1000)
        sock.close()
        return elapsed


def _reason(exc: OSError) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "i/o timeout"
    return exc.strerror or str(exc) or type(exc).__name__
