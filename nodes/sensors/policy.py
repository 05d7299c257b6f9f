"""When a sensor reading becomes an event: deadband, minimum interval, heartbeat.

A pure state machine (time is passed in) so the policy is tested without a clock.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class PublishPolicy:
    """Decides, reading by reading, whether to publish.

    * the first reading (and the first after a failure) is always published;
    * later ones only when they moved more than ``deadband`` from the last
      *published* value (so a slow drift still shows once it adds up), and
      not sooner than ``min_interval`` after the last event;
    * after ``heartbeat`` seconds without an event the current value is sent
      even if unchanged, so consumers can tell a quiet sensor from a dead one.
    """

    deadband: float
    min_interval: float
    heartbeat: float
    last_value: float | None = None
    last_time: float | None = None

    def should_publish(self, value: float, now: float) -> bool:
        if self.last_time is None or self.last_value is None:
            return True
        elapsed = now - self.last_time
        if elapsed >= self.heartbeat:
            return True
        if elapsed < self.min_interval:
            return False
        return abs(value - self.last_value) > self.deadband

    def published(self, value: float, now: float) -> None:
        self.last_value = value
        self.last_time = now

    def reset(self) -> None:
        """Forget the last event (after a failure the next good value is news)."""
        self.last_value = None
        self.last_time = None
