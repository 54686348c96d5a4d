"""Rate limiter and slots."""

import time

import gevent

from npgevent.relay.limit import RateLimiter, Slots


def test_rate_limiter_average_rate_across_greenlets():
    limiter = RateLimiter(200_000)  # bytes/s, burst 20 KB
    moved = [0]

    def worker():
        while True:
            limiter.take(4096)
            moved[0] += 4096

    jobs = [gevent.spawn(worker) for _ in range(4)]
    start = time.monotonic()
    gevent.sleep(1.0)
    elapsed = time.monotonic() - start
    gevent.killall(jobs)
    rate = moved[0] / elapsed
    assert 0.85 * 200_000 <= rate <= 1.2 * 200_000, rate


def test_from_mbps():
    assert RateLimiter.from_mbps(0) is None
    limiter = RateLimiter.from_mbps(8)
    assert limiter is not None and limiter.rate == 1_000_000


def test_slots_shared_between_tcp_and_udp():
    slots = Slots(2)
    assert slots.acquire_tcp() and slots.acquire_udp()
    assert not slots.acquire_tcp() and not slots.acquire_udp()
    slots.release_udp()
    assert slots.acquire_tcp()
    assert (slots.tcp, slots.udp) == (2, 0)
