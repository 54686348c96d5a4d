"""Hand-off between the gevent hub and one native OS thread.

Ownership: the native thread owns its asyncio loop and every aioquic object;
the gevent side owns everything greenlets see (streams, events, pools).
Neither touches the other's objects: they exchange *calls*.

* gevent -> thread: :meth:`Bridge.to_thread` posts ``(fn, args)`` to the thread's
  loop (:meth:`NativeLoop.post <npgevent.quic.loop.NativeLoop.post>`): a deque the
  loop empties, in order, in its next iteration, before it waits again.  A byte is
  written to the loop's self-pipe only when the loop is waiting in ``epoll_wait``, once
  per wait: calls made while the thread is busy cost no wake-up at all.  The loop ends
  the iteration by sending what they queued.  It never blocks the hub.
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
        self.loop: Any = None  # the thread's NativeLoop, set by the thread once running
        self.closed = False

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
        if loop is None:
            return False
        return bool(loop.post(fn, args))

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
        self.closed = True
        self._watcher.stop()
        self._watcher.close()
