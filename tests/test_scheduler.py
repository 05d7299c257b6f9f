"""The scheduling core alone: a fake clock, fake timers and a recording sink.

What needed a broker before (ack timeouts, reassignment, duplicate finals,
worker loss mid-task, deadlines, cancellation races, take-over) is driven here
event by event, with time moved by hand.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from daemon.config import build_config
from daemon.messages import Message
from daemon.orchestrator import recovery
from daemon.orchestrator.core import Scheduler
from daemon.orchestrator.identity import Identity, Refused
from daemon.orchestrator.registry import Registry
from daemon.orchestrator.tasks import Mirrored, Task
from daemon.protocol.node import Capability, Hardware, NodeInfo, NodeState, NodeSummary
from daemon.protocol.task import (
    Constraints,
    ErrorInfo,
    TaskAbort,
    TaskAssign,
    TaskSubmit,
    TaskUpdate,
    WorkerReport,
)
from tests.test_imports import build_graph

REALM = "unit"
ANN = Identity("ann", "user")
REPLY = f"mtor/{REALM}/reply/ann/c1/r"


class FakeClock:
    """Wall and monotonic time that move only when told; timers fire in order."""

    def __init__(self) -> None:
        self.wall = 1_800_000_000.0
        self.mono = 1_000.0
        self.wheels: list[FakeTimers] = []

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def timers(self, fire: Callable[[Task], None]) -> FakeTimers:
        wheel = FakeTimers(self, fire)
        self.wheels.append(wheel)
        return wheel

    def advance(self, seconds: float) -> None:
        end = self.mono + seconds
        while True:
            due = [(w.due[k][0], k, w) for w in self.wheels for k in w.due if w.due[k][0] <= end]
            if not due:
                break
            when, key, wheel = min(due, key=lambda d: (d[0], d[1]))
            self._move(when)
            _, item = wheel.due.pop(key)
            wheel.fire(item)
        self._move(end)

    def _move(self, mono: float) -> None:
        self.wall += mono - self.mono
        self.mono = mono


@dataclass
class FakeTimers:
    clock: FakeClock
    fire: Callable[[Task], None]
    due: dict[int, tuple[float, Task]] = field(default_factory=dict)
    keys: int = 0

    def add_in(self, item: Task, delay: float) -> int:
        self.keys += 1
        self.due[self.keys] = (self.clock.mono + max(0.0, delay), item)
        return self.keys

    def discard(self, item: Task, key: int | None) -> None:
        if key is not None:
            self.due.pop(key, None)

    def close(self) -> None:
        self.due.clear()


@dataclass
class Sink:
    posts: list[tuple[str, Message, bytes | None]] = field(default_factory=list)
    accepted_ids: list[str] = field(default_factory=list)
    assigned_to: list[tuple[str, str | None, int]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    hearing: float | None = 0.0

    def post(
        self,
        topic: str,
        message: Message,
        *,
        correlation_data: bytes | None = None,
        expiry: float | None = None,
    ) -> None:
        self.posts.append((topic, message, correlation_data))

    def hearing_since(self) -> float | None:
        return self.hearing

    def accepted(self, task: Task) -> None:
        self.accepted_ids.append(task.id)

    def assigned(self, task: Task) -> None:
        self.assigned_to.append((task.id, task.node, task.attempt))

    def finished(self, task: Task, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def of(self, kind: type[Message], topic_part: str = "") -> list[Any]:
        return [m for t, m, _ in self.posts if isinstance(m, kind) and topic_part in t]

    def assigns(self, node: str) -> list[TaskAssign]:
        return self.of(TaskAssign, f"/node/{node}/task")

    def updates(self) -> list[TaskUpdate]:
        return self.of(TaskUpdate, "/reply/")

    def finals(self) -> list[TaskUpdate]:
        return [u for u in self.updates() if u.status in ("done", "failed", "cancelled")]


@dataclass
class Leader:
    active: bool = True
    epoch: int = 7


class Realm:
    """A scheduler over a registry of made-up peers."""

    def __init__(self, **orchestrator: Any) -> None:
        config = build_config(
            {"realm": REALM, "nodes": {}, "orchestrator": {"ack_timeout": 2.0, **orchestrator}}
        )
        self.cfg = config.orchestrator
        self.clock = FakeClock()
        self.sink = Sink()
        self.leader = Leader()
        self.registry = Registry(self.cfg.breaker)
        self.core = Scheduler(
            self.cfg,
            REALM,
            self.registry,
            self.sink,
            self.leader,
            clock=self.clock,
            timers=self.clock.timers,
            rng=random.Random(1),
        )

    def peer(
        self, node_id: str, cap: str | None = "echo", capacity: int = 1, starting: bool = False
    ) -> None:
        boot = f"boot-{node_id}"
        status: Any = "starting" if starting else "running"
        caps = [Capability(name=cap, node="ref", max_concurrency=capacity)] if cap else []
        info = NodeInfo(
            node_id=node_id,
            boot_id=boot,
            version="test",
            hostname=node_id,
            hardware=Hardware(arch="x86_64", cpu_count=4, ram_mb=4096),
            nodes=[NodeSummary(name="n", type="chat", status=status)],
            capabilities=caps,
        )
        now = self.clock.monotonic()
        self.registry.on_state(node_id, NodeState(state="online", boot_id=boot), now)
        self.registry.on_info(node_id, info, now)
        self.core.dispatch_peer(node_id)

    def submit(
        self, tid: str = "t1", cap: str = "echo", who: Identity = ANN, **fields: Any
    ) -> Task:
        submit = TaskSubmit(capability=cap, input=fields.pop("input", "hi"), **fields)
        if self.core.join(submit, who.name, tid, REPLY, b"c"):
            return self.core.tasks[tid]
        return self.core.accept(submit, who, tid, reply=REPLY, corr=b"c")

    def report(self, node: str, task_id: str, attempt: int, status: str, **fields: Any) -> None:
        self.core.report(
            node, WorkerReport(task_id=task_id, attempt=attempt, status=status, **fields)
        )

    def slot(self, node: str, cap: str = "echo") -> Any:
        return self.registry.peers[node].slots[cap]


def test_a_task_goes_to_a_free_peer_and_gets_one_final() -> None:
    r = Realm()
    r.peer("a")
    r.submit()
    (assign,) = r.sink.assigns("a")
    assert (assign.task_id, assign.attempt, assign.epoch) == ("t1", 1, 7)
    assert r.slot("a").in_use == 1 and "a" not in r.registry.free["echo"]
    r.report("a", "t1", 1, "started")
    r.report("a", "t1", 1, "done", output="HI")
    (final,) = r.sink.finals()
    assert (final.status, final.output, final.node) == ("done", "HI", "a")
    assert r.slot("a").in_use == 0 and "a" in r.registry.free["echo"]
    assert not r.core.tasks and [row["outcome"] for row in r.sink.rows] == ["done"]
    assert r.sink.accepted_ids == ["t1"]


def test_an_unacknowledged_assignment_goes_to_another_peer() -> None:
    r = Realm()
    r.peer("a")
    r.submit()
    r.peer("b")  # free now, but the task is a's
    assert not r.sink.assigns("b")
    r.clock.advance(r.cfg.ack_timeout + 0.01)
    (abort,) = r.sink.of(TaskAbort, "/node/a/task")
    assert abort.reason == "not acknowledged in time"
    (second,) = r.sink.assigns("b")
    assert second.attempt == 2
    assert r.slot("a").failed == 1 and r.slot("a").in_use == 0
    # a's late acknowledgement and result are stale now: only b's counts
    r.report("a", "t1", 1, "done", output="late")
    assert not r.sink.finals()
    r.report("b", "t1", 2, "done", output="ok")
    assert [f.output for f in r.sink.finals()] == ["ok"]


def test_no_reassignment_while_the_acknowledgement_could_not_be_heard() -> None:
    r = Realm()
    r.peer("a")
    r.peer("b")
    task = r.submit()
    first = task.node
    r.sink.hearing = None  # the broker is away
    r.clock.advance(r.cfg.ack_timeout * 3)
    assert task.node == first and task.attempt == 1
    r.sink.hearing = r.clock.monotonic()  # back: the report may still come
    r.report(first or "", "t1", 1, "started")
    r.clock.advance(r.cfg.ack_timeout * 3)
    assert task.state == "running" and task.attempt == 1


def test_duplicate_and_stale_finals_are_dropped() -> None:
    r = Realm()
    r.peer("a")
    r.submit()
    r.report("b", "t1", 1, "done", output="forged")  # not the assigned node
    r.report("a", "t1", 2, "done", output="wrong attempt")
    assert not r.sink.finals()
    r.report("a", "t1", 1, "done", output="one")
    r.report("a", "t1", 1, "done", output="two")
    r.report("a", "t1", 1, "failed", error=ErrorInfo(code="internal", message="x"))
    assert [f.output for f in r.sink.finals()] == ["one"]
    assert len(r.sink.rows) == 1 and r.slot("a").completed == 1


def test_worker_lost_mid_task_is_retried_then_fails_when_out_of_attempts() -> None:
    r = Realm(max_attempts=2)
    r.peer("a")
    r.peer("b")
    task = r.submit()
    first = task.node or ""
    r.report(first, "t1", 1, "started")
    r.core.peer_lost(first, "went offline")
    second = task.node or ""
    assert second != first and task.attempt == 2 and task.state == "assigned"
    assert not r.core.by_node[first]
    r.core.peer_lost(second, "stopped sending heartbeats")
    (final,) = r.sink.finals()
    assert final.status == "failed" and final.error is not None
    assert final.error.code == "worker_lost" and second in final.error.message
    assert r.slot("a").in_use == r.slot("b").in_use == 0


def test_deadline_aborts_the_worker_and_fails_the_task() -> None:
    r = Realm()
    r.peer("a")
    r.submit(timeout=5.0)  # shorter than the default: not the peer's fault
    r.report("a", "t1", 1, "started")
    r.clock.advance(5.1)
    (abort,) = r.sink.of(TaskAbort)
    assert abort.reason == "deadline"
    (final,) = r.sink.finals()
    assert final.error is not None and final.error.code == "timeout"
    assert r.slot("a").failed == 0 and r.slot("a").in_use == 0
    r.submit("t2")
    r.report("a", "t2", 1, "started")
    r.clock.advance(r.cfg.default_timeout + 0.1)  # the realm's own deadline: the peer's
    assert r.slot("a").failed == 1


def test_cancel_races_with_the_final() -> None:
    r = Realm()
    r.peer("a")
    r.submit()
    r.report("a", "t1", 1, "started")
    with pytest.raises(Refused):
        r.core.cancel("t1", Identity("bob", "user"), None)
    assert r.core.cancel("t1", ANN, "changed my mind")
    (abort,) = r.sink.of(TaskAbort)
    assert abort.reason == "changed my mind"
    r.report("a", "t1", 1, "done", output="too late")  # crossed the cancel on the wire
    assert [f.status for f in r.sink.finals()] == ["cancelled"]
    assert not r.core.cancel("t1", ANN, None)  # already final
    assert r.slot("a").in_use == 0
    r.submit("t2")  # the slot is free for the next one
    assert r.sink.assigns("a")[-1].task_id == "t2"


def test_queued_tasks_wait_for_a_slot_and_neutral_rejections_retry() -> None:
    r = Realm()
    r.peer("a")
    r.submit("t1")
    r.submit("t2", progress=True)
    assert [u.status for u in r.sink.updates()] == ["queued"]
    assert r.sink.updates()[0].position == 0  # first in line
    r.report("a", "t1", 1, "rejected", error=ErrorInfo(code="overloaded", message="busy"))
    assert r.slot("a").failed == 0  # neutral: back to the queue, front first
    assert [a.task_id for a in r.sink.assigns("a")] == ["t1", "t1"]
    r.report("a", "t1", 2, "done", output=1)
    assert r.sink.assigns("a")[-1].task_id == "t2"


def test_a_standby_dispatches_nothing() -> None:
    r = Realm()
    r.leader.active = False
    r.peer("a")
    task = r.submit()
    assert not r.sink.assigns("a") and task.state == "queued"
    r.leader.active = True
    r.core.dispatch_all()
    assert r.sink.assigns("a")[0].epoch == 7


def test_a_resubmission_joins_the_task_then_gets_the_remembered_final() -> None:
    r = Realm()
    r.peer("a")
    r.submit("t1", task_id="t1")
    other = TaskSubmit(capability="echo", input="hi", task_id="t1")
    assert r.core.join(other, "ann", "t1", f"mtor/{REALM}/reply/ann/c2/r", b"d")
    with pytest.raises(Refused):
        r.core.join(other, "bob", "t1", None, None)
    r.report("a", "t1", 1, "done", output="once")
    assert len(r.sink.finals()) == 2  # the submitter and the watcher
    r.sink.posts.clear()
    assert r.core.join(other, "ann", "t1", REPLY, b"e")
    (again,) = r.sink.finals()
    assert again.output == "once" and len(r.sink.assigns("a")) == 0
    assert len(r.sink.rows) == 1


def test_take_over_keeps_assigned_tasks_with_their_worker() -> None:
    r = Realm()
    r.peer("a")
    r.peer("b")
    doc: dict[str, Any] = {"id": "m1", "submit": {"capability": "echo", "input": 1}, "user": "ann"}
    doc |= {"role": "user", "deadline": r.clock.time() + 60, "reply_topic": REPLY}
    done = WorkerReport(task_id="m2", attempt=1, status="done", output="kept")
    mirror = {
        "m1": Mirrored(doc, node="a", attempt=3),
        "m2": Mirrored({**doc, "id": "m2"}, node="b", attempt=1, final=done),
        "m3": Mirrored({**doc, "id": "m3"}),
        "bad": Mirrored({"id": "bad"}),
    }
    recovery.adopt(r.core, mirror)
    m1 = r.core.tasks["m1"]
    assert (m1.node, m1.attempt, m1.state) == ("a", 3, "assigned")
    assert not r.sink.assigns("a") or r.sink.assigns("a")[0].task_id != "m1"  # not resent
    assert [f.output for f in r.sink.finals()] == ["kept"]
    assert "m3" in r.core.tasks and "bad" not in r.core.tasks
    r.report("a", "m1", 3, "started")  # the worker re-announces to the new epoch
    r.clock.advance(r.cfg.ack_timeout * 2)
    assert m1.state == "running" and m1.attempt == 3


def test_recovered_journal_tasks_are_queued_again() -> None:
    r = Realm()
    doc: dict[str, Any] = {"id": "j1", "submit": {"capability": "echo", "input": 1}, "user": "ann"}
    doc |= {"role": "user", "deadline": r.clock.time() + 60, "reply_topic": REPLY}
    assert recovery.recover(r.core, [doc, {"nonsense": True}]) == 1
    r.peer("a")
    assert r.sink.assigns("a")[0].task_id == "j1"


def test_a_task_waits_while_the_realm_starts_then_runs() -> None:
    r = Realm(capability_wait=60.0)
    r.clock.advance(5.0)  # no peer online yet: the realm is starting
    task = r.submit(progress=True)
    (queued,) = r.sink.updates()
    assert queued.status == "queued" and queued.waiting == "the realm is starting"
    r.clock.advance(20.0)
    r.peer("a")  # its advert arrives: the task goes to it
    assert task.state == "assigned" and r.sink.assigns("a")[0].task_id == "t1"
    r.report("a", "t1", 1, "started")
    r.clock.advance(60.0)  # the wait's timer finds it running: nothing happens
    assert task.state == "running" and not r.sink.finals()


def test_a_task_waits_for_a_starting_node_up_to_the_bound() -> None:
    r = Realm(capability_wait=30.0)
    r.peer("kitchen", cap=None, starting=True)  # its chat node still loads the model
    task = r.submit(cap="chat")
    assert task.state == "queued"
    r.clock.advance(29.0)
    assert not r.sink.finals()
    r.clock.advance(1.1)
    (final,) = r.sink.finals()
    assert final.error is not None and final.error.code == "unavailable"
    assert final.error.message == "no peer offering 'chat' within 30 s"
    assert not r.core.tasks and not len(r.core.queues["chat"])


def test_what_cannot_come_fails_at_once() -> None:
    r = Realm(capability_wait=60.0)
    r.peer("a")  # online, every node running: the realm has started
    r.peer("b")
    r.registry.set_flags("b", blacklisted=True)
    r.peer("c")
    r.registry.set_flags("c", drained=True)
    cases = {
        "no peer offers 'no.such'": {"cap": "no.such"},
        "no peer 'ghost' in the realm": {"constraints": Constraints(node="ghost")},
        "peer 'a' does not offer 'chat'": {"cap": "chat", "constraints": Constraints(node="a")},
        "peer 'b' is blacklisted by a sysop": {"constraints": Constraints(node="b")},
        "peer 'c' is drained by a sysop": {"constraints": Constraints(node="c")},
    }
    for i, (message, fields) in enumerate(cases.items()):
        with pytest.raises(Refused) as refused:
            r.submit(f"t{i}", **fields)
        assert (refused.value.code, str(refused.value)) == ("unavailable", message)
    assert not r.core.tasks
    off = Realm(capability_wait=0.0)  # waiting off: the realm starting fails at once too
    with pytest.raises(Refused):
        off.submit()


def test_the_core_never_imports_the_bus() -> None:
    graph = build_graph()
    edges = graph.union(("top", "deferred"))
    seen, todo = set(), ["daemon.orchestrator.core"]
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo.extend(edges.get(mod, ()))
    assert not {m for m in seen if m == "daemon.bus" or m.startswith(("daemon.mqtt", "nodes"))}
