"""Many per-task timeouts with one event-loop timer per tick, not one per task.

In the orchestrator every active task has a deadline and every assignment an
acknowledgement timeout; in a worker every running task has its deadline.  A
loop timer per task (``call_later`` on start, ``cancel`` at the end) costs a
handle, a heap push and, since nearly all are cancelled, the loop's periodic
clean-up of its heap; at thousands of tasks a second that is measurable.
:class:`TimerWheel` groups the timeouts by tick instead: adding or removing
one is a dict operation, and each tick in use has one loop timer.  A timeout
fires up to one tick late, never early.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Hashable
from typing import Final, Generic, TypeVar

# Timeout granularity (s): deadlines and acknowledgement timeouts are seconds
# long, so 50 ms late is immaterial, and at most 20 loop timers a second remain.
TICK: Final = 0.05

T = TypeVar("T", bound=Hashable)

log = logging.getLogger(__name__)


class TimerWheel(Generic[T]):
    """Call ``fire(item)`` once an item's time (loop clock) has passed, unless discarded."""

    def __init__(self, fire: Callable[[T], None], tick: float = TICK) -> None:
        self._fire = fire
        self.tick = tick
        self._buckets: dict[int, dict[T, None]] = {}
        self._handles: dict[int, asyncio.TimerHandle] = {}

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def add(self, item: T, when: float) -> int:
        """Arm ``item`` for loop time ``when``; returns the key :meth:`discard` needs."""
        key = math.ceil(when / self.tick)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = {}
            loop = asyncio.get_running_loop()
            self._handles[key] = loop.call_at(key * self.tick, self._expire, key)
        bucket[item] = None
        return key

    def add_in(self, item: T, delay: float) -> int:
        return self.add(item, asyncio.get_running_loop().time() + max(0.0, delay))

    def discard(self, item: T, key: int | None) -> None:
        if key is not None:
            bucket = self._buckets.get(key)
            if bucket is not None:
                bucket.pop(item, None)

    def _expire(self, key: int) -> None:
        self._handles.pop(key, None)
        bucket = self._buckets.pop(key, None)
        for item in bucket or ():
            try:
                self._fire(item)
            except Exception:  # one failing callback must not drop the rest of its tick
                log.exception("timeout handler failed for %r", item)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.cancel()
        self._handles.clear()
        self._buckets.clear()
