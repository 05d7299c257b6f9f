"""A circuit breaker per peer and capability: automatic blacklisting.

closed → (``failure_threshold`` consecutive failures) → open for a cool-down
that doubles on every trip (capped) → half-open: one probe task at a time →
``probation_successes`` successes close it; a failure opens it again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from daemon.orchestrator.config import BreakerConfig

State = Literal["closed", "open", "half_open"]


@dataclass
class Breaker:
    config: BreakerConfig
    state: State = "closed"
    failures: int = 0
    trips: int = 0
    open_until: float = 0.0
    probation_ok: int = 0
    probing: bool = False

    def allows(self, now: float) -> bool:
        """May a task be assigned now?  Moves open → half-open when the cool-down ends."""
        if self.state == "open":
            if now < self.open_until:
                return False
            self.state = "half_open"
            self.probation_ok = 0
            self.probing = False
        if self.state == "half_open":
            return not self.probing
        return True

    def on_assign(self) -> None:
        if self.state == "half_open":
            self.probing = True

    def on_success(self) -> None:
        self.failures = 0
        if self.state == "half_open":
            self.probing = False
            self.probation_ok += 1
            if self.probation_ok >= self.config.probation_successes:
                self.state = "closed"
                self.trips = 0

    def on_failure(self, now: float) -> None:
        self.failures += 1
        if self.state == "half_open" or self.failures >= self.config.failure_threshold:
            self.trip(now)

    def trip(self, now: float) -> None:
        self.trips += 1
        cooldown = min(self.config.max_cooldown, self.config.cooldown * 2 ** (self.trips - 1))
        self.state = "open"
        self.open_until = now + cooldown
        self.failures = 0
        self.probing = False

    @property
    def probation(self) -> bool:
        return self.state == "half_open"
