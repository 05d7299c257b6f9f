"""What submitters are told, and what is remembered of it for resubmissions.

Every update to a submitter (and to the resubmissions watching the same task)
is numbered here (``seq``).  A client that lost its connection resubmits with
the same task id or idempotency key: it joins the live task, or gets the
remembered final at once (never a second run).  Both memories are bounded:
finals in number (``dedupe_size``) and in bytes of output (10,000 finals of
1 MiB echoes would otherwise hold 10 GB), idempotency keys in number.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Final

from daemon.messages import now
from daemon.orchestrator.identity import Refused
from daemon.orchestrator.ports import Sink
from daemon.orchestrator.tasks import Task
from daemon.protocol.task import TaskSubmit, TaskUpdate

# Outputs of finished tasks kept for resubmissions, at most (bytes).
FINISHED_MAX_BYTES: Final = 64 * 1024 * 1024

# A final update as remembered for duplicates: the update, or how to make it
# (a final the worker sent itself is built only when a duplicate asks for it).
RememberedFinal = TaskUpdate | functools.partial[TaskUpdate]


class Finals:
    def __init__(self, size: int, sink: Sink, max_bytes: int | None = None) -> None:
        self.size = size
        self.sink = sink
        self.max_bytes = FINISHED_MAX_BYTES if max_bytes is None else max_bytes
        # task id -> (user, final, output size)
        self.finished: OrderedDict[str, tuple[str, RememberedFinal, int]] = OrderedDict()
        self.bytes = 0
        self.idempotency: OrderedDict[tuple[str, str], str] = OrderedDict()

    def __len__(self) -> int:
        return len(self.finished)

    def join(
        self,
        tasks: Mapping[str, Task],
        submit: TaskSubmit,
        user: str,
        task_id: str,
        *,
        reply: str | None,
        corr: bytes | None,
    ) -> bool:
        """A resubmission (same task id or idempotency key) joins the live task of
        ``tasks`` it repeats, or gets its remembered final; True when it did.  Checked
        before admission so a cached result is never refused; :class:`Refused` when
        the task is another user's."""
        existing_id = task_id if submit.task_id else None
        if submit.idempotency_key:
            existing_id = self.keyed(user, submit.idempotency_key) or existing_id
        if existing_id is None:
            return False
        done = self.final(existing_id)
        if done is not None:
            owner, final = done
            if owner != user:
                raise Refused("conflict", f"task id {existing_id!r} belongs to another user")
            if reply:
                final = final.model_copy(update={"correlation": submit.correlation})
                self.sink.post(reply, final, correlation_data=corr)
            return True
        live = tasks.get(existing_id)
        if live is None:
            return False
        if live.user != user:
            raise Refused("conflict", f"task id {existing_id!r} belongs to another user")
        if reply:
            watcher = (reply, corr, submit.correlation)
            if watcher[:2] != (live.reply_topic, live.correlation) and watcher not in live.watchers:
                live.watchers.append(watcher)
        return True

    def reply(
        self, task: Task, status: str, *, send: bool = True, **fields: Any
    ) -> RememberedFinal:
        """Number and send an update; returns it, or (when nobody is to be told now:
        a final the worker already sent) how to make it, for a later duplicate."""
        task.seq += 1
        make = functools.partial(
            TaskUpdate,
            task_id=task.id,
            status=status,
            seq=task.seq,
            attempt=task.attempt or None,
            queue_ms=task.queue_ms if status in ("done", "failed", "cancelled") else None,
            correlation=task.submit.correlation,
            ts=now(),
            **fields,
        )
        if not ((task.reply_topic and send) or task.watchers):
            return make
        update = make()
        if task.reply_topic and send:
            self.sink.post(task.reply_topic, update, correlation_data=task.correlation)
        for topic, correlation, text in task.watchers:
            copy = update.model_copy(update={"correlation": text})
            self.sink.post(topic, copy, correlation_data=correlation)
        return update

    def remember(self, task_id: str, user: str, final: RememberedFinal, output: Any) -> int:
        """Keep ``final`` of ``user``'s task; returns the output's size (bytes)."""
        output_bytes = output_size(output)
        self.finished[task_id] = (user, final, output_bytes)
        self.bytes += output_bytes
        while len(self.finished) > self.size or (
            self.bytes > self.max_bytes and len(self.finished) > 1
        ):
            self.bytes -= self.finished.popitem(last=False)[1][2]
        return output_bytes

    def final(self, task_id: str) -> tuple[str, TaskUpdate] | None:
        """(owner, final update) of a remembered task."""
        done = self.finished.get(task_id)
        if done is None:
            return None
        owner, made, _ = done
        return owner, made if isinstance(made, TaskUpdate) else made()

    def keyed(self, user: str, key: str) -> str | None:
        """The task id ``user`` submitted with idempotency key ``key``."""
        return self.idempotency.get((user, key))

    def key(self, user: str, key: str, task_id: str) -> None:
        self.idempotency[(user, key)] = task_id
        while len(self.idempotency) > self.size:
            self.idempotency.popitem(last=False)


def output_size(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, str | bytes):
        return len(value)
    return len(repr(value))
