"""A task as the orchestrator tracks it, and the per-user limits."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from daemon.orchestrator.config import RoleLimits
from daemon.protocol.task import PRIORITY_RANK, TaskSubmit, WorkerReport

log = logging.getLogger(__name__)

# A task's life at the orchestrator: queued → assigned (a worker has it, unacknowledged)
# → running (acknowledged) → released (its slot given back: retried, or about to be
# final) → queued again or final.  Typed, so a misspelt state is a type error.
TaskState = Literal["queued", "assigned", "running", "released", "final"]


@dataclass(eq=False)
class Task:
    id: str
    submit: TaskSubmit
    user: str
    role: str
    deadline: float  # epoch seconds
    reply_topic: str | None
    correlation: bytes | None
    submitted: float = field(default_factory=time.time)
    submitted_mono: float = field(default_factory=time.monotonic)
    state: TaskState = "queued"
    attempt: int = 0
    node: str | None = None
    tried: set[str] = field(default_factory=set)
    seq: int = 0
    ticket: int | None = None  # set by FairQueue while queued
    # Resubmissions (same idempotency key or task id) that wait for this task too:
    # (reply topic, MQTT 5 correlation data, payload correlation).
    watchers: list[tuple[str, bytes | None, str | None]] = field(default_factory=list)
    assigned_mono: float | None = None
    started_mono: float | None = None
    queue_ms: float | None = None
    input_bytes: int = 0
    # Does a deadline passing count against the peer?  Not when the submitter chose a
    # deadline shorter than the realm's default (its own tiny timeout).
    peer_timeout: bool = True
    # Keys of this task's entries in the orchestrator's TimerWheels (None: not armed).
    deadline_key: int | None = None
    ack_key: int | None = None
    wait_key: int | None = None  # waiting for a capability no peer offers yet

    @property
    def capability(self) -> str:
        return self.submit.capability

    @property
    def rank(self) -> int:
        return PRIORITY_RANK[self.submit.priority]

    def history_row(
        self,
        outcome: str,
        error_code: str | None,
        *,
        run_ms: float | None,
        total_ms: float,
        output_bytes: int,
    ) -> dict[str, Any]:
        """The task's row in the history (the store's columns)."""
        return {
            "task_id": self.id,
            "user": self.user,
            "capability": self.capability,
            "node": self.node,
            "priority": self.submit.priority,
            "submitted": self.submitted,
            "queue_ms": self.queue_ms,
            "run_ms": run_ms,
            "total_ms": total_ms,
            "outcome": outcome,
            "error_code": error_code,
            "attempts": self.attempt,
            "input_bytes": self.input_bytes,
            "output_bytes": output_bytes,
        }

    def journal_doc(self) -> dict[str, Any]:
        return {
            "id": self.id,
            # The API token is never journalled: it proved who submitted, once.
            "submit": self.submit.model_dump(
                mode="json", exclude_none=True, exclude={"token", "reply_key"}
            ),
            "user": self.user,
            "role": self.role,
            "deadline": self.deadline,
            "peer_timeout": self.peer_timeout,
            "reply_topic": self.reply_topic,
            "correlation": self.correlation.hex() if self.correlation else None,
            "submitted": self.submitted,
        }


def task_from(doc: dict[str, Any]) -> Task | None:
    """A task from its journal document (this state_dir's, or a standby's mirror);
    None (logged) when unreadable."""
    try:
        submit = TaskSubmit.model_validate(doc["submit"])
        corr = doc.get("correlation")
        return Task(
            id=doc["id"],
            submit=submit,
            user=doc["user"],
            role=doc["role"],
            deadline=float(doc["deadline"]),
            reply_topic=doc.get("reply_topic"),
            correlation=bytes.fromhex(corr) if corr else None,
            submitted=float(doc.get("submitted", time.time())),
            peer_timeout=bool(doc.get("peer_timeout", True)),
        )
    except (KeyError, ValueError, TypeError, ValidationError) as exc:
        log.warning("dropping unreadable journal entry: %s", str(exc)[:200])
        return None


@dataclass
class Mirrored:
    """A task of the active's table, as a standby knows it (see ha.py)."""

    doc: dict[str, Any]
    node: str | None = None
    attempt: int = 0
    final: WorkerReport | None = None  # a worker's final the active had not yet made final


@dataclass
class TokenBucket:
    """Rate limit: ``rate`` tokens per second, up to ``burst`` saved."""

    rate: float
    burst: float
    tokens: float = -1.0
    stamp: float = 0.0

    def take(self, now: float) -> bool:
        if self.rate <= 0:
            return True
        if self.tokens < 0:
            self.tokens, self.stamp = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def bucket_for(limits: RoleLimits) -> TokenBucket:
    return TokenBucket(limits.rate_per_s, float(limits.burst))
