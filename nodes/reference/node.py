"""``echo`` and ``sleep``: capabilities without a model, for tests and benchmarks."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from daemon.errors import TaskError
from daemon.node import Node
from daemon.protocol.common import ERROR_CODE_RE
from daemon.protocol.node import Capability
from daemon.protocol.task import PEER_FAULT_CODES
from daemon.worker import TaskRun
from nodes.reference.config import ReferenceConfig

ERROR_CODE = re.compile(ERROR_CODE_RE)


class ReferenceNode(Node):
    type_name = "reference"
    config: ReferenceConfig

    def capabilities(self) -> list[Capability]:
        return [
            Capability(
                name=name,
                node=self.name,
                backend="builtin",
                max_concurrency=self.config.max_concurrency,
                streaming=name == "sleep",
            )
            for name in self.config.capabilities
        ]

    async def execute(self, task: TaskRun) -> Any:
        if self.config.fail_with:
            raise TaskError(self.config.fail_with, "this node is configured to fail (fail_with)")
        if task.capability == "echo":
            return task.input
        if task.capability == "sleep":
            return await self._sleep(task)
        raise TaskError("unavailable", f"reference node has no {task.capability!r}")

    async def _sleep(self, task: TaskRun) -> dict[str, Any]:
        """Simulated inference: wait ``seconds``; with ``steps`` stream that many partials."""
        spec = task.input if isinstance(task.input, dict) else {"seconds": task.input}
        seconds = spec.get("seconds", 0.0)
        steps = spec.get("steps", 0)
        fail = spec.get("fail")
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not 0 <= seconds <= self.config.max_sleep
        ):
            raise TaskError(
                "bad_input", f"'seconds' must be a number from 0 to {self.config.max_sleep:g}"
            )
        if not isinstance(steps, int) or not 0 <= steps <= 10_000:
            raise TaskError("bad_input", "'steps' must be an integer from 0 to 10000")
        if steps:
            for i in range(steps):
                await asyncio.sleep(seconds / steps)
                await task.partial({"step": i + 1})
        else:
            await asyncio.sleep(seconds)
        if fail:
            # A failure the input asked for is never the node's fault: a code that
            # would count against the peer's breaker becomes 'requested'.
            code = str(fail)[:64]
            chosen = code if ERROR_CODE.match(code) and code not in PEER_FAULT_CODES else None
            raise TaskError(
                chosen or "requested",
                f"failed on request (sleep input 'fail': {code})",
            )
        return {"slept": seconds, "node": self.ctx.node_id}
