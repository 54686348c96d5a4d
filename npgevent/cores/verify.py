"""The TLS verify signal (``np://<peer addr>/<id>#v``): both ends log the fingerprint of the
certificate seen on one pool connection, which the server names once, from its second report
tick on (Go: 5-15 s after start).

The named connection stays open until the client has taken and closed it (at most
``NP_POOL_GET_TIMEOUT``), so the client's pool sweep cannot drop it as dead before the
signal arrives; it stays claimable by a launch meanwhile: a Go client may hand it to a user
before it reads the signal (docs/protocol-extensions.md, "Without negotiation").
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import gevent

from ..pool.tcp import IdlePool, PoolConn
from ..protocol.signals import Signal, Verify

if TYPE_CHECKING:
    from ..log import InstanceLog
    from ..relay.runners import Sessions
    from ..settings import Options


class VerifySignal:
    """The verify signal's two sides, mixed into :class:`~npgevent.cores.tunnel.TunnelCore`."""

    # what it uses of the core
    log: InstanceLog
    opts: Options
    pool: IdlePool
    sessions: Sessions
    peer: str
    npg: int
    flow: str
    verifying: dict[str, PoolConn]  # the sending side's named connection, until the peer closes it

    if TYPE_CHECKING:
        def send_signal(self, sig: Signal) -> None: ...

        def _take_named(self, sig: Verify, what: str) -> PoolConn | None: ...

    def _on_verify(self, sig: Verify, conn: PoolConn | None = None) -> None:
        """Client side of ``#v``: log the fingerprint of the certificate seen on *cid* (*conn*
        if the control loop already claimed it)."""
        self.log.debug("TLS verify signal: cid %s <- %s", sig.cid, self.peer)
        if conn is None:
            conn = self._take_named(sig, "TLS verify")
        if conn is None:
            return
        try:
            fp = getattr(conn.stream, "peer_fingerprint", lambda: "")()
            if fp:
                self.log.info("TLS cert verified: %s", fp)
            else:
                self.log.warn("TLS verify signal for %s, but that connection has no TLS", sig.cid)
        finally:
            conn.close()

    def send_verify(self, fingerprint: str) -> bool:
        """Server side of ``#v``: name an idle connection and log our certificate. True if sent.

        The connection is the one the receiving side is least likely to hand a user meanwhile:
        npgevent takes the newest for users (so here the oldest), a Go client the oldest (so
        here the newest, when the client receives: forward flow)."""
        conn = self.pool.take_clean(newest=self.npg == 0 and self.flow == "+")
        if conn is None:
            return False
        try:
            self.send_signal(Verify(self.peer, conn.cid))
        except BaseException:
            conn.close()
            raise
        self.log.info("TLS cert verified: %s", fingerprint)
        self.log.debug("TLS verify signal: cid %s -> %s", conn.cid, self.peer)
        # keep it open until the peer has taken and closed it, so the peer's pool sweep cannot
        # drop it as dead before the signal arrives; and keep it claimable by a launch
        self.verifying[conn.cid] = conn
        self.sessions.spawn(self._close_after_peer, conn)
        return True

    def _close_after_peer(self, conn: PoolConn) -> None:
        """Close the verify connection once the peer closed it, or after NP_POOL_GET_TIMEOUT.
        Nothing is read from it: if the peer gave it to a user instead, what arrives is that
        session's, and the launch signal naming it claims it from :attr:`verifying`."""
        deadline = time.monotonic() + self.opts.pool_get_timeout
        while self.verifying.get(conn.cid) is conn and time.monotonic() < deadline:
            if not conn.alive(strict=False):
                break  # closed by the peer, nothing waiting
            gevent.sleep(0.05)
        if self.verifying.get(conn.cid) is conn:
            del self.verifying[conn.cid]
            conn.close()
