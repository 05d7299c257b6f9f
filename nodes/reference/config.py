"""Configuration of the reference node."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from nodes.base import NodeConfigBase

RefCapability = Literal["echo", "sleep"]
ALL_CAPABILITIES: tuple[RefCapability, ...] = ("echo", "sleep")


class ReferenceConfig(NodeConfigBase):
    """``echo`` returns its input; ``sleep`` waits ``input.seconds`` (simulated inference)."""

    type: Literal["reference"] = "reference"
    capabilities: list[RefCapability] = Field(default_factory=lambda: list(ALL_CAPABILITIES))
    max_concurrency: int = Field(default=16, ge=1, description="Tasks run at once per capability.")
    max_sleep: float = Field(default=60.0, gt=0, description="Longest accepted sleep (s).")
    fail_with: str | None = Field(
        default=None,
        pattern=r"^[a-z][a-z0-9_]{0,63}$",
        description="Fail every task with this error code (a broken node, for tests).",
    )
