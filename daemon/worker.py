"""Task execution on a node daemon.

:class:`TaskRun` is what a node sees of an assigned task (the API nodes code
against); :class:`Worker` speaks the assignment protocol with the orchestrator.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from daemon import topics
from daemon.bus import Bus, Inbound
from daemon.errors import MessageError, TaskError
from daemon.messages import decode, decode_any
from daemon.protocol.admin import OrchestratorState
from daemon.protocol.common import ERROR_CODE_RE
from daemon.protocol.task import (
    DirectReply,
    ErrorInfo,
    TaskAbort,
    TaskAssign,
    TaskUpdate,
    WorkerReport,
)
from daemon.timers import TimerWheel

log = logging.getLogger(__name__)


async def _discard(_chunk: Any) -> None:
    return None


@dataclass
class TaskRun:
    """One assigned task as a node sees it.

    * ``input`` is the validated JSON input of the task.
    * ``await run.partial(chunk)`` streams partial output (tokens, sentences).
    * Cancellation cancels the coroutine running :meth:`Node.execute`; code
      running in a thread polls ``run.cancel_flag.is_set()`` instead.
    * Raise :class:`daemon.errors.TaskError` to fail with a code and text;
      return a JSON-able value to succeed.
    """

    task_id: str
    capability: str
    input: Any
    user: str | None = None
    deadline: float | None = None  # wall clock (time.time()) by which it must end
    constraints: dict[str, Any] = field(default_factory=dict)
    emit_partial: Callable[[Any], Awaitable[None]] = _discard
    cancel_flag: threading.Event = field(default_factory=threading.Event)
    attempt: int = 1
    reply: DirectReply | None = None  # where to send 'done' directly (orchestrator's choice)
    partials: int = 0  # partial outputs emitted so far

    async def partial(self, chunk: Any) -> None:
        self.partials += 1
        await self.emit_partial(chunk)

    def remaining(self) -> float | None:
        """Seconds left before the deadline (None: no deadline)."""
        return None if self.deadline is None else max(0.0, self.deadline - time.time())


M = TypeVar("M", bound=BaseModel)


def task_input(model: type[M], data: Any, what: str = "input") -> M:
    """Validate a task's JSON input with ``model``; a :class:`TaskError`
    ``bad_input`` naming every problem (with its field path) otherwise."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'input'}: {e['msg']}" for e in exc.errors()
        )
        raise TaskError("bad_input", f"invalid {what}: {problems}") from exc


_ERROR_CODE: Final = re.compile(ERROR_CODE_RE)

# How long a task may run before the worker acknowledges it with "started".
# Fast tasks (echo) answer within this time and their result is the ack, which
# saves one message per task on the hot path.
ACK_DELAY: Final = 0.02
# Assignments remembered as run (see Worker._done): a broker restart's resends come
# within seconds, and this many cover a busy worker's last minutes.
DONE_REMEMBERED: Final = 4096
# Acks are sent in rounds at most this often (s), not from a loop timer per task.
ACK_ROUND: Final = 0.005


class Executor(Protocol):
    """The worker's port into a node: all it needs is to run a task
    (:meth:`daemon.node.Node.execute` is one)."""

    async def execute(self, task: TaskRun) -> Any: ...


