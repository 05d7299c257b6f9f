"""Bounded detection: at most N detections in flight, the newest frame waits.

A camera produces frames faster than a (remote) detector may answer.  A
:class:`LatestSlot` runs at most ``max_inflight`` jobs at once and keeps at
most one waiting job: a newer frame replaces a waiting older one (counted in
``dropped``), so memory is bounded and results are never older than one
detection round trip.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

J = TypeVar("J")


class LatestSlot(Generic[J]):
    def __init__(self, max_inflight: int, run: Callable[[J], Awaitable[None]]) -> None:
        self.max_inflight = max_inflight
        self._run = run
        self._waiting: J | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.offered = 0
        self.started = 0
        self.dropped = 0
        self.failed = 0
        self.peak_inflight = 0

    @property
    def inflight(self) -> int:
        return len(self._tasks)

    @property
    def waiting(self) -> bool:
        return self._waiting is not None

    def offer(self, job: J) -> None:
        """Start ``job`` now if a slot is free, else let it wait (replacing a waiting one)."""
        self.offered += 1
        if len(self._tasks) < self.max_inflight:
            self._start(job)
            return
        if self._waiting is not None:
            self.dropped += 1
        self._waiting = job

    def _start(self, job: J) -> None:
        self.started += 1
        task = asyncio.create_task(self._wrap(job))
        self._tasks.add(task)
        self.peak_inflight = max(self.peak_inflight, len(self._tasks))

    async def _wrap(self, job: J) -> None:
        try:
            await self._run(job)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.failed += 1
            log.exception("detection job failed")
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._tasks.discard(task)
            if self._waiting is not None and len(self._tasks) < self.max_inflight:
                job, self._waiting = self._waiting, None
                self._start(job)

    async def close(self) -> None:
        self._waiting = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)
        self._tasks.clear()

    def stats(self) -> dict[str, int]:
        return {
            "offered": self.offered,
            "started": self.started,
            "dropped": self.dropped,
            "failed": self.failed,
            "inflight": self.inflight,
            "peak_inflight": self.peak_inflight,
        }
