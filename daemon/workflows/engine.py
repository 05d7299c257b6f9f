"""The workflow engine: triggers → limits → runs, and the run events they publish.

One :class:`Engine` serves a set of workflows in one process (the
orchestrator's realm-wide ones, or a node daemon's ``local: true`` ones).

Trigger → (``match``) → debounce → conditions → cooldown → concurrency:

* ``debounce``: a trigger arms a timer; another within the window re-arms it
  with the newer trigger data; the run starts when triggers were quiet.
* conditions false: the trigger is ignored (counted as ``conditions_false``).
* ``cooldown``: triggers within this long after a run *started* are skipped.
* ``max_concurrent``: a trigger beyond it is dropped (``overflow: drop``) or
  queued (``overflow: queue``, at most ``queue_size``, then dropped).
  Skips and drops are counted and published as ``skipped`` run events.

A manual start skips debounce, conditions and cooldown but respects
``max_concurrent``.  Every run publishes ``started``, one ``step`` per
finished step and ``finished`` on ``workflow/<name>/event`` and is handed to
``record`` (the orchestrator writes it to its SQLite history).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from daemon import topics
from daemon.bus import Bus, Inbound
from daemon.errors import MessageError
from daemon.messages import decode, load_json
from daemon.orchestrator.state import StateView
from daemon.protocol.node import Event
from daemon.protocol.task import ErrorInfo
from daemon.protocol.workflow import WorkflowEvent
from daemon.workflows.conditions import DAYS, Facts, all_true, compare, parse_hhmm, resolve
from daemon.workflows.model import (
    EventTrigger,
    ManualTrigger,
    MqttTrigger,
    ScheduleTrigger,
    StateTrigger,
    WaitEventStep,
    WorkflowConfig,
    walk_steps,
)
from daemon.workflows.runner import Ports, Run, RunFailed

log = logging.getLogger(__name__)

# Raw MQTT payloads bigger than this are not parsed as trigger data.
MAX_TRIGGER_PAYLOAD: Final = 256 * 1024
# Finished runs kept in memory for ``list`` (the history is in SQLite).
RECENT_RUNS: Final = 100
# Real seconds per second of a schedule's ``every`` (tests shrink it; ``every`` is >= 1).
SCHEDULE_SECOND: Final = 1.0
# After an ``at`` schedule fires, wait this long so the same minute cannot fire twice.
PAST_MINUTE: Final = 1.0

Recorder = Callable[[dict[str, Any]], None]


class EngineError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Flow:
    """A workflow's live bookkeeping."""

    name: str
    config: WorkflowConfig
    step_names: dict[int, str]
    running: set[asyncio.Task[None]] = field(default_factory=set)
    queue: deque[tuple[dict[str, Any], Any]] = field(default_factory=deque)
    last_start: float = float("-inf")
    debounce: asyncio.TimerHandle | None = None
    pending: dict[str, Any] | None = None
    counts: Counter[str] = field(default_factory=Counter)


@dataclass
class _Waiter:
    step: WaitEventStep
    future: asyncio.Future[dict[str, Any]]


