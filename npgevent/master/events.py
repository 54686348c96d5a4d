"""Server-sent events: one producer, many subscribers, nobody waits for anybody.

Every event is encoded once into its SSE frame (``event: instance`` and a
one-line JSON ``data:``) and offered to each subscriber's bounded queue; a full
queue drops that event for that subscriber only (the producer never blocks, as
in NodePass).  A subscriber's stream starts with ``retry: 3000`` and one
``initial`` frame per record, sends a ``: keepalive`` comment after
:data:`KEEPALIVE` seconds of silence (so proxies keep idle streams open; Go
sends none), and ends after a ``shutdown`` frame.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator
from typing import Any

from gevent.queue import Empty, Queue

from .records import go_json

KEEPALIVE = 15.0
QUEUE_SIZE = 256
_END = object()


def rfc3339nano(ns: int | None = None) -> str:
    """Go's ``time.RFC3339Nano`` in local time: up to 9 fraction digits, zeros dropped."""
    ns = time.time_ns() if ns is None else ns
    secs, frac = divmod(ns, 1_000_000_000)
    dt = datetime.datetime.fromtimestamp(secs).astimezone()
    out = dt.strftime("%Y-%m-%dT%H:%M:%S")
    if frac:
        out += ("." + "%09d" % frac).rstrip("0")
    offset = dt.utcoffset() or datetime.timedelta(0)
    if not offset:
        return out + "Z"
    minutes = int(offset.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    minutes = abs(minutes)
    return out + "%s%02d:%02d" % (sign, minutes // 60, minutes % 60)


def frame(kind: str, instance: dict[str, Any] | None, logs: str = "") -> bytes:
    payload = go_json({"type": kind, "time": rfc3339nano(), "instance": instance, "logs": logs}).rstrip(b"\n")
    return b"event: instance\ndata: " + payload + b"\n\n"


class Subscriber:
    def __init__(self, hub: EventHub) -> None:
        self.hub = hub
        self.queue: Queue = Queue(QUEUE_SIZE)
        self.dropped = 0

    def stream(self, initial: list[dict[str, Any]], keepalive: float | None = None) -> Iterator[bytes]:
        """The WSGI body: frames until shutdown or the client goes away."""
        if keepalive is None:
            keepalive = KEEPALIVE
        try:
            yield b"retry: 3000\n\n"
            for inst in initial:
                yield frame("initial", inst)
            while True:
                try:
                    item = self.queue.get(timeout=keepalive)
                except Empty:
                    yield b": keepalive\n\n"
                    continue
                if item is _END:
                    return
                yield item
        finally:
            self.hub.unsubscribe(self)


class EventHub:
    def __init__(self) -> None:
        self.subscribers: set[Subscriber] = set()

    def subscribe(self) -> Subscriber:
        sub = Subscriber(self)
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    def publish(self, kind: str, instance: dict[str, Any] | None, logs: str = "") -> None:
        if not self.subscribers:
            return
        data = frame(kind, instance, logs)
        for sub in list(self.subscribers):
            if sub.queue.full():
                sub.dropped += 1
                continue
            sub.queue.put_nowait(data)

    def shutdown_all(self) -> None:
        """Send ``shutdown`` to every subscriber and end their streams."""
        data = frame("shutdown", None)
        for sub in list(self.subscribers):
            while sub.queue.qsize() > QUEUE_SIZE - 2:  # make room: shutdown must get through
                sub.queue.get_nowait()
            sub.queue.put_nowait(data)
            sub.queue.put_nowait(_END)
            self.subscribers.discard(sub)
