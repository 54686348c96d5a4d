"""TCP sessions of a tunnel that start and run in hub callbacks: no greenlet per session.

On a plain-TCP pool (``tls=0``) without connection reuse, a TCP session is a pool connection
and a local socket relayed byte for byte, the relay single-end forwarding uses.  When nothing
in a session's start has to wait, it runs as a :class:`~npgevent.relay.tcphub.HubSession`:
read callbacks in the hub, an end callback that closes both sockets, tracked in the core's
``sessions`` like a job (a stop drains, then ends it).

- The **receiving side**, at accept (in the hub): an idle pool connection is there now, and
  the launch signal goes onto the control connection at once; what of it does not fit the
  socket goes out from a greenlet that holds the control write lock until it is written, so
  signals keep their order.
- The **dialling side**, at the launch signal (in the control reader): the named connection
  is idle here, a slot is free, and the target connects at once (:meth:`Dialer.start_tcp`).

Anything else (no idle connection yet, a dial that waits or fails over, a TLS or QUIC pool,
framed sessions between npgevent peers, ``read=``, ``rate=``, ``proxy=1``, debug logs) takes
the session job of :class:`~npgevent.cores.tunnel.TunnelCore` as before, with what was
already taken (the connection, the started dial).  The wire is the same either way.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from gevent import socket

from ..errors import CoreError
from ..net.dial import Attempt
from ..net.sockopt import can_write_nowait, format_addr, send_all, write_nowait
from ..pool.tcp import PoolConn
from ..protocol.signals import Launch, Signal
from ..relay import runners
from ..relay.stats import TCP_RX, TCP_TX
from ..relay.tcphub import HubSession

if TYPE_CHECKING:
    from .tunnel import TunnelCore


def _run(core: TunnelCore, conn: PoolConn, local: socket.socket, end: Any) -> None:
    HubSession(conn.stream, local, core.inst.traffic.bytes, TCP_RX, TCP_TX,
               core.opts.tcp_data_buf_size, end).start(core.sessions)


def start_user_tcp(core: TunnelCore, sock: socket.socket, addr: Any) -> bool:
    """Receiving side, at accept: True if the connection was taken over (see module doc)."""
    control = core.control
    if core.reuse or control is None or core._wlock.locked() or not can_write_nowait(control) \
            or not core.hub_sessions():
        return False
    conn = core.pool.take_any(0)  # an idle connection now, or None without waiting
    if conn is None:
        return False
    if type(conn.stream) is not socket.socket:
        core.sessions.spawn(core.listeners.run_tcp, core._user_tcp, sock, addr, conn)
        return True
    try:
        send_signal_nowait(core, Launch(False, format_addr(addr), conn.cid, False))
    except OSError as exc:
        core.fail(CoreError("control write failed: %s" % (exc.strerror or exc)))
        core.pool.finish(conn, None, trim=True)
        core.listeners.end_tcp(sock)
        return True
    _run(core, conn, sock, partial(_user_ended, core, conn, sock))
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
        core.fail(CoreError("control write failed: %s" % (exc.strerror or exc)))
    finally:
        core._wlock.release()


def _user_ended(core: TunnelCore, conn: PoolConn, sock: socket.socket, _err: BaseException | None) -> None:
    core.pool.finish(conn, None, trim=True)
    core.listeners.end_tcp(sock)


def start_launch(core: TunnelCore, sig: Launch) -> bool:
    """Dialling side, at a launch signal: True if the launch was taken over (see module doc)."""
    if sig.udp or sig.framed or sig.cid in core.verifying or not core.hub_sessions():
        return False
    conn = core.pool.claim(sig.cid)
    if conn is None:
        return False  # not here yet: the job waits for it
    slots = core.inst.slots
    if type(conn.stream) is not socket.socket or not slots.acquire_tcp():
        core.sessions.spawn(core._launch, sig, conn)  # refuses at the slot limit, as ever
        return True
    started = core.dialer.start_tcp()
    if isinstance(started, Attempt):
        slots.release_tcp()
        core.sessions.spawn(core._launch, sig, conn, started)
        return True
    target = started[0]
    _run(core, conn, target, partial(_launch_ended, core, conn, target))
    return True


def _launch_ended(core: TunnelCore, conn: PoolConn, target: socket.socket,
                  _err: BaseException | None) -> None:
    target.close()
    core.inst.slots.release_tcp()
    core.pool.finish(conn, None)
