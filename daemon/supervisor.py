"""Supervised tasks: a crashed node is logged with its traceback, reported, and
restarted with capped exponential backoff while the rest of the daemon runs on."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Literal

log = logging.getLogger(__name__)

# A node that ran this long before crashing gets its backoff reset.
HEALTHY_RUN: Final = 60.0

Status = Literal["starting", "running", "restarting", "failed", "stopped"]


@dataclass
class Supervised:
    """The state of one supervised job, as reported in health."""

    name: str
    status: Status = "starting"
    restarts: int = 0
    error: str | None = None


async def supervise(
    job: Supervised,
    factory: Callable[[], Awaitable[None]],
    *,
    initial_delay: float,
    max_delay: float,
    on_change: Callable[[Supervised], Awaitable[None]] | None = None,
) -> None:
    """Run ``factory()`` until it returns; restart it whenever it raises."""
    failures = 0
    while True:
        started = time.monotonic()
        job.status = "running"
        try:
            await factory()
        except asyncio.CancelledError:
            job.status = "stopped"
            raise
        except Exception as exc:
            if time.monotonic() - started > HEALTHY_RUN:
                failures = 0
            delay = min(max_delay, initial_delay * 2**failures)
            failures += 1
            job.restarts += 1
            job.status = "restarting"
            job.error = f"{type(exc).__name__}: {exc}"[:300]
            log.exception("%s crashed (restart #%d in %.1fs)", job.name, job.restarts, delay)
            if on_change is not None:
                await on_change(job)
            await asyncio.sleep(delay)
        else:
            job.status = "stopped"
            return