class Engine:
    def __init__(
        self,
        bus: Bus,
        realm: str,
        workflows: dict[str, WorkflowConfig],
        ports: Ports,
        state: StateView,
        *,
        where: str = "orchestrator",
        record: Recorder | None = None,
    ) -> None:
        self.bus = bus
        self.realm = realm
        self.ports = ports
        self.state = state
        self.where = where
        self.record = record
        self.flows: dict[str, Flow] = {}
        for name, cfg in workflows.items():
            names = {id(s): s.id or path for path, s in walk_steps(cfg.steps)}
            self.flows[name] = Flow(name, cfg, names)
        self._waiters: dict[str, list[_Waiter]] = {}
        self._timers: list[asyncio.Task[None]] = []
        self.runs: dict[str, Run] = {}
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_RUNS)

    # ============================================================== start

    async def start(self) -> None:
        """Subscribe every trigger and wait filter; start schedules."""
        for flow in self.flows.values():
            if not flow.config.enabled:
                continue
            for trig in flow.config.triggers:
                await self._arm(flow, trig)
            for _, step in walk_steps(flow.config.steps):
                if isinstance(step, WaitEventStep):
                    await self._wait_filter(step)
        self.state.on_change(self._on_state)
        if self.flows:
            log.info("%d workflow(s) armed (%s)", len(self.flows), self.where)

    async def stop(self) -> None:
        for t in self._timers:
            t.cancel()
        tasks = [t for f in self.flows.values() for t in f.running]
        for t in tasks:
            t.cancel()
        for t in [*self._timers, *tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    def _event_filter(self, sub: str) -> str:
        return topics.EVENT_ROOT.build(realm=self.realm) + "/" + sub

    async def _arm(self, flow: Flow, trig: Any) -> None:
        if isinstance(trig, EventTrigger):

            async def on_event(msg: Inbound) -> None:
                data = _event_data(msg)
                if data is not None and _matches(trig.match, data):
                    self.trigger(flow.name, data)

            await self.bus.subscribe(self._event_filter(trig.topic), on_event)
        elif isinstance(trig, MqttTrigger):

            async def on_mqtt(msg: Inbound) -> None:
                data = _mqtt_data(msg)
                if _matches(trig.match, data):
                    self.trigger(flow.name, data)

            await self.bus.subscribe(trig.topic, on_mqtt)
        elif isinstance(trig, ScheduleTrigger):
            self._timers.append(
                asyncio.create_task(self._schedule(flow, trig), name=f"schedule:{flow.name}")
            )
        elif isinstance(trig, StateTrigger | ManualTrigger):
            pass  # state changes come through _on_state; manual through start_manual

    async def _schedule(self, flow: Flow, trig: ScheduleTrigger) -> None:
        while True:
            delay = next_fire(trig, dt.datetime.now().astimezone())
            await asyncio.sleep(delay * SCHEDULE_SECOND if trig.every is not None else delay)
            self.trigger(flow.name, {"type": "schedule", "every": trig.every, "ts": time.time()})
            if trig.every is None:
                await asyncio.sleep(PAST_MINUTE)

    async def _on_state(self, key: str, value: Any, old: Any) -> None:
        for flow in self.flows.values():
            if not flow.config.enabled:
                continue
            for trig in flow.config.triggers:
                if (
                    isinstance(trig, StateTrigger)
                    and trig.key == key
                    and (not trig.to or value in trig.to)
                    and (not trig.from_ or old in trig.from_)
                ):
                    data = {"type": "state", "key": key, "value": value, "old": old}
                    self.trigger(flow.name, data)

    # ============================================================ waiting

    async def _wait_filter(self, step: WaitEventStep) -> None:
        flt = step.wait_event if step.raw else self._event_filter(step.wait_event)
        if flt in self._waiters:
            return
        self._waiters[flt] = []

        async def on_message(msg: Inbound) -> None:
            waiters = self._waiters.get(flt)
            if not waiters:
                return
            for w in list(waiters):
                data = _mqtt_data(msg) if w.step.raw else _event_data(msg)
                if data is not None and not w.future.done() and _matches(w.step.match, data):
                    w.future.set_result(data)

        await self.bus.subscribe(flt, on_message)

    async def wait(self, step: WaitEventStep, timeout: float | None) -> dict[str, Any]:
        flt = step.wait_event if step.raw else self._event_filter(step.wait_event)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(step, fut)
        self._waiters.setdefault(flt, []).append(waiter)
        try:
            return await fut
        finally:
            self._waiters[flt].remove(waiter)

    # =========================================================== triggers

    def trigger(self, name: str, data: dict[str, Any]) -> None:
        """A trigger fired (already matched): debounce, conditions, limits, start."""
        flow = self.flows[name]
        flow.counts["triggered"] += 1
        if flow.config.debounce > 0:
            flow.pending = data
            if flow.debounce is not None:
                flow.debounce.cancel()
                flow.counts["debounced"] += 1
            loop = asyncio.get_running_loop()
            flow.debounce = loop.call_later(flow.config.debounce, self._debounced, flow)
            return
        self._admit(flow, data)

    def _debounced(self, flow: Flow) -> None:
        flow.debounce = None
        data, flow.pending = flow.pending, None
        if data is not None:
            self._admit(flow, data)

    def _admit(self, flow: Flow, data: dict[str, Any]) -> None:
        cfg = flow.config
        facts = Facts(dt.datetime.now().astimezone(), self.ports.state(), self.ports.has_capability)
        ctx = {"trigger": data, "state": dict(self.ports.state()), "input": None}
        if cfg.conditions and not all_true(cfg.conditions, ctx, facts):
            flow.counts["conditions_false"] += 1
            return
        now = time.monotonic()
        if cfg.cooldown and now - flow.last_start < cfg.cooldown:
            self._skipped(flow, "cooldown", data)
            return
        if len(flow.running) >= cfg.max_concurrent:
            if cfg.overflow == "queue" and len(flow.queue) < cfg.queue_size:
                flow.queue.append((data, None))
                flow.counts["queued"] += 1
                return
            self._skipped(flow, "max_concurrent" if cfg.overflow == "drop" else "queue_full", data)
            return
        self._start(flow, data, None)

    def start_manual(
        self, name: str, input: Any = None, user: str | None = None, run_id: str | None = None
    ) -> str:
        """Start a run by hand; returns its id (raises :class:`EngineError`)."""
        flow = self.flows.get(name)
        if flow is None:
            raise EngineError("not_found", f"no workflow named {name!r} here")
        if not flow.config.enabled:
            raise EngineError("disabled", f"workflow {name!r} is disabled")
        if len(flow.running) >= flow.config.max_concurrent:
            flow.counts["max_concurrent"] += 1
            raise EngineError("busy", f"{name} already runs {len(flow.running)} time(s)")
        data = {"type": "manual", "user": user, "input": input}
        return self._start(flow, data, input, run_id)

    def _skipped(self, flow: Flow, reason: str, data: dict[str, Any]) -> None:
        flow.counts[reason] += 1
        log.info("workflow %s: trigger skipped (%s)", flow.name, reason)
        self._emit(
            flow.name,
            "",
            {
                "kind": "skipped",
                "status": "skipped",
                "reason": reason,
                "trigger": str(data.get("type")),
            },
        )

    # =============================================================== runs

    def _start(
        self, flow: Flow, data: dict[str, Any], input: Any, run_id: str | None = None
    ) -> str:
        run_id = run_id or uuid.uuid4().hex[:16]
        flow.last_start = time.monotonic()
        flow.counts["started"] += 1

        def emit(fields: dict[str, Any]) -> None:
            self._emit(flow.name, run_id, fields)

        run = Run(
            id=run_id,
            workflow=flow.name,
            config=flow.config,
            trigger=data,
            ports=self.ports,
            step_names=flow.step_names,
            wait=self.wait,
            emit=emit,
            input=input if input is not None else data.get("input"),
        )
        self.runs[run_id] = run
        task = asyncio.create_task(self._run(flow, run), name=f"workflow:{flow.name}:{run_id}")
        flow.running.add(task)
        task.add_done_callback(lambda t: self._done(flow, t))
        return run_id

    async def _run(self, flow: Flow, run: Run) -> None:
        trigger_type = str(run.trigger.get("type"))
        self._emit(
            flow.name, run.id, {"kind": "started", "status": "running", "trigger": trigger_type}
        )
        t0 = time.perf_counter()
        status, error = "done", None
        try:
            async with asyncio.timeout(flow.config.timeout):
                await run.execute()
        except RunFailed as exc:
            status, error = (
                "failed",
                {"code": exc.error.code, "message": str(exc.error), "step": exc.step},
            )
        except TimeoutError:
            status = "failed"
            error = {"code": "timeout", "message": f"run took over {flow.config.timeout:g}s"}
        except asyncio.CancelledError:
            status, error = "cancelled", {"code": "cancelled", "message": "engine stopped"}
            raise
        except Exception as exc:  # a bug must not take the engine down
            log.exception("workflow %s run %s crashed", flow.name, run.id)
            status, error = "failed", {"code": "internal", "message": type(exc).__name__}
        finally:
            ms = round((time.perf_counter() - t0) * 1000, 3)
            flow.counts[status] += 1
            fields: dict[str, Any] = {
                "kind": "finished",
                "status": status,
                "duration_ms": ms,
                "trigger": trigger_type,
            }
            if error:
                fields["error"] = {"code": error["code"], "message": error["message"]}
                fields["step"] = error.get("step")
            self._emit(flow.name, run.id, fields)
            row = {
                "run_id": run.id,
                "workflow": flow.name,
                "where_": self.where,
                "trigger": trigger_type,
                "started": run.started,
                "duration_ms": ms,
                "outcome": status,
                "error_code": error["code"] if error else None,
                "error": error["message"] if error else None,
                "steps": json.dumps([s.as_dict() for s in run.steps], separators=(",", ":")),
            }
            self.recent.append(row)
            self.runs.pop(run.id, None)
            if self.record is not None:
                self.record(row)
            log.info("workflow %s run %s %s in %.1f ms", flow.name, run.id, status, ms)

    def _done(self, flow: Flow, task: asyncio.Task[None]) -> None:
        flow.running.discard(task)
        while flow.queue and len(flow.running) < flow.config.max_concurrent:
            data, input = flow.queue.popleft()
            self._start(flow, data, input)

    def _emit(self, name: str, run_id: str, fields: dict[str, Any]) -> None:
        err = fields.pop("error", None)
        event = WorkflowEvent(
            run_id=run_id or "-",
            workflow=name,
            where=self.where,
            error=ErrorInfo(**err) if err else None,
            **fields,
        )
        self.bus.post(topics.WORKFLOW_EVENT.build(realm=self.realm, name=name), event)

    def summary(self) -> list[dict[str, Any]]:
        return [
            {
                "name": f.name,
                "description": f.config.description,
                "enabled": f.config.enabled,
                "local": f.config.local,
                "where": self.where,
                "triggers": [t.type for t in f.config.triggers],
                "running": len(f.running),
                "queued": len(f.queue),
                "counts": dict(f.counts),
            }
            for f in self.flows.values()
        ]


# ===================================================================== helpers


def _event_data(msg: Inbound) -> dict[str, Any] | None:
    fields = topics.EVENT.parse(msg.topic)
    if fields is None or not msg.payload:
        return None
    try:
        ev = decode(msg.payload, Event)
    except MessageError as exc:
        log.warning("workflow trigger: bad event on %s: %s", msg.topic, exc)
        return None
    return {
        "type": "event",
        "topic": msg.topic,
        "node": fields["node_id"],
        "domain": fields["domain"],
        "name": fields["name"],
        "value": ev.value,
        "unit": ev.unit,
        "device_class": ev.device_class,
        "attrs": ev.attrs,
        "ts": ev.ts,
    }


def _mqtt_data(msg: Inbound) -> dict[str, Any]:
    payload: Any = None
    if len(msg.payload) <= MAX_TRIGGER_PAYLOAD:
        text = msg.payload.decode("utf-8", errors="replace")
        try:
            # Bounded nesting, strict UTF-8: a foreign topic's payload is hostile input too.
            payload = load_json(msg.payload)
        except MessageError:
            payload = text
    return {"type": "mqtt", "topic": msg.topic, "payload": payload, "retain": msg.retain}


def _matches(match: dict[str, Any], data: dict[str, Any]) -> bool:
    for path, want in match.items():
        got = resolve(data, path)
        if isinstance(want, list):
            if not compare(got, "in", want):
                return False
        elif not compare(got, "==", want):
            return False
    return True


def next_fire(trig: ScheduleTrigger, now: dt.datetime) -> float:
    """Seconds from ``now`` to the schedule's next firing."""
    if trig.every is not None:
        return trig.every
    best: dt.datetime | None = None
    for day in range(8):
        date = (now + dt.timedelta(days=day)).date()
        if trig.days and DAYS[date.weekday()] not in trig.days:
            continue
        for text in trig.at:
            when = dt.datetime.combine(date, parse_hhmm(text), tzinfo=now.tzinfo)
            if when > now and (best is None or when < best):
                best = when
        if best is not None:
            break
    assert best is not None  # some day in the next week always fits
    return max(0.0, (best - now).total_seconds())
