"""Orchestrator presence, statistics and sysop administration."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from daemon.messages import Message, now
from daemon.protocol.common import Attrs, ErrorCode, Text

AdminOp = Literal[
    "users",
    "user_add",
    "user_remove",
    "ban",
    "unban",
    "drain",
    "undrain",
    "blacklist",
    "unblacklist",
    "cancel",
    "tasks",
    "history",
    "stats",
    "peers",
]


class OrchestratorState(Message):
    """``orchestrator/state``, retained; the offline one is the orchestrator's will."""

    TYPE = "orchestrator.state"

    state: Literal["online", "offline"]
    boot_id: str
    ts: float = Field(default_factory=now)
    version: str | None = None


class AdminRequest(Message):
    """A sysop request on ``orchestrator/admin`` (request/response)."""

    TYPE = "admin.request"

    op: AdminOp
    args: Attrs = Field(default_factory=dict)
    token: str | None = Field(default=None, max_length=256)
    user: str | None = Field(default=None, max_length=64)
    reply_to: str | None = Field(default=None, max_length=512)
    correlation: str | None = Field(default=None, max_length=256)


class AdminReply(Message):
    TYPE = "admin.reply"

    ok: bool
    result: Any = None
    error: Text | None = None
    code: ErrorCode | None = None
    correlation: str | None = Field(default=None, max_length=256)


class OrchestratorStats(Message):
    """``orchestrator/stats``, retained, every ``stats_interval`` seconds."""

    TYPE = "orchestrator.stats"

    ts: float = Field(default_factory=now)
    uptime_s: float
    peers_online: int
    queues: dict[str, int] = Field(default_factory=dict)
    running: dict[str, int] = Field(default_factory=dict)
    completed: dict[str, int] = Field(default_factory=dict)
    failed: dict[str, int] = Field(default_factory=dict)
    throughput_per_s: dict[str, float] = Field(default_factory=dict)
    latency_ms: dict[str, dict[str, float]] = Field(default_factory=dict)
    peers: dict[str, dict[str, Any]] = Field(default_factory=dict)
