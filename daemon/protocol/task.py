"""The task protocol: submission, progress, assignment, worker reports, cancellation.

Client → orchestrator on ``task/submit`` (MQTT 5 response topic + correlation
data; MQTT 3.1.1 clients put ``reply_to`` / ``correlation`` in the payload).
The orchestrator answers on the response topic with :class:`TaskUpdate`
messages ending in exactly one final one (done / failed / cancelled).

Orchestrator → worker on ``node/<id>/task``: :class:`TaskAssign` and
:class:`TaskAbort`.  Worker → orchestrator on ``task/worker/<id>``:
:class:`WorkerReport`.
"""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import Field

from daemon.messages import Message, Part, now
from daemon.protocol.common import ErrorCode, Label, Name, Text

Priority = Literal["alarm", "interactive", "batch"]
PRIORITY_RANK: Final[dict[str, int]] = {"alarm": 0, "interactive": 1, "batch": 2}
CAPABILITY_RE: Final = r"^[a-z][a-z0-9_.-]{0,63}$"
TASK_ID_RE: Final = r"^[A-Za-z0-9_.:-]{1,64}$"
FINAL_STATUSES: Final = frozenset({"done", "failed", "cancelled"})
# Failure codes that count against the peer's breaker: the node itself broke.  Any
# other code (bad_input, a code the input asked for, ...) is the submitter's doing.
PEER_FAULT_CODES: Final = frozenset({"internal", "backend_error", "crashed", "unavailable"})

UpdateStatus = Literal["queued", "assigned", "started", "partial", "done", "failed", "cancelled"]


class Constraints(Part):
    """Where a task may run."""

    node: Name | None = Field(default=None, description="Pin to this node id.")
    prefer_local: bool = Field(default=False, description="Prefer the submitter's own node.")
    accelerator: bool = Field(default=False, description="Only nodes with an accelerator.")
    language: str | None = Field(
        default=None, max_length=64, description="Capability must list it."
    )
    backend: Name | None = None
    model: Label | None = None


class ErrorInfo(Part):
    code: ErrorCode
    message: Text


class TaskSubmit(Message):
    TYPE = "task.submit"

    capability: str = Field(pattern=CAPABILITY_RE)
    input: Any = None
    task_id: str | None = Field(default=None, pattern=TASK_ID_RE)
    priority: Priority = "interactive"
    timeout: float | None = Field(default=None, gt=0, le=86400, description="Seconds.")
    deadline: float | None = Field(default=None, description="Epoch seconds.")
    idempotency_key: str | None = Field(default=None, max_length=128)
    user: str | None = Field(default=None, max_length=64)
    token: str | None = Field(default=None, max_length=256)
    origin: Name | None = Field(default=None, description="Submitting node id.")
    constraints: Constraints = Field(default_factory=Constraints)
    stream: bool = Field(default=True, description="Relay partial output.")
    progress: bool = Field(default=False, description="Send queued/assigned/started too.")
    reply_key: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]{16,64}$",
        description=(
            "A secret the submitter chose: the orchestrator hands it only to the worker "
            "it assigns, which puts it in a direct final; the submitter drops a direct "
            "final without it. Needed for direct replies (see direct)."
        ),
    )
    direct: bool = Field(
        default=False,
        description=(
            "Let the worker send a non-streamed 'done' straight to the reply topic (one hop "
            "less). In a rare race (cancel, deadline or reassignment just as the task ends) "
            "a second final may follow for the same task id: the first one counts."
        ),
    )
    reply_to: str | None = Field(
        default=None, max_length=512, description="MQTT 3.1.1: reply topic."
    )
    correlation: str | None = Field(default=None, max_length=256)


class TaskUpdate(Message):
    TYPE = "task.update"

    task_id: str = Field(pattern=TASK_ID_RE)
    status: UpdateStatus
    seq: int = 0
    position: int | None = None
    waiting: str | None = Field(
        default=None,
        max_length=200,
        description="Why a queued task waits with no peer to take it (the realm is starting).",
    )
    node: Name | None = None
    attempt: int | None = None
    output: Any = None
    error: ErrorInfo | None = None
    queue_ms: float | None = None
    run_ms: float | None = None
    correlation: str | None = Field(default=None, max_length=256)
    key: str | None = Field(
        default=None,
        max_length=64,
        description="The submitter's reply_key: only in a final a worker sent directly.",
    )
    ts: float = Field(default_factory=now)


class TaskCancel(Message):
    """Cancel a task: by its submitter or by a sysop (on ``task/control``)."""

    TYPE = "task.cancel"

    task_id: str = Field(pattern=TASK_ID_RE)
    user: str | None = Field(default=None, max_length=64)
    token: str | None = Field(default=None, max_length=256)
    reason: str | None = Field(default=None, max_length=200)


class DirectReply(Part):
    """Where a worker sends the final ``done`` itself (see ``TaskSubmit.direct``)."""

    topic: str = Field(max_length=512)
    key: str = Field(max_length=64, description="The submitter's reply_key (TaskUpdate.key).")
    correlation_data: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{0,512}$", description="MQTT 5 correlation, hex."
    )
    correlation: str | None = Field(default=None, max_length=256)  # MQTT 3.1.1 clients
    seq: int = Field(ge=0, description="The task's last update seq; the final is seq + 1.")
    queue_ms: float | None = None


class TaskAssign(Message):
    TYPE = "task.assign"

    task_id: str = Field(pattern=TASK_ID_RE)
    attempt: int = Field(ge=1)
    capability: str = Field(pattern=CAPABILITY_RE)
    input: Any = None
    deadline: float | None = None
    user: str | None = Field(default=None, max_length=128)
    stream: bool = True
    constraints: Constraints = Field(default_factory=Constraints)
    reply: DirectReply | None = None
    # The assigning orchestrator's lease epoch (high availability): a worker that has
    # seen a higher one refuses the assignment ("stale_epoch").
    epoch: int | None = Field(default=None, ge=0)


class TaskAbort(Message):
    TYPE = "task.abort"

    task_id: str = Field(pattern=TASK_ID_RE)
    attempt: int | None = None
    reason: str = Field(default="cancelled", max_length=200)


WorkerStatus = Literal["started", "partial", "done", "failed", "rejected"]


class WorkerReport(Message):
    """What a worker says about an assignment.

    ``started`` acknowledges it; ``rejected`` hands it back (busy, shutting
    down, capability gone) so it is assigned elsewhere.
    """

    TYPE = "task.report"

    task_id: str = Field(pattern=TASK_ID_RE)
    attempt: int = Field(ge=1)
    status: WorkerStatus
    seq: int = Field(default=0, ge=0)
    output: Any = None
    error: ErrorInfo | None = None
    run_ms: float | None = None
    replied: bool = Field(default=False, description="'done' already sent to the submitter.")
