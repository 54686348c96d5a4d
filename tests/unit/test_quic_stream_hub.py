"""A QUIC stream's chunks handed over in the hub (``QuicStream.serve_in_hub``), in memory: no
thread, the engine's batch applied by hand as the bridge would apply it."""

from __future__ import annotations

from typing import Any

import gevent
import pytest

from npgevent.quic.connection import CREDIT_STEP
from npgevent.quic.stream import QuicStream

pytestmark = pytest.mark.timeout(20)


class _Thread:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def call(self, fn: Any, *args: Any) -> bool:
        self.calls.append((fn.__name__, *args))
        return True

    def grant(self, *args: Any) -> None:  # named in the calls above
        raise AssertionError("run in the QUIC thread only")

    def close_stream(self, *args: Any) -> None:
        raise AssertionError("run in the QUIC thread only")


class _Engine:
    def __init__(self) -> None:
        self.thread = _Thread()
        self.streams: dict[tuple[int, int], QuicStream] = {}
        self.stream_count: dict[int, int] = {}


def _serving(deliver: Any) -> tuple[QuicStream, gevent.Greenlet]:
    stream = QuicStream(_Engine(), 1, 4)  # type: ignore[arg-type]
    server = gevent.spawn(stream.serve_in_hub, deliver)
    gevent.sleep(0)  # it runs up to its wait
    return stream, server


def _from_hub(stream: QuicStream, chunks: list[bytes], fin: bool = False) -> None:
    """Apply a batch in a hub callback, as the bridge's drain does."""
    done = gevent.event.Event()

    def apply() -> None:
        stream._feed(chunks, fin)
        done.set()

    gevent.get_hub().loop.run_callback(apply)
    assert done.wait(2)


def test_chunks_go_to_deliver_in_the_hub_in_order_without_waking_the_greenlet():
    got: list[tuple[bytes, bool]] = []
    hub = gevent.get_hub()
    stream = QuicStream(_Engine(), 1, 4)  # type: ignore[arg-type]
    stream._feed([b"early-1", b"early-2"], False)  # came before anyone served the stream
    switches: list[str] = []
    server = gevent.spawn(stream.serve_in_hub, lambda c: got.append((c, gevent.getcurrent() is hub)))
    gevent.sleep(0)
    assert [c for c, _ in got] == [b"early-1", b"early-2"]  # delivered by serve_in_hub itself
    import greenlet

    def trace(event: str, args: Any) -> None:
        if event in ("switch", "throw") and args[1] is server:
            switches.append(event)

    old = greenlet.settrace(trace)
    try:
        for n in range(20):
            _from_hub(stream, [b"later-%02d" % n])
    finally:
        greenlet.settrace(old)
    assert [c for c, _ in got[2:]] == [b"later-%02d" % n for n in range(20)]
    assert all(in_hub for _, in_hub in got[2:])
    assert switches == []  # the serving greenlet slept through all twenty
    assert not server.dead
    _from_hub(stream, [], fin=True)
    assert server.join(2) is None and server.successful() and server.value is None


def test_the_peer_finishing_ends_serving_after_its_last_chunk():
    got: list[bytes] = []
    stream, server = _serving(got.append)
    _from_hub(stream, [b"last words"], fin=True)
    server.join(2)
    assert server.successful() and got == [b"last words"]
    stream._feed([b"after"], False)  # nobody serves now: it waits for a reader as before
    assert stream._on_ready is None and stream._readable.is_set() and got == [b"last words"]


def test_a_reset_stream_raises_connection_reset_with_its_reason():
    stream, server = _serving(lambda c: None)
    stream._break("stream reset by the peer")
    server.join(2)
    assert isinstance(server.exception, ConnectionResetError)
    assert "stream reset by the peer" in str(server.exception)


def test_closing_the_stream_ends_serving():
    stream, server = _serving(lambda c: None)
    stream.close()
    server.join(2)
    assert isinstance(server.exception, ConnectionResetError)
    assert stream.engine.thread.calls[-1][0] == "close_stream"  # type: ignore[attr-defined]


def test_what_deliver_raises_ends_serving_with_it_and_nothing_more_is_delivered():
    got: list[bytes] = []

    def deliver(chunk: bytes) -> None:
        got.append(chunk)
        if chunk == b"bad":
            raise ValueError("cannot pass this on")

    stream, server = _serving(deliver)
    _from_hub(stream, [b"good", b"bad", b"unseen"])
    server.join(2)
    assert isinstance(server.exception, ValueError)
    assert got == [b"good", b"bad"]
    _from_hub(stream, [b"later"])
    assert got == [b"good", b"bad"]


def test_chunks_delivered_count_as_consumed_and_widen_the_peers_window():
    total = 0

    def deliver(chunk: bytes) -> None:
        nonlocal total
        total += len(chunk)

    stream, server = _serving(deliver)
    chunk = b"x" * 60000
    sent = 0
    while sent <= CREDIT_STEP:
        _from_hub(stream, [chunk])
        sent += len(chunk)
    assert total == sent and stream.consumed == sent
    grants = [c for c in stream.engine.thread.calls if c[0] == "grant"]  # type: ignore[attr-defined]
    assert grants == [("grant", 1, 4, sent)]  # once past CREDIT_STEP, with what was consumed
    server.kill()
    assert stream._on_ready is None  # a killed server (the session's idle watchdog) unhooks



def test_a_failed_serve_leaves_nothing_to_the_collector():
    """What deliver raised comes out of serve_in_hub without a reference cycle (its traceback
    holds serve's frame, so nothing in that frame may hold it): a peer making sessions fail
    as fast as it likes must not feed the collector."""
    from helpers import left_to_the_collector

    def deliver(chunk: bytes) -> None:
        raise ValueError("cannot pass this on")

    with left_to_the_collector() as ours:
        for _ in range(3):
            stream, server = _serving(deliver)
            _from_hub(stream, [b"boom"])
            server.join(2)
            assert isinstance(server.exception, ValueError)
            del stream, server
    # only the streams: what an earlier test's teardown let go of meanwhile is not this test's
    assert not [o for o in ours if type(o) is QuicStream], ours
