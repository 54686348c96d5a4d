"""Hand-off between the gevent hub and one native OS thread.

Ownership: the native thread owns its asyncio loop and every aioquic object;
the gevent side owns everything greenlets see (streams, events, pools).
Neither touches the other's objects: they exchange *calls*.

* gevent -> thread: :meth:`Bridge.to_thread` appends ``(fn, args)`` to another
  deque and, unless a run of that deque is already scheduled and has not started,
  schedules one on the thread's asyncio loop with ``call_soon_threadsafe`` (which
  writes a byte to the loop's self-pipe to wake it).  The run takes every call
  queued by then, in order, then calls :attr:`Bridge.after_calls` (the QUIC thread
  sends what they queued): calls made while the thread is busy cost one wake-up and
  one self-pipe write between them.  It never blocks the hub.
* thread -> gevent: :meth:`Bridge.to_gevent` appends ``(fn, args)`` to a deque
  (append/popleft are atomic in CPython) and sends the hub's ``async_``
  watcher, a libev/libuv wake-up that is safe to send from any thread.  The
  hub then drains the deque in one callback: many messages, one wake-up.
  Callbacks run in the hub, so they must not block or switch: they set gevent
  events and move data into greenlet-owned structures, nothing more.

The thread never waits for gevent and gevent never waits on a thread
primitive; each side waits only on its own loop.
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Callable
from typing import Any

import gevent


class Bridge:
    def __init__(self, hub: Any = None) -> None:
        self.hub = hub if hub is not None else gevent.get_hub()
        self._inbox: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = collections.deque()
        self._watcher = self.hub.loop.async_()
        self._watcher.start(self._drain)
        self.loop: Any = None  # the thread's asyncio loop, set by the thread once running
        self.closed = False
        self._outbox: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = collections.deque()
        self._outbox_armed = False
        self.after_calls: Callable[[], None] | None = None

    # -- called in the native thread --------------------------------------------
    def to_gevent(self, fn: Callable[..., Any], *args: Any) -> None:
        if self.closed:
            return
        self._inbox.append((fn, args))
        self._watcher.send()

    # -- called in gevent ------------------------------------------------------------
    def to_thread(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Schedule ``fn(*args)`` in the thread; False if the thread's loop is gone.  *fn* must
        not raise (:meth:`QuicThread.call <npgevent.quic.thread.QuicThread.call>` guards it):
        the calls queued behind it would wait for the next one."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return False
        self._outbox.append((fn, args))
        if self._outbox_armed:
            return True
        self._outbox_armed = True
        try:
            loop.call_soon_threadsafe(self._run_outbox)
        except RuntimeError:  # the loop closed meanwhile
            self._outbox_armed = False
            return False
        return True

    def _run_outbox(self) -> None:
        """In the thread: every call queued so far.  The flag is cleared first, so a call
        queued after this run has looked at the deque schedules a run of its own."""
        self._outbox_armed = False
        box = self._outbox
        while box:
            fn, args = box.popleft()
            fn(*args)
        after = self.after_calls
        if after is not None:
            after()

    def _drain(self) -> None:
        inbox = self._inbox
        while inbox:
            fn, args = inbox.popleft()
            try:
                fn(*args)
            except Exception:  # a bug in a callback must not take the hub down
                sys.excepthook(*sys.exc_info())

    def close(self) -> None:
        """Stop the watcher after a last drain (the thread must be gone or silent); calls
        queued for a thread that will not run them are dropped."""
        if self.closed:
            return
        self._drain()
        self._outbox.clear()
        self.closed = True
        self._watcher.stop()
        self._watcher.close()
