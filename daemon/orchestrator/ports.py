"""The scheduling core's ports: what it needs from the world, as protocols.

The MQTT service implements them for real (the bus, the loop's clock, the
journal); ``tests/test_scheduler.py`` with a fake clock and a recording sink.
"""

from __future__ import annotations

import time as _time
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from daemon.messages import Message
    from daemon.orchestrator.tasks import Task

T_contra = TypeVar("T_contra", bound=Hashable, contravariant=True)


class Clock(Protocol):
    def time(self) -> float:
        """Epoch seconds (deadlines travel between machines)."""

    def monotonic(self) -> float:
        """Seconds for durations."""


class Timers(Protocol[T_contra]):
    """Timeouts by the item (:class:`~daemon.timers.TimerWheel` is one)."""

    def add_in(self, item: T_contra, delay: float) -> int: ...

    def discard(self, item: T_contra, key: int | None) -> None: ...

    def close(self) -> None: ...


class Leader(Protocol):
    """Whether this orchestrator is the active one, and its epoch (fencing token):
    :class:`~daemon.orchestrator.ha.HighAvailability` is one."""

    active: bool
    epoch: int


class Sink(Protocol):
    """Everything the core does to the world."""

    def post(
        self,
        topic: str,
        message: Message,
        *,
        correlation_data: bytes | None = None,
        expiry: float | None = None,
    ) -> None:
        """Send a message (QoS 1, not retained) without waiting."""

    def hearing_since(self) -> float | None:
        """Since when (monotonic) reports could reach us; None: not connected."""

    def accepted(self, task: Task) -> None:
        """A new task: journal it (and replicate it to standbys)."""

    def assigned(self, task: Task) -> None:
        """The task went to ``task.node`` (attempt ``task.attempt``)."""

    def finished(self, task: Task, row: dict[str, Any]) -> None:
        """The task is final: out of the journal; ``row`` into the history."""


class SystemClock:
    @staticmethod
    def time() -> float:
        return _time.time()

    @staticmethod
    def monotonic() -> float:
        return _time.monotonic()
