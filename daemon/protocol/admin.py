"""Orchestrator presence, statistics and sysop administration."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from daemon.messages import Message, now
from daemon.protocol.common import Attrs, ErrorCode, Name, Text

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
    # The active orchestrator's lease epoch (high availability): workers refuse
    # assignments of a lower one.  Here rather than only in the lease, which is
    # renewed every second: workers hear of it only when it changes.
    epoch: int = Field(default=0, ge=0)


class OrchestratorLease(Message):
    """``orchestrator/lease``, retained: which orchestrator instance is active, and
    its epoch (the fencing token its assignments carry).  The active renews it every
    ``renew_s``; the lease with the highest (epoch, holder) rules."""

    TYPE = "orchestrator.lease"

    holder: Name
    boot_id: Name
    epoch: int = Field(ge=0)
    state: Literal["held", "released"] = "held"
    renew_s: float = Field(default=1.0, gt=0, le=60)


class InstanceState(Message):
    """``orchestrator/instance/<name>/state``, retained: one orchestrator instance's
    role; the offline one is a standby's will."""

    TYPE = "orchestrator.instance"

    state: Literal["active", "standby", "offline"]
    boot_id: Name
    epoch: int = Field(default=0, ge=0)
    ts: float = Field(default_factory=now)


class JournalRecord(Message):
    """``orchestrator/journal``: one change of the active's task table, for standbys
    (only published while a standby is online)."""

    TYPE = "orchestrator.journal"

    epoch: int = Field(ge=0)
    op: Literal["accept", "assign", "final"]
    task_id: str = Field(max_length=128)
    doc: dict[str, Any] | None = None  # accept: the task as the journal keeps it
    node: Name | None = None  # assign
    attempt: int = Field(default=0, ge=0)


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
