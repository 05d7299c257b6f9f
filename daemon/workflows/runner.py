"""One workflow run: steps in order, with timeouts, retries, branches and parallel branches.

A :class:`Run` owns its context (``trigger``, ``steps``, ``state``, ``input``,
``now``, ``run``, ``workflow`` — what templates and conditions see) and its
step records.  What a step does in the world goes through :class:`Ports`, so
the same runner serves the orchestrator (tasks through the realm) and a node
daemon (tasks of its own nodes, in process).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from daemon.workflows.conditions import Facts, all_true
from daemon.workflows.model import (
    DelayStep,
    IfStep,
    ParallelStep,
    PublishStep,
    SetStateStep,
    TaskStep,
    WaitEventStep,
    WorkflowConfig,
    step_kind,
)
from daemon.workflows.templating import TemplateError

log = logging.getLogger(__name__)


class StepFailed(Exception):
    """A step failed with a machine-readable code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class RunFailed(Exception):
    def __init__(self, step: str, error: StepFailed) -> None:
        super().__init__(f"step {step} failed: {error.code}: {error}")
        self.step = step
        self.error = error


class Ports(Protocol):
    """What a run may do in the world (orchestrator or node implementation)."""

    realm: str

    async def run_task(
        self, capability: str, input: Any, *, timeout: float | None, priority: str, node: str | None
    ) -> Any: ...

    async def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> None: ...

    async def set_state(self, key: str, value: Any, by: str) -> None: ...

    def state(self) -> Mapping[str, Any]: ...

    def has_capability(self, name: str) -> bool: ...


WaitFn = Callable[[WaitEventStep, float | None], Awaitable[dict[str, Any]]]
EmitFn = Callable[[dict[str, Any]], None]


@dataclass
class StepRecord:
    id: str
    kind: str
    status: str
    started: float
    duration_ms: float
    attempts: int
    error: dict[str, str] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "status": self.status,
            "started": self.started,
            "duration_ms": self.duration_ms,
            "attempts": self.attempts,
            "error": self.error,
        }


def now_facts(ts: float | None = None) -> dict[str, Any]:
    t = dt.datetime.fromtimestamp(ts if ts is not None else time.time()).astimezone()
    return {
        "ts": round(t.timestamp(), 3),
        "iso": t.isoformat(timespec="seconds"),
        "time": t.strftime("%H:%M"),
        "hour": t.hour,
        "minute": t.minute,
        "weekday": t.strftime("%a").lower(),
        "date": t.date().isoformat(),
    }


@dataclass
class Run:
    id: str
    workflow: str
    config: WorkflowConfig
    trigger: dict[str, Any]
    ports: Ports
    step_names: Mapping[int, str]
    wait: WaitFn
    emit: EmitFn
    input: Any = None
    started: float = field(default_factory=time.time)
    steps: list[StepRecord] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)

    def context(self) -> dict[str, Any]:
        return {
            "trigger": self.trigger,
            "steps": self.results,
            "state": dict(self.ports.state()),
            "input": self.input,
            "now": now_facts(),
            "run": {"id": self.id, "started": self.started},
            "workflow": self.workflow,
        }

    def facts(self) -> Facts:
        return Facts(
            now=dt.datetime.now().astimezone(),
            state=self.ports.state(),
            has_capability=self.ports.has_capability,
        )

    async def execute(self) -> None:
        """Run every step; raises :class:`RunFailed` (or TimeoutError from the caller)."""
        await self._steps(self.config.steps)

    async def _steps(self, steps: list[Any]) -> None:
        for step in steps:
            await self._one(step)

    async def _one(self, step: Any) -> None:
        name = self.step_names.get(id(step), "?")
        kind = step_kind(step)
        started = time.time()
        t0 = time.perf_counter()
        attempts = 0
        error: StepFailed | None = None
        output: Any = None
        for attempt in range(step.retries + 1):
            attempts = attempt + 1
            try:
                async with asyncio.timeout(step.timeout):
                    output = await self._do(step)
                error = None
                break
            except TimeoutError:
                error = StepFailed("timeout", f"no result within {step.timeout:g}s")
            except StepFailed as exc:
                error = exc
            except TemplateError as exc:
                error = StepFailed("template", str(exc))
            except RunFailed as exc:  # inside if/parallel: the inner step already reported
                error = exc.error
                break
            if attempt < step.retries:
                await asyncio.sleep(step.retry_delay)
        ms = round((time.perf_counter() - t0) * 1000, 3)
        status = "failed" if error else "done"
        err = {"code": error.code, "message": str(error)} if error else None
        self.steps.append(StepRecord(name, kind, status, started, ms, attempts, err))
        if step.id is not None:
            self.results[step.id] = {"status": status, "output": output, "error": err}
        self.emit(
            {
                "kind": "step",
                "status": status,
                "step": name,
                "step_kind": kind,
                "attempts": attempts,
                "duration_ms": ms,
                "error": err,
            }
        )
        if error is not None and not step.continue_on_error:
            raise RunFailed(name, error)

    async def _do(self, step: Any) -> Any:
        if isinstance(step, TaskStep):
            data = step._input.render(self.context())
            return await self.ports.run_task(
                step.task, data, timeout=step.timeout, priority=step.priority, node=step.node
            )
        if isinstance(step, PublishStep):
            ctx = self.context()
            topic = str(step._topic.render(ctx))
            if topic.startswith("~/"):
                topic = f"mtor/{self.ports.realm}/{topic[2:]}"
            if not topic or "+" in topic or "#" in topic:
                raise StepFailed("bad_input", f"invalid publish topic {topic!r}")
            payload = step._payload.render(ctx)
            data = (
                payload.encode()
                if isinstance(payload, str)
                else (
                    b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode()
                )
            )
            await self.ports.publish(topic, data, qos=step.qos, retain=step.retain)
            return {"topic": topic}
        if isinstance(step, SetStateStep):
            value = step._value.render(self.context())
            await self.ports.set_state(step.set_state, value, f"workflow:{self.workflow}:{self.id}")
            return value
        if isinstance(step, WaitEventStep):
            return await self.wait(step, step.timeout)
        if isinstance(step, DelayStep):
            await asyncio.sleep(step.delay)
            return step.delay
        if isinstance(step, IfStep):
            taken = all_true(step.if_, self.context(), self.facts())
            await self._steps(step.then if taken else step.else_)
            return {"branch": "then" if taken else "else"}
        if isinstance(step, ParallelStep):
            try:
                async with asyncio.TaskGroup() as tg:
                    for branch in step.parallel:
                        tg.create_task(self._steps(branch))
            except* RunFailed as group:
                first = group.exceptions[0]
                assert isinstance(first, RunFailed)
                raise first from None
            return {"branches": len(step.parallel)}
        raise StepFailed("internal", f"unknown step {type(step).__name__}")
