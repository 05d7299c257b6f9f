"""Task execution on a node daemon: what a node sees of an assigned task.

(The assignment protocol itself — acks, progress, results — is added by the
orchestrator issue; :class:`TaskRun` is the stable API nodes code against.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any


async def _discard(_chunk: Any) -> None:
    return None


@dataclass
class TaskRun:
    """One assigned task as a node sees it.

    * ``input`` is the validated JSON input of the task.
    * ``await run.partial(chunk)`` streams partial output (tokens, sentences).
    * Cancellation cancels the coroutine running :meth:`Node.execute`; code
      running in a thread polls ``run.cancel_flag.is_set()`` instead.
    * Raise :class:`daemon.errors.TaskError` to fail with a code and text;
      return a JSON-able value to succeed.
    """

    task_id: str
    capability: str
    input: Any
    user: str | None = None
    deadline: float | None = None  # wall clock (time.time()) by which it must end
    constraints: dict[str, Any] = field(default_factory=dict)
    emit_partial: Callable[[Any], Awaitable[None]] = _discard
    cancel_flag: threading.Event = field(default_factory=threading.Event)
    attempt: int = 1

    async def partial(self, chunk: Any) -> None:
        await self.emit_partial(chunk)

    def remaining(self) -> float | None:
        """Seconds left before the deadline (None: no deadline)."""
        return None if self.deadline is None else max(0.0, self.deadline - time.time())
