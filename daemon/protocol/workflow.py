"""Workflow messages: run events, start/list/history requests and their replies.

* ``workflow/<name>/event`` carries :class:`WorkflowEvent` for every run of a
  workflow (``started``, one ``step`` per finished step, ``finished``, and
  ``skipped`` when a trigger is refused by a limit), so runs can be watched.
* ``workflows/request`` takes a :class:`WorkflowRequest` (MQTT 5 response
  topic + correlation data, or ``reply_to`` / ``correlation`` in the payload)
  and answers with a :class:`WorkflowReply`.

``StateReply`` (the answer to ``state/<key>/set``) lives in
:mod:`daemon.protocol.state`; it is re-exported here for older imports.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from daemon.messages import Message, now
from daemon.protocol.common import ErrorCode, Text
from daemon.protocol.state import StateReply
from daemon.protocol.task import ErrorInfo

__all__ = [
    "RunEventKind",
    "RunStatus",
    "StateReply",
    "StepStatus",
    "WorkflowEvent",
    "WorkflowReply",
    "WorkflowRequest",
]

RunEventKind = Literal["started", "step", "finished", "skipped"]
RunStatus = Literal["running", "done", "failed", "skipped", "cancelled"]
StepStatus = Literal["done", "failed", "skipped"]


class WorkflowEvent(Message):
    """One thing that happened to a workflow run (``workflow/<name>/event``)."""

    TYPE = "workflow.event"

    run_id: str
    workflow: str
    kind: RunEventKind
    status: RunStatus | StepStatus = "running"
    where: str = Field(default="orchestrator", description="orchestrator, or the node's id.")
    trigger: str | None = Field(default=None, description="What started it: event, mqtt, ...")
    step: str | None = Field(default=None, description="Step id (kind step).")
    step_kind: str | None = None
    attempts: int | None = None
    duration_ms: float | None = None
    error: ErrorInfo | None = None
    reason: str | None = Field(default=None, description="Why a trigger was skipped.")
    ts: float = Field(default_factory=now)


class WorkflowRequest(Message):
    """Start a workflow by hand, list workflows or read run history."""

    TYPE = "workflow.request"

    op: Literal["run", "list", "history"]
    name: str | None = Field(default=None, max_length=128)
    input: Any = None
    limit: int = Field(default=20, ge=1, le=1000)
    user: str | None = Field(default=None, max_length=64)
    token: str | None = Field(default=None, max_length=256, description="API token.")
    run_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="The run's id, chosen by the orchestrator when it hands a run to a node.",
    )
    reply_to: str | None = Field(default=None, max_length=512)
    correlation: str | None = Field(default=None, max_length=256)


class WorkflowReply(Message):
    TYPE = "workflow.reply"

    ok: bool
    result: Any = None
    error: Text | None = None
    code: ErrorCode | None = None
    correlation: str | None = Field(default=None, max_length=256)
