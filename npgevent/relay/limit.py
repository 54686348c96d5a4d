"""Shared limits of one instance: bandwidth (token bucket) and session slots."""

from __future__ import annotations

import time
from collections.abc import Callable

import gevent

MBIT = 125_000  # bytes per second per Mbit/s, as NodePass counts


class RateLimiter:
    """A token bucket in bytes/s shared by every connection of an instance.

    :meth:`take` charges *n* bytes after they moved and sleeps the caller (a
    greenlet) for as long as the bucket is in debt, so one greedy connection
    cannot starve the others for more than one chunk.  The burst is 100 ms worth
    of the rate (at least 16 KiB), which keeps a 3 s average within a few
    percent of the set rate.  :meth:`try_take` is the bucket for callers that drop what is
    over the rate instead of waiting (outside gevent too: the QUIC thread's admission).
    """

    __slots__ = ("_clock", "_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate_bytes: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = float(rate_bytes)
        self.burst = float(burst if burst is not None else max(16384.0, self.rate / 10))
        self._tokens = self.burst
        self._clock = clock
        self._stamp = clock()

    @classmethod
    def from_mbps(cls, mbps: int) -> RateLimiter | None:
        return cls(mbps * MBIT) if mbps > 0 else None

    def set_rate(self, rate_bytes: float) -> None:
        """A new rate for every connection sharing this bucket (SIGHUP)."""
        self.rate = float(rate_bytes)
        self.burst = max(16384.0, self.rate / 10)
        self._tokens = min(self._tokens, self.burst)

    @property
    def chunk(self) -> int:
        """Largest read worth doing at once under this limit."""
        return max(1024, int(self.burst))

    def _refill(self) -> float:
        now = self._clock()
        tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        return tokens

    def take(self, n: int) -> None:
        tokens = self._refill() - n
        self._tokens = tokens
        if tokens < 0:
            gevent.sleep(-tokens / self.rate)

    def try_take(self, n: float = 1.0) -> bool:
        """Charge *n* if the bucket holds it, else nothing; never waits."""
        tokens = self._refill()
        granted = tokens >= n
        self._tokens = tokens - n if granted else tokens
        return granted


class Slots:
    """Counts live TCP and UDP sessions against the instance's ``slot`` limit."""

    __slots__ = ("limit", "tcp", "udp")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.tcp = 0
        self.udp = 0

    def acquire_tcp(self) -> bool:
        if self.tcp + self.udp >= self.limit:
            return False
        self.tcp += 1
        return True

    def release_tcp(self) -> None:
        self.tcp -= 1

    def acquire_udp(self) -> bool:
        if self.tcp + self.udp >= self.limit:
            return False
        self.udp += 1
        return True

    def release_udp(self) -> None:
        self.udp -= 1