class Worker:
    """Executes assignments from the orchestrator on this node's nodes.

    Subscribes to ``node/<id>/task``; each :class:`TaskAssign` runs in its own
    asyncio task (bounded by the capability's ``max_concurrency``) and is
    answered on ``task/worker/<id>`` with started / partial / done / failed,
    or ``rejected`` to hand it back.
    """

    def __init__(self, bus: Bus, realm: str, node_id: str) -> None:
        self.bus = bus
        self.realm = realm
        self.node_id = node_id
        self.report_topic = topics.TASK_WORKER.build(realm=realm, node_id=node_id)
        self.routes: dict[str, tuple[Executor, int]] = {}
        self.running: dict[str, tuple[asyncio.Task[None], TaskRun]] = {}
        self.load: dict[str, int] = {}
        self.accepting = True
        # Runs waiting for their "started" ack, in order of start: (due loop time,
        # task id, attempt); ids, not runs, so a finished run is not kept alive.
        self._unacked: deque[tuple[float, str, int]] = deque()
        self._ack_timer: asyncio.TimerHandle | None = None
        # Deadlines of running tasks, (task id, attempt), in one wheel rather than an
        # asyncio.timeout (a loop timer) per task; a task past it is cancelled and
        # reported as "timeout" (up to one TICK late).
        self._deadlines: TimerWheel[tuple[str, int]] = TimerWheel(self._on_deadline)
        self._expired: set[tuple[str, int]] = set()
        # Assignments already run here, (task id, attempt), newest last: the same one
        # delivered again (QoS 1 is at least once; an orchestrator's publish resent
        # after a broker restart) is not run twice.
        self._done: OrderedDict[tuple[str, int], None] = OrderedDict()
        # The highest orchestrator lease epoch seen (high availability): assignments
        # from a lower one come from an orchestrator that no longer rules.
        self.epoch = 0

    def set_routes(self, routes: dict[str, tuple[Executor, int]]) -> None:
        """capability -> (node, max concurrency); called whenever adverts change."""
        self.routes = routes

    @property
    def active(self) -> int:
        return len(self.running)

    async def start(self) -> None:
        await self.bus.subscribe(topics.ORCH_STATE.build(realm=self.realm), self._on_orchestrator)
        await self.bus.subscribe(
            topics.NODE_TASK.build(realm=self.realm, node_id=self.node_id), self._on_message
        )

    async def _on_orchestrator(self, msg: Inbound) -> None:
        """A new active orchestrator: fence off the old one, and tell the new one
        what runs here (it adopted these tasks from its mirror and waits for this)."""
        try:
            state = decode(msg.payload, OrchestratorState)
        except MessageError:
            return
        if state.state != "online" or state.epoch <= self.epoch:
            return
        first = self.epoch == 0
        self.epoch = state.epoch
        if first:
            return  # the retained lease on subscribing: nothing changed hands
        for _, run in list(self.running.values()):
            self._ack(run)

    def _report(self, report: WorkerReport) -> None:
        self.bus.post(self.report_topic, report, qos=1)

    async def _on_message(self, msg: Inbound) -> None:
        try:
            message = decode_any(msg.payload)
        except MessageError as exc:
            log.warning("malformed task message on %s: %s (%s)", msg.topic, exc, msg.preview())
            return
        if isinstance(message, TaskAssign):
            await self._on_assign(message)
        elif isinstance(message, TaskAbort):
            self._abort(message)
        else:
            log.warning("unexpected %s on %s", message.TYPE, msg.topic)

    def _abort(self, abort: TaskAbort) -> None:
        entry = self.running.get(abort.task_id)
        if entry is None:
            return
        task, run = entry
        if abort.attempt is not None and run.attempt != abort.attempt:
            return
        run.cancel_flag.set()
        task.cancel()

    async def _on_assign(self, assign: TaskAssign) -> None:
        key = assign.task_id
        if key in self.running or (key, assign.attempt) in self._done:
            return  # a duplicate delivery of an assignment running or run here
        route = self.routes.get(assign.capability)
        reason = None
        if not self.accepting:
            reason = ErrorInfo(code="shutting_down", message=f"{self.node_id} is shutting down")
        elif route is None:
            reason = ErrorInfo(
                code="unavailable", message=f"{self.node_id} has no {assign.capability!r}"
            )
        elif self.load.get(assign.capability, 0) >= route[1]:
            reason = ErrorInfo(code="overloaded", message=f"{assign.capability} slots are full")
        elif assign.deadline is not None and assign.deadline <= time.time():
            reason = ErrorInfo(code="timeout", message="deadline passed before the task started")
        elif assign.epoch is not None and assign.epoch < self.epoch:
            reason = ErrorInfo(
                code="stale_epoch",
                message=f"assigned in epoch {assign.epoch}; orchestrator epoch {self.epoch} rules",
            )
        if reason is not None or route is None:
            self._report(
                WorkerReport(task_id=key, attempt=assign.attempt, status="rejected", error=reason)
            )
            return
        seq = 0

        async def emit(chunk: Any) -> None:
            nonlocal seq
            if not assign.stream:
                return
            seq += 1
            self._report(
                WorkerReport(
                    task_id=key, attempt=assign.attempt, status="partial", seq=seq, output=chunk
                )
            )

        run = TaskRun(
            task_id=key,
            capability=assign.capability,
            input=assign.input,
            user=assign.user,
            deadline=assign.deadline,
            constraints=assign.constraints.model_dump(exclude_none=True),
            emit_partial=emit,
            attempt=assign.attempt,
            reply=assign.reply,
        )
        self.load[assign.capability] = self.load.get(assign.capability, 0) + 1
        task = asyncio.create_task(self._execute(route[0], run), name=f"task:{key}")
        self.running[key] = (task, run)

    async def _execute(self, node: Executor, run: TaskRun) -> None:
        started = time.perf_counter()
        self._arm_ack(run)  # the result acks fast tasks itself
        report: WorkerReport
        key = (run.task_id, run.attempt)
        remaining = run.remaining()
        wheel_key = None if remaining is None else self._deadlines.add_in(key, remaining)
        try:
            output = await node.execute(run)
            report = WorkerReport(
                task_id=run.task_id, attempt=run.attempt, status="done", output=output
            )
        except TaskError as exc:
            report = self._failed(run, exc.code, str(exc))
        except TimeoutError:
            run.cancel_flag.set()
            report = self._failed(run, "timeout", "the task ran past its deadline")
        except asyncio.CancelledError:
            run.cancel_flag.set()
            if key in self._expired:  # cancelled by _on_deadline
                report = self._failed(run, "timeout", "the task ran past its deadline")
            elif not self.accepting:
                report = WorkerReport(
                    task_id=run.task_id,
                    attempt=run.attempt,
                    status="rejected",
                    error=ErrorInfo(code="shutting_down", message="worker shut down mid-task"),
                )
            else:
                report = self._failed(run, "cancelled", "cancelled")
        except Exception as exc:
            log.exception("task %s (%s) crashed", run.task_id, run.capability)
            report = self._failed(run, "internal", f"{type(exc).__name__}: {exc}")
        finally:
            self._deadlines.discard(key, wheel_key)
            if self._expired:
                self._expired.discard(key)
            self.running.pop(run.task_id, None)
            self.load[run.capability] -= 1
            self._done[key] = None
            if len(self._done) > DONE_REMEMBERED:
                self._done.popitem(last=False)
        report.run_ms = round((time.perf_counter() - started) * 1000, 3)
        if report.status == "done" and run.reply is not None and not run.partials:
            # Partials travel through the orchestrator: a direct final could overtake them.
            self._reply_direct(run.reply, run, report)
        self._report(report)

    def _reply_direct(self, reply: DirectReply, run: TaskRun, report: WorkerReport) -> None:
        """Send the final ``done`` straight to the submitter (``TaskSubmit.direct``)."""
        report.seq = reply.seq + 1
        report.replied = True
        update = TaskUpdate(
            task_id=run.task_id,
            status="done",
            seq=report.seq,
            node=self.node_id,
            attempt=run.attempt,
            output=report.output,
            queue_ms=reply.queue_ms,
            run_ms=report.run_ms,
            correlation=reply.correlation,
            key=reply.key,
        )
        correlation = bytes.fromhex(reply.correlation_data) if reply.correlation_data else None
        self.bus.post(reply.topic, update, qos=1, correlation_data=correlation)

    def _on_deadline(self, key: tuple[str, int]) -> None:
        entry = self.running.get(key[0])
        if entry is None or entry[1].attempt != key[1]:
            return
        task, run = entry
        self._expired.add(key)
        run.cancel_flag.set()
        task.cancel()

    def _arm_ack(self, run: TaskRun) -> None:
        loop = asyncio.get_running_loop()
        self._unacked.append((loop.time() + ACK_DELAY, run.task_id, run.attempt))
        if self._ack_timer is None:
            self._ack_timer = loop.call_at(self._unacked[0][0], self._ack_due)

    def _ack_due(self) -> None:
        """Ack every run started ACK_DELAY ago that is still running; one timer for all."""
        self._ack_timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        queue = self._unacked
        while queue and queue[0][0] <= now:
            _, task_id, attempt = queue.popleft()
            entry = self.running.get(task_id)
            if entry is not None and entry[1].attempt == attempt:
                self._ack(entry[1])
        if queue:
            self._ack_timer = loop.call_at(max(queue[0][0], now + ACK_ROUND), self._ack_due)

    def _ack(self, run: TaskRun) -> None:
        report = WorkerReport(task_id=run.task_id, attempt=run.attempt, status="started")
        self.bus.post(self.report_topic, report, qos=1)

    @staticmethod
    def _failed(run: TaskRun, code: str, message: str) -> WorkerReport:
        if not _ERROR_CODE.match(code):  # a node's bug must not stop its own report
            message, code = f"{code[:64]!r}: {message}", "internal"
        return WorkerReport(
            task_id=run.task_id,
            attempt=run.attempt,
            status="failed",
            error=ErrorInfo(code=code, message=message[:1000]),
        )

    async def stop(self) -> None:
        """Stop taking tasks; let in-flight ones finish (the caller bounds the wait),
        then hand back whatever is still running."""
        self.accepting = False
        try:
            while self.running:
                await asyncio.wait([t for t, _ in self.running.values()])
        except asyncio.CancelledError:
            for task, run in list(self.running.values()):
                run.cancel_flag.set()
                task.cancel()
            if self.running:
                await asyncio.wait([t for t, _ in self.running.values()], timeout=0.5)
            raise
