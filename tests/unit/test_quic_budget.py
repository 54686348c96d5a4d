"""The admission's budget of connection-opening packets (npgevent.quic.admission), in memory."""

from __future__ import annotations

import pytest

from npgevent.quic.admission import long_header_dcid
from npgevent.relay.limit import RateLimiter

pytestmark = pytest.mark.timeout(10)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_budget_grants_a_burst_then_its_rate():
    clock = Clock()
    budget = RateLimiter(10, burst=10, clock=clock)  # the admission's budget, at 10 a second
    assert sum(budget.try_take() for _ in range(50)) == 10  # the burst
    assert not budget.try_take()
    clock.now += 0.5
    assert sum(budget.try_take() for _ in range(50)) == 5  # half a second at 10 a second
    clock.now += 60
    assert sum(budget.try_take() for _ in range(50)) == 10  # idle time never saves more than a burst


def test_the_destination_connection_id_of_a_long_header():
    packet = b"\xc3\x00\x00\x00\x01\x08" + bytes(range(8)) + b"\x08" + b"s" * 8 + b"\x00" * 20
    assert long_header_dcid(packet) == bytes(range(8))
    assert long_header_dcid(b"\xc3\x00\x00\x00\x01\x00") == b""  # a zero-length id
    for short in (b"", b"\xc3", b"\xc3\x00\x00\x00\x01", b"\xc3\x00\x00\x00\x01\x08abc"):
        assert long_header_dcid(short) is None  # too short to hold the id it announces
