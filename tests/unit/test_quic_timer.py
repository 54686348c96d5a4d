"""NpProtocol's timer: one kept while aioquic's deadline moves later, a new one only when it
moves earlier, and aioquic's ``handle_timer`` run once the deadline current then is due."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from npgevent.quic.protocol import NpProtocol

pytestmark = pytest.mark.timeout(30)


class FakeQuic:
    def __init__(self) -> None:
        self.deadline: float | None = None
        self.handled: list[float] = []

    def datagrams_to_send(self, now: float) -> list[Any]:
        return []

    def get_timer(self) -> float | None:
        return self.deadline

    def handle_timer(self, now: float) -> None:
        self.handled.append(now)
        self.deadline = None

    def next_event(self) -> None:
        return None


class Owner:
    def _after_transmit(self, protocol: Any) -> None:
        pass


@pytest.fixture
def proto():
    loop = asyncio.new_event_loop()
    calls: list[float] = []
    real_call_at = loop.call_at

    def counting_call_at(when: float, callback: Any, *args: Any, **kw: Any) -> asyncio.TimerHandle:
        if getattr(callback, "__name__", "") == "_handle_timer":
            calls.append(when)
        return real_call_at(when, callback, *args, **kw)

    loop.call_at = counting_call_at  # type: ignore[method-assign]
    p: Any = NpProtocol.__new__(NpProtocol)
    p._loop, p._quic, p._transport, p.owner = loop, FakeQuic(), object(), Owner()
    p._timer, p._timer_at, p._transmit_task = None, None, None
    p._event_handler = None
    p.calls = calls
    try:
        yield p
    finally:
        loop.close()


def _run_for(loop: asyncio.AbstractEventLoop, seconds: float) -> None:
    loop.run_until_complete(asyncio.sleep(seconds))


def test_a_deadline_that_moves_later_keeps_one_timer_and_fires_once_due(proto):
    loop, quic = proto._loop, proto._quic
    start = loop.time()
    for i in range(50):  # the loss timer moving on with every packet sent
        quic.deadline = start + 0.02 + i * 0.001
        proto.transmit()
    assert len(proto.calls) == 1  # aioquic's own protocol makes 50
    _run_for(loop, 0.03)
    assert quic.handled == []  # fired at the first deadline: not due any more, set again
    assert len(proto.calls) == 2 and proto.calls[-1] == start + 0.02 + 49 * 0.001
    _run_for(loop, 0.06)
    assert len(quic.handled) == 1 and quic.handled[0] >= start + 0.069


def test_a_deadline_that_moves_earlier_gets_a_new_timer(proto):
    loop, quic = proto._loop, proto._quic
    start = loop.time()
    quic.deadline = start + 5.0  # the idle timeout
    proto.transmit()
    first = proto._timer
    quic.deadline = start + 0.01  # an ACK now due soon
    proto.transmit()
    assert first.cancelled() and len(proto.calls) == 2
    _run_for(loop, 0.05)
    assert len(quic.handled) == 1 and start + 0.01 <= quic.handled[0] < start + 1.0


def test_no_deadline_any_more_fires_nothing(proto):
    loop, quic = proto._loop, proto._quic
    quic.deadline = loop.time() + 0.01
    proto.transmit()
    quic.deadline = None
    proto.transmit()
    _run_for(loop, 0.05)
    assert quic.handled == [] and proto._timer is None
