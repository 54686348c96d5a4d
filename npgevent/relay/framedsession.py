"""A framed session that no greenlet waits for.

:func:`~npgevent.relay.framed.relay_framed` is called by a session's handler, which waits
while the session's start runs in hub callbacks (:mod:`npgevent.relay.framedhub`) and then
runs the pumps.  A :class:`FramedSession` is started from a hub callback instead (a tunnel's
accept, or its control reader at a launch signal) and has no handler: the hub phase runs as
in ``relay_framed``, a session that ends there is finished in the hub, and one that the
pumps must carry on (bulk, a write that waits, an abort) goes to a worker greenlet
(:mod:`npgevent.relay.runners`) with each direction's state.  Either way *end* gets what
``relay_framed`` returns, why the session ended and the bytes read past it if the pool
connection may be reused, once nothing of the session can touch either stream.

It offers what :class:`~npgevent.relay.runners.Sessions` needs of a job (``kill``, and
``dead``, ``join``, ``owner`` from :class:`~npgevent.relay.runners.Detached`), so an
instance that stops drains or ends it like any other session; a kill leaves the pool
connection unusable (it is closed, as a killed handler's is).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gevent import socket
from greenlet import GreenletExit

from . import framed, framedhub, runners

#: called with why the session ended and the bytes read past it (None: close the connection)
End = Callable[[str, "bytes | None"], None]


class FramedSession(runners.Detached):
    """One framed session on *pool* (a TLS stream) and *local* (a plain gevent socket),
    ``relay_framed``'s accounting; only where :func:`~npgevent.relay.framedhub.usable`
    holds with no rate limit and no idle timeout."""

    def __init__(self, pool: Any, local: socket.socket, acct: list[int], rx: int, tx: int,
                 bufsize: int, end: End) -> None:
        self.pool, self.local = pool, local
        self.st, _, self.reader, chunk = framed.begin(pool, local, None, 0.0, bufsize)
        self.phase = framedhub.Phase(pool, local, self.st, self.reader, acct, rx, tx, chunk,
                                      self._phase_over)
        self.acct, self.rx, self.tx, self.chunk = acct, rx, tx, chunk
        super().__init__()
        self.end: End | None = end
        self.job: runners.Job | None = None  # the pumps, once the phase handed over
        self._pumped = False  # the pumps ran to their end (a job killed before it ran did not)

    def start(self, owner: runners.Sessions | None = None) -> None:
        """Start both directions' callbacks, listed in *owner* (a core's sessions) if given."""
        self.start_tracking(owner)
        self.phase.start()

    def kill(self, exception: type[BaseException] = GreenletExit, block: bool = True) -> None:
        """End the session with *exception* as its error (what a job's kill raises)."""
        if self.dead:
            return
        if self.job is not None:
            self.job.kill(exception, block=False)
        elif not self.phase.over:
            self.phase.end(exception())
        if block:
            self.join()

    def _phase_over(self) -> None:
        phase, st = self.phase, self.st
        if phase.error is not None:
            st.fail(phase.error)
        elif phase.up_left is not None or phase.down_left is not None:
            job = self.job = runners.run(self._pumps, phase.up_left, phase.down_left)
            job.owner = self  # told when the job ends, whether it ran or was killed first
            return
        self._finish()

    def _pumps(self, up_left: tuple[bytes, int] | None, down_left: bytes | None) -> None:
        try:
            framed.pumps(self.pool, self.local, self.st, self.reader, self.acct, self.rx, self.tx,
                         None, None, self.chunk, up_left, down_left)
        except BaseException as exc:  # killed: the connection can't be reused
            self.st.broke(exc)
            raise
        self._pumped = True

    def _ended(self, job: Any) -> None:  # the pumps' job ended (on its worker), run or not
        if not self._pumped:
            self.st.broke(GreenletExit())
        self._finish()

    def _finish(self) -> None:
        end, self.end = self.end, None
        try:
            reason, leftover = framed.outcome(self.pool, self.st, self.reader, 0.0)
            if end is not None:
                end(reason, leftover)
        finally:
            self.phase.over_cb = _nothing  # the phase and the session refer to each other
            self._over()


def _nothing() -> None:
    pass
