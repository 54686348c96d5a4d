"""Who holds a tunnel server's control slot.

**First claim** (the handshake phase): attempts on the tunnel port run
concurrently, each with its own ``NP_HANDSHAKE_TIMEOUT``, at most
:data:`HANDSHAKES_PER_IP` per address and :data:`HANDSHAKES` in all; unlike
Go, a failed attempt makes nobody wait.  The first attempt to succeed becomes
the control connection, the rest are closed.

**Takeover** (``auth=1`` only, while the slot is held by a peer that did not
authenticate: a Go-style handshake): a peer that proves the key takes the slot
over, and the unauthenticated holder is dropped (logged).  Go-style handshakes
never take a held slot.  After the handshake every connection to the tunnel
port is a pool connection, so a challenger is told apart from one by:

* its source address: anything but the control connection's IP (all TCP
  connections, when the pool is QUIC);
* from the control connection's IP, at TLS code 1/2: its first byte, which for
  a pool connection opens a TLS record (0x16) and for a handshake is text.

At TLS code 0 a pool connection from the control IP sends nothing before the
server writes its id, so a challenger from that same IP (for example behind
the same NAT) can't be told apart: it gets a pool id and its handshake fails.
Challengers fall under the same per-address and total caps.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gevent
from gevent import socket
from gevent.event import AsyncResult
from gevent.pool import Group

from ..errors import CoreError
from ..log import ERROR, WARN
from ..net import handshake
from ..net.handshake import HandshakeError
from ..net.sockopt import format_addr, unmap
from ..protocol.handshake import Reply

if TYPE_CHECKING:
    from .server import ServerCore

HANDSHAKES_PER_IP = 8  # handshake attempts open at once from one address
HANDSHAKES = 64  # ... and in all
TLS_RECORD = 0x16  # first byte of a TLS handshake record


class ControlSlot:
    """The server's handshake attempts, first claim and takeovers (see module docstring)."""

    def __init__(self, core: ServerCore) -> None:
        self.core, self.log, self.opts = core, core.log, core.opts
        self.per_ip: collections.Counter[str] = collections.Counter()
        self.attempts = Group()
        self.claimer = 0  # id() of the socket whose attempt holds (or is taking) the slot
        self.won: AsyncResult = AsyncResult()
        self.taking = False  # a takeover is between its claim and its last line

    # -- caps --------------------------------------------------------------------------
    def _enter(self, addr: Any) -> str | None:
        """Count an attempt from *addr*: its IP, or None (logged) when a cap is reached."""
        ip = unmap(addr[0])
        if self.per_ip[ip] >= HANDSHAKES_PER_IP or len(self.attempts) >= HANDSHAKES:
            self.log.limited(WARN, "handshake-busy", "tunnelHandshake: %s refused: %d handshakes open "
                             "from that address, %d in all" % (format_addr(addr), self.per_ip[ip],
                                                               len(self.attempts)))
            return None
        self.per_ip[ip] += 1
        return ip

    def _leave(self, ip: str) -> None:
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]

    # -- first claim -------------------------------------------------------------------
    def first(self, listener: socket.socket) -> tuple[socket.socket, Any, handshake.Outcome]:
        """Accept attempts until one wins the slot; return its socket, address and outcome."""

        def accept_loop() -> None:
            while True:
                try:
                    sock, addr = listener.accept()
                except OSError:  # the listener was closed: the core is going away
                    return
                ip = self._enter(addr)
                if ip is None:
                    sock.close()
                    continue
                self.attempts.spawn(self._attempt, sock, addr, ip)

        acceptor = gevent.spawn(accept_loop)
        try:
            result: tuple[socket.socket, Any, handshake.Outcome] = self.won.get()
        finally:
            acceptor.kill(block=True)
            self.attempts.kill(block=False)
        return result

    def _attempt(self, sock: socket.socket, addr: Any, ip: str) -> None:
        won = False
        try:
            outcome = self._serve(sock, ip, self.opts.auth, lambda reply: self._claim(sock, ip, reply))
            self.won.set((sock, addr, outcome))
            won = True
        except (HandshakeError, CoreError, OSError) as exc:
            why = _why(exc)
            if self.claimer == id(sock):  # failed after taking the slot: start over
                self.won.set_exception(CoreError("tunnelHandshake: %s: %s" % (why, format_addr(addr))))
            refused = isinstance(exc, HandshakeError) and exc.refused
            self.core.inst.events.failure(failure_kind(why, refused))
            # one rate-limited line per kind (as Go words them: access denied, timeout, ...)
            self.log.limited(ERROR if refused else WARN, "handshake:" + why.split(":")[0],
                             "tunnelHandshake: %s: %s" % (why, format_addr(addr)))
        finally:
            self._leave(ip)
            if not won:
                sock.close()

    def _serve(self, sock: socket.socket, ip: str, auth: str,
               claim: Callable[[Reply], bool]) -> handshake.Outcome:
        core = self.core
        with gevent.Timeout(self.opts.handshake_timeout, HandshakeError("handshake timeout")):
            return handshake.serve(sock, core.key, auth, core.reply_for, core.fingerprint(), claim)

    def _claim(self, sock: socket.socket, ip: str, reply: Reply) -> bool:
        if self.claimer:
            return False
        self.claimer = id(sock)
        self.core.on_claim(ip, reply)
        return True

    # -- takeover ----------------------------------------------------------------------
    def open_to_takeover(self) -> bool:
        return self.opts.auth == "1" and self.core.cipher is None and self.won.ready()

    def is_challenger(self, sock: socket.socket, ip: str) -> bool:
        """Whether a connection to the tunnel port in the pool phase is a handshake attempt
        (see module docstring).  Called only while :meth:`open_to_takeover`."""
        core = self.core
        if core.engine is not None or ip != core.peer_ip:
            return True
        if core.tls is None:
            return False  # code 0: a pool connection from the control IP says nothing first
        sock.settimeout(self.opts.handshake_timeout)
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except (OSError, socket.timeout):
            return False  # a pool connection that never started TLS: the TLS handshake drops it
        finally:
            sock.settimeout(None)
        return bool(first) and first[0] != TLS_RECORD

    def challenge(self, sock: socket.socket, addr: Any) -> bool:
        """Serve a challenger: it takes the slot over only by proving the key.  True when it
        did (the socket is now the control connection: keep it open)."""
        ip = self._enter(addr)
        if ip is None:
            return False
        me = gevent.getcurrent()
        self.attempts.add(me)  # counts towards the total cap while it runs
        claimed = False

        def claim(reply: Reply) -> bool:
            nonlocal claimed
            if self.taking or self.core.cipher is not None:
                return False
            self.taking = claimed = True
            self.core.on_claim(ip, reply)
            return True

        try:
            # auth "2": only a peer that proves the key; a Go-style hello gets no reply at all
            outcome = self._serve(sock, ip, "2", claim)
        except (HandshakeError, CoreError, OSError) as exc:
            self.core.inst.events.failure(failure_kind(_why(exc), True))
            if claimed:  # failed after claiming (QUIC admits the new address): start over
                self.core.fail(CoreError("tunnel takeover by %s failed: %s" % (format_addr(addr), _why(exc))))
            self.log.limited(WARN, "takeover", "Tunnel control slot held by %s: %s refused: %s"
                             % (self.core.peer, format_addr(addr), _why(exc)))
            return False
        finally:
            self.taking = False
            self.attempts.discard(me)
            self._leave(ip)
        self.core.take_over(sock, addr, outcome)
        return True

    def close(self) -> None:
        self.attempts.kill(block=False)


def failure_kind(why: str, refused: bool) -> str:
    """The metrics' kind of a failed handshake: the key or the auth policy ("auth"), else
    a broken, slow or malformed attempt ("handshake")."""
    return "auth" if refused or "access denied" in why else "handshake"


def _why(exc: BaseException) -> str:
    return (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc)
