"""The ``crashy`` node: a native backend loaded lazily, with a pure-Python fallback,
as the real node types load theirs (an ImportError is a missing backend)."""

from __future__ import annotations

import asyncio
import importlib
from types import ModuleType
from typing import Any

from daemon.node import Node
from daemon.protocol.node import Capability
from daemon.worker import TaskRun
from tests.crashy.config import BACKENDS, CrashyConfig


class CrashyNode(Node):
    type_name = "crashy"
    config: CrashyConfig
    native: ModuleType | None = None

    async def setup(self) -> None:
        self.native = None
        try:
            module = await asyncio.to_thread(importlib.import_module, BACKENDS[self.config.crash])
            await asyncio.to_thread(module.load)
        except ImportError as exc:
            if not self.config.fallback:
                raise
            self.log.warning("native backend unavailable (%s): the python one serves", exc)
        else:
            self.native = module

    def capabilities(self) -> list[Capability]:
        backend = "native" if self.native is not None else "python"
        return [Capability(name=self.config.capability, node=self.name, backend=backend)]

    async def execute(self, task: TaskRun) -> Any:
        if self.native is not None:
            return await asyncio.to_thread(self.native.infer, task.input)
        return {"backend": "python", "input": task.input}
