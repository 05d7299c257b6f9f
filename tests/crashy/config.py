"""Configuration of the test-only ``crashy`` node type."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from nodes.base import NodeConfigBase

Crash = Literal["none", "import", "load", "task"]
BACKENDS: dict[str, str] = {
    "none": "tests.crashy_backends.healthy",
    "import": "tests.crashy_backends.on_import",
    "load": "tests.crashy_backends.on_load",
    "task": "tests.crashy_backends.on_task",
}


class CrashyConfig(NodeConfigBase):
    type: Literal["crashy"] = "crashy"
    crash: Crash = Field(default="none", description="When the native backend segfaults.")
    capability: str = Field(default="crashy", description="The capability it advertises.")
    fallback: bool = Field(
        default=True, description="Without the native backend, run the pure-Python one."
    )
