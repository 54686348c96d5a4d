"""Adaptive capacity and refill interval of the client's pool (pure: no I/O, no clock).

NodePass's rules (protocol.md section 4), applied after every refill round:

* interval: fewer than 20 % of ``capacity`` idle -> 100 ms faster (not below
  ``NP_MIN_POOL_INTERVAL``); more than 80 % idle -> 100 ms slower (not above
  ``NP_MAX_POOL_INTERVAL``);
* capacity: starts at ``min``; if the round had to create fewer than 20 % of
  ``capacity`` it shrinks by one (not below ``min``), more than 80 % grows by
  one (not above the server's ``max``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

STEP = 0.1


@dataclass
class Adaptive:
    min_capacity: int
    max_capacity: int
    min_interval: float
    max_interval: float
    capacity: int = field(init=False)
    interval: float = field(init=False)

    def __post_init__(self) -> None:
        self.max_capacity = max(1, self.max_capacity)
        self.min_capacity = max(1, min(self.min_capacity, self.max_capacity))
        self.max_interval = max(self.max_interval, self.min_interval)
        self.capacity = self.min_capacity
        self.interval = self.min_interval

    def need(self, idle: int, pending: int) -> int:
        """How many connections to open now."""
        return max(0, self.capacity - idle - pending)

    def update(self, idle: int, created: int) -> None:
        """Adjust after a round with *idle* connections left and *created* opened."""
        cap = self.capacity
        if idle < 0.2 * cap:
            self.interval = max(self.min_interval, round(self.interval - STEP, 6))
        elif idle > 0.8 * cap:
            self.interval = min(self.max_interval, round(self.interval + STEP, 6))
        ratio = created / cap
        if ratio < 0.2:
            self.capacity = max(self.min_capacity, cap - 1)
        elif ratio > 0.8:
            self.capacity = min(self.max_capacity, cap + 1)
