"""TCP sessions of a tunnel that start and run in hub callbacks: no greenlet per session.

When nothing in a session's start has to wait, it runs without a handler: on a plain-TCP
pool (``tls=0``) as a :class:`~npgevent.relay.tcphub.HubSession` (a pool connection and a
local socket relayed byte for byte, the relay single-end forwarding uses), on a TLS pool
that npgevent peers reuse (framed sessions, extension level 2) as a
:class:`~npgevent.relay.framedsession.FramedSession`.  Either is read from hub callbacks, has
an end callback that finishes the session (the pool connection back or closed, the local
socket closed, the slot freed), and is tracked in the core's ``sessions`` like a job (a stop
drains, then ends it).

- The **receiving side**, at accept (in the hub): an idle pool connection is there now, and
  the launch signal goes onto the control connection at once; what of it does not fit the
  socket goes out from a greenlet that holds the control write lock until it is written, so
  signals keep their order.
- The **dialling side**, at the launch signal (in the control reader): the named connection
  is idle here, a slot is free, and the target connects at once (:meth:`Dialer.start_tcp`).
  A connection whose id is on its socket but not read yet counts as here: the receiving side
  hands out its newest connection, often the refill just made, and its id and the signal
  arrive in the same loop turn; the pool reads the ids due before deciding
  (:meth:`ClientPool.settle <npgevent.pool.tcp.ClientPool.settle>`).

Anything else (no idle connection yet, a dial that waits or fails over, a QUIC pool, a TLS
pool with a Go peer (its sessions are not framed), ``read=``, ``rate=``, ``proxy=1``, debug
logs) takes the session job of :class:`~npgevent.cores.tunnel.TunnelCore` as before, with
what was already taken (the connection, the started dial).  The wire is the same either way.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from gevent import socket

from ..net.dial import Attempt
from ..net.lightsock import PLAIN
from ..net.sockopt import can_write_nowait, format_addr, send_all, write_nowait
from ..pool.tcp import PoolConn
from ..protocol.signals import Launch, Signal
from ..relay import framedhub, runners
from ..relay.framedsession import FramedSession
from ..relay.stats import TCP_RX, TCP_TX
from ..relay.tcphub import HubSession

if TYPE_CHECKING:
    from .tunnel import TunnelCore


def _hub_ready(conn: PoolConn, framed: bool) -> bool:
    """Whether *conn*'s stream can carry a session from hub callbacks."""
    return framedhub.stream_usable(conn.stream) if framed else type(conn.stream) in PLAIN


def _run(core: TunnelCore, conn: PoolConn, local: socket.socket, framed: bool,
         done: Callable[[bytes | None], None]) -> None:
    """Start the session; *done* gets the bytes read past a framed session's end if *conn*
    may be reused (else, and always for a plain session, None)."""
    acct, bufsize = core.inst.traffic.bytes, core.opts.tcp_data_buf_size
    if framed:
        core.pool.lend(conn)
        FramedSession(conn.stream, local, acct, TCP_RX, TCP_TX, bufsize,
                      lambda _reason, leftover: done(leftover)).start(core.sessions)
    else:
        HubSession(conn.stream, local, acct, TCP_RX, TCP_TX, bufsize,
                   lambda _err: done(None)).start(core.sessions)


def start_user_tcp(core: TunnelCore, sock: socket.socket, addr: Any) -> bool:
    """Receiving side, at accept: True if the connection was taken over (see module doc)."""
    control = core.control
    if control is None or core._wlock.locked() or not can_write_nowait(control) or not core.hub_sessions():
        return False
    conn = core.pool.take_any(0)  # an idle connection now, or None without waiting
    if conn is None:
        return False
    framed = core.reuse
    if not _hub_ready(conn, framed):
        core.sessions.spawn(core.listeners.run_tcp, core._user_tcp, sock, addr, conn)
        return True
    try:
        send_signal_nowait(core, Launch(False, format_addr(addr), conn.cid, framed))
    except OSError as exc:
        core.fail(core.control_failed(exc))
        core.give_back(conn, None)
        core.listeners.end_tcp(sock)
        return True
    _run(core, conn, sock, framed, partial(_user_done, core, conn, sock))
    return True


def send_signal_nowait(core: TunnelCore, sig: Signal) -> None:
    """``core.send_signal`` from a hub callback, with the write lock free and a plain control
    socket: what does not fit now goes out from a greenlet that holds the lock meanwhile."""
    control, lock = core.control, core._wlock
    assert control is not None
    lock.acquire(blocking=False)
    try:
        line = core.signal_line(sig)
        sent = write_nowait(control, line) or 0
    except BaseException:
        lock.release()
        raise
    if sent == len(line):
        lock.release()
    else:
        runners.run(_send_rest, core, control, line[sent:])


def _send_rest(core: TunnelCore, control: socket.socket, rest: bytes) -> None:
    try:
        send_all(control, rest)
    except OSError as exc:
        core.fail(core.control_failed(exc))
    finally:
        core._wlock.release()


def _user_done(core: TunnelCore, conn: PoolConn, sock: socket.socket, leftover: bytes | None) -> None:
    core.give_back(conn, leftover)
    core.listeners.end_tcp(sock)


def start_launch(core: TunnelCore, sig: Launch) -> bool:
    """Dialling side, at a launch signal: True if the launch was taken over (see module doc)."""
    if sig.udp or sig.cid in core.verifying or not core.hub_sessions():
        return False
    conn = core.pool.claim(sig.cid)
    if conn is None:
        core.pool.settle()  # its id may be on its socket, unread
        conn = core.pool.claim(sig.cid)
        if conn is None:
            return False  # not here yet: the job waits for it
    slots = core.inst.slots
    if not _hub_ready(conn, sig.framed) or not slots.acquire_tcp():
        core.sessions.spawn(core._launch, sig, conn)  # refuses at the slot limit, as ever
        return True
    started = core.dialer.start_tcp()
    if isinstance(started, Attempt):
        slots.release_tcp()
        core.sessions.spawn(core._launch, sig, conn, started)
        return True
    target = started[0]
    _run(core, conn, target, sig.framed, partial(_launch_done, core, conn, target))
    return True


def _launch_done(core: TunnelCore, conn: PoolConn, target: socket.socket, leftover: bytes | None) -> None:
    target.close()
    core.inst.slots.release_tcp()
    core.pool.finish(conn, leftover)
