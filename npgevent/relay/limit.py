"""Shared limits of one instance: bandwidth (token bucket) and session slots."""

from __future__ import annotations

import time

import gevent

MBIT = 125_000  # bytes per second per Mbit/s, as NodePass counts


class RateLimiter:
    """A token bucket in bytes/s shared by every connection of an instance.

    :meth:`take` charges *n* bytes after they moved and sleeps the caller (a
    greenlet) for as long as the bucket is in debt, so one greedy connection
    cannot starve the others for more than one chunk.  The burst is 100 ms worth
    of the rate (at least 16 KiB), which keeps a 3 s average within a few
    percent of the set rate.
    """

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate_bytes: float, burst: float | None = None) -> None:
        self.rate = float(rate_bytes)
        self.burst = float(burst if burst is not None else max(16384.0, self.rate / 10))
        self._tokens = self.burst
        self._stamp = time.monotonic()

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

    def take(self, n: int) -> None:
        now = time.monotonic()
        tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate) - n
        self._stamp = now
        self._tokens = tokens
        if tokens < 0:
            gevent.sleep(-tokens / self.rate)


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
