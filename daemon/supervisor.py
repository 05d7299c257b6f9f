"""Supervised tasks: a crashed node is logged with its traceback, reported, and
restarted with capped exponential backoff while the rest of the daemon runs on;
after :data:`MAX_IDENTICAL_FAILURES` identical failures in a row it is given up
(status ``failed``): a restart cannot fix what fails the same way every time.

A native crash (a signal) ends the whole process instead: :mod:`daemon.probe`
keeps that from costing more than its node."""

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
# The same error this many times in a row (each within HEALTHY_RUN): stop restarting.
MAX_IDENTICAL_FAILURES: Final = 5

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
    """Run ``factory()`` until it returns; restart it whenever it raises, until it
    has failed the same way :data:`MAX_IDENTICAL_FAILURES` times in a row."""
    failures = 0
    identical = 0
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
                failures = identical = 0
            error = f"{type(exc).__name__}: {exc}"[:300]
            identical = identical + 1 if error == job.error else 1
            job.error = error
            if identical >= MAX_IDENTICAL_FAILURES:
                job.status = "failed"
                job.error = f"gave up after {identical} identical failures: {error}"[:300]
                log.exception("%s failed %d times the same way: not restarted", job.name, identical)
                if on_change is not None:
                    await on_change(job)
                return
            delay = min(max_delay, initial_delay * 2**failures)
            failures += 1
            job.restarts += 1
            job.status = "restarting"
            log.exception("%s crashed (restart #%d in %.1fs)", job.name, job.restarts, delay)
            if on_change is not None:
                await on_change(job)
            await asyncio.sleep(delay)
        else:
            job.status = "stopped"
            return
