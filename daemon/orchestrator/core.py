"""The scheduling core: tasks from admission to their one final, with no I/O.

Built as sans-IO protocol libraries are (h11, wsproto): the :class:`Scheduler`
is fed events — a task accepted, a worker's report, a peer lost, a timer due, a
cancel — and acts through a small :class:`Sink` (post a message, journal,
replicate, record history).  It never imports the bus; time comes from a
:class:`Clock` and timeouts from a :class:`Timers` factory, so tests drive it
with a fake clock and a recording sink (``tests/test_scheduler.py``).

A task's life (:data:`~daemon.orchestrator.tasks.TaskState`): queued →
assigned (a worker has it, unacknowledged) → running (acknowledged) → released
(its slot given back) → queued again (bounded attempts) or final.  Only the
(node, attempt) assigned now may move a task on; an unacknowledged assignment
or a peer lost mid-task sends it back to the queue; the first final wins and
later ones are dropped, so the submitter sees one result.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable
from typing import Any, Final

from daemon import topics
from daemon.orchestrator.config import OrchestratorConfig
from daemon.orchestrator.finals import Finals
from daemon.orchestrator.identity import Identity, Refused
from daemon.orchestrator.placement import Placement, direct_reply
from daemon.orchestrator.ports import Clock, Leader, Sink, SystemClock, Timers
from daemon.orchestrator.queues import FairQueue
from daemon.orchestrator.registry import Peer, Registry
from daemon.orchestrator.tasks import Task
from daemon.protocol.task import (
    PEER_FAULT_CODES,
    ErrorInfo,
    TaskAbort,
    TaskAssign,
    TaskSubmit,
    WorkerReport,
)
from daemon.timers import TimerWheel

log = logging.getLogger(__name__)

# Worker rejections that hand a task back without counting against the peer.
NEUTRAL_REJECTIONS: Final = frozenset({"overloaded", "shutting_down", "timeout", "stale_epoch"})
# Tasks a single dispatch pass may set aside because their constraints fit no free peer.
MAX_PARKED: Final = 64


class Scheduler:
    def __init__(
        self,
        cfg: OrchestratorConfig,
        realm: str,
        registry: Registry,
        sink: Sink,
        leader: Leader,
        *,
        clock: Clock | None = None,
        timers: Callable[[Callable[[Task], None]], Timers[Task]] = TimerWheel,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.realm = realm
        self.registry = registry
        self.sink = sink
        self.leader = leader
        self.clock = clock or SystemClock()
        self.placement = Placement(
            registry, rng or random.Random(), self.clock, cfg.capability_wait
        )
        self.pick = self.placement.pick
        self.queues: dict[str, FairQueue[Task]] = {}
        self.tasks: dict[str, Task] = {}
        self.by_node: dict[str, set[str]] = {}
        self.finals = Finals(cfg.dedupe_size, sink)
        self.user_running: Counter[str] = Counter()
        self.user_roles: dict[str, str] = {}
        # One loop timer per tick in use rather than two per task (see timers.py).
        self.deadlines = timers(self._on_deadline)
        self.ack_timeouts = timers(self._on_ack_timeout)
        self.waits = timers(self._on_wait)
        self.active_since = self.clock.monotonic()  # the shell sets it on taking the lease
        self._node_topics: dict[str, str] = {}  # node id -> its task topic

    def close(self) -> None:
        self.deadlines.close()
        self.ack_timeouts.close()
        self.waits.close()

    # ============================================================ submission

    def join(
        self, submit: TaskSubmit, user: str, task_id: str, reply: str | None, corr: bytes | None
    ) -> bool:
        """A resubmission joins the task it repeats (see :meth:`Finals.join`)."""
        return self.finals.join(self.tasks, submit, user, task_id, reply=reply, corr=corr)

    def accept(
        self,
        submit: TaskSubmit,
        ident: Identity,
        task_id: str,
        *,
        reply: str | None,
        corr: bytes | None,
        input_bytes: int = 0,
    ) -> Task:
        """An admitted submission becomes a task: queued, or assigned at once.
        :class:`Refused` when no peer offers the capability (and none may soon: see
        :meth:`Placement.waits_for`) or its queue is full."""
        cap = submit.capability
        waiting = self.placement.waits_for(submit, self.active_since)
        q = self.queues.get(cap)
        if q is not None and q.full:
            raise Refused("queue_full", f"the {cap} queue is full ({q.maxsize})")
        user = ident.name
        self.user_roles[user] = ident.role
        wall, mono = self.clock.time(), self.clock.monotonic()
        timeout = submit.timeout or self.cfg.default_timeout
        deadline = min(submit.deadline or wall + timeout, wall + timeout)
        task = Task(
            id=task_id,
            submit=submit,
            user=user,
            role=ident.role,
            deadline=deadline,
            reply_topic=reply,
            correlation=corr,
            submitted=wall,
            submitted_mono=mono,
            input_bytes=input_bytes,
            peer_timeout=deadline - wall >= self.cfg.default_timeout * 0.999,
        )
        if submit.idempotency_key:
            self.finals.key(user, submit.idempotency_key, task_id)
        self.tasks[task_id] = task
        self.sink.accepted(task)
        self.arm_deadline(task)
        q = self.queue(cap)
        if waiting is not None:
            position = q.push(task)
            task.wait_key = self.waits.add_in(task, self.cfg.capability_wait)
            log.info("%s task %s waits: %s", cap, task_id, waiting)
            if submit.progress:
                self.finals.reply(task, "queued", position=position, waiting=waiting)
            return task
        # Nothing queued and a peer free: assign at once, as a push and dispatch's
        # pop would, without the round trip through the queue.
        free = self.registry.free.get(cap)
        idle = self.leader.active and not len(q) and free
        peer = self.pick(task) if idle and self._user_ok(user) else None
        if peer is None:
            position = q.push(task)
            if submit.progress:
                self.finals.reply(task, "queued", position=position)
            self.dispatch(cap)
        else:
            if submit.progress:
                self.finals.reply(task, "queued", position=0)
            self._assign(task, peer)
        return task

    def _on_wait(self, task: Task) -> None:
        task.wait_key = None
        if task.id not in self.tasks or task.state != "queued":
            return
        if self.placement.offered(task.submit):
            return  # offered now: it waits in the queue like any other
        cap, pin = task.capability, task.submit.constraints.node
        wanted = f"peer {pin!r} offering {cap!r}" if pin else f"peer offering {cap!r}"
        why = f"no {wanted} within {self.cfg.capability_wait:g} s"
        self._finish(task, "failed", error=ErrorInfo(code="unavailable", message=why))

    def queue(self, task_cap: str) -> FairQueue[Task]:
        q = self.queues.get(task_cap)
        if q is None:
            q = self.queues[task_cap] = FairQueue(self.cfg.queue_size)
        return q

    def arm_deadline(self, task: Task) -> None:
        task.deadline_key = self.deadlines.add_in(task, task.deadline - self.clock.time())

    def node_topic(self, node_id: str) -> str:
        topic = self._node_topics.get(node_id)
        if topic is None:
            topic = topics.NODE_TASK.build(realm=self.realm, node_id=node_id)
            if len(self._node_topics) < 4 * len(self.registry.peers) + 64:
                self._node_topics[node_id] = topic
        return topic

    def forget(self, node_id: str) -> None:
        """A peer the registry forgot."""
        self._node_topics.pop(node_id, None)

    # ============================================================ assignment

    def _user_ok(self, user: str) -> bool:
        # The role this user was admitted with (a token's role, not the name's).
        limits = self.cfg.roles.get(self.user_roles.get(user, self.cfg.anonymous_role))
        return (
            limits is None
            or limits.max_concurrent == 0
            or (self.user_running[user] < limits.max_concurrent)
        )

    def dispatch(self, cap: str) -> None:
        """Assign queued ``cap`` tasks to free peers, as long as both last."""
        if not self.leader.active:
            return
        q = self.queues.get(cap)
        free = self.registry.free.get(cap)
        if q is None or not len(q) or free is None or not len(free):
            return
        parked: list[Task] = []
        while len(q) and len(free):
            task = q.pop(self._user_ok)
            if task is None:
                break
            peer = self.pick(task)
            if peer is None:
                parked.append(task)
                if len(parked) >= MAX_PARKED:
                    break
                continue
            self._assign(task, peer)
        for task in reversed(parked):
            q.push(task, front=True)

    def dispatch_peer(self, node_id: str) -> None:
        """Something changed at ``node_id``: what it offers may be assigned."""
        peer = self.registry.peers.get(node_id)
        if peer is not None:
            for cap in peer.slots:
                self.dispatch(cap)

    def dispatch_all(self) -> None:
        for cap, q in self.queues.items():
            if len(q):
                self.dispatch(cap)

    def hold(self, task: Task, peer: Peer, *, attempt: int) -> None:
        """``task`` (attempt ``attempt``) is on ``peer`` now: its slot taken."""
        self.registry.take(peer, task.capability)
        task.attempt = attempt
        task.node = peer.node_id
        task.tried.add(peer.node_id)
        task.state = "assigned"
        mono = self.clock.monotonic()
        task.assigned_mono = mono
        if task.queue_ms is None:
            task.queue_ms = round((mono - task.submitted_mono) * 1000, 3)
        on_node = self.by_node.get(peer.node_id)
        if on_node is None:
            on_node = self.by_node[peer.node_id] = set()
        on_node.add(task.id)
        self.user_running[task.user] += 1

    def _assign(self, task: Task, peer: Peer) -> None:
        self.hold(task, peer, attempt=task.attempt + 1)
        self.sink.assigned(task)
        assign = TaskAssign(
            task_id=task.id,
            attempt=task.attempt,
            capability=task.capability,
            input=task.submit.input,
            deadline=task.deadline,
            user=task.user,
            stream=task.submit.stream,
            constraints=task.submit.constraints,
            reply=direct_reply(task, self.realm, self.cfg.direct_replies),
            epoch=self.leader.epoch,
        )
        expiry = max(1.0, task.deadline - self.clock.time())
        self.sink.post(self.node_topic(peer.node_id), assign, expiry=expiry)
        task.ack_key = self.ack_timeouts.add_in(task, self.cfg.ack_timeout)
        if task.submit.progress:
            self.finals.reply(task, "assigned", node=peer.node_id)

    def _release(self, task: Task) -> None:
        """Give back the slot an assigned task holds."""
        if task.node is None or task.state not in ("assigned", "running"):
            return
        self._cancel_ack(task)
        self.registry.give_back(task.node, task.capability, self.clock.monotonic())
        self.by_node.get(task.node, set()).discard(task.id)
        self.user_running[task.user] -= 1
        if self.user_running[task.user] <= 0:
            del self.user_running[task.user]
        task.state = "released"

    def _retry(self, task: Task, error: ErrorInfo) -> None:
        """Queue a released task again, or fail it when out of attempts."""
        if task.attempt >= self.cfg.max_attempts:
            self._finish(task, "failed", error=error)
            return
        task.node = None
        task.state = "queued"
        self.queue(task.capability).push(task, front=True)
        self.dispatch(task.capability)

    def _outcome(self, task: Task, ok: bool, run_ms: float | None = None) -> None:
        if task.node is not None:
            mono = self.clock.monotonic()
            self.registry.outcome(task.node, task.capability, ok, mono, run_ms)

    def _cancel_ack(self, task: Task) -> None:
        self.ack_timeouts.discard(task, task.ack_key)
        task.ack_key = None

    def _abort(self, task: Task, reason: str) -> None:
        if task.node is not None:
            abort = TaskAbort(task_id=task.id, attempt=task.attempt, reason=reason)
            self.sink.post(self.node_topic(task.node), abort)

    # ============================================================ timers

    def _on_ack_timeout(self, task: Task) -> None:
        task.ack_key = None
        if task.state != "assigned" or task.id not in self.tasks:
            return
        since = self.sink.hearing_since()
        if since is None or self.clock.monotonic() - since < self.cfg.ack_timeout:
            # We could not have heard the acknowledgement (no broker, or only just
            # back: the worker's report waits in its outbox): wait once more.
            task.ack_key = self.ack_timeouts.add_in(task, self.cfg.ack_timeout)
            return
        node = task.node
        log.warning("%s did not acknowledge task %s; reassigning", node, task.id)
        self._outcome(task, ok=False)
        self._abort(task, "not acknowledged in time")
        self._release(task)
        self._retry(task, ErrorInfo(code="no_ack", message=f"{node} did not acknowledge"))

    def _on_deadline(self, task: Task) -> None:
        task.deadline_key = None
        if task.id not in self.tasks:
            return
        if task.state in ("assigned", "running"):
            self._abort(task, "deadline")
            if task.peer_timeout:
                # The submitter's own short deadline says nothing of the peer.
                self._outcome(task, ok=False)
            self._release(task)
        self._finish(task, "failed", error=ErrorInfo(code="timeout", message="deadline passed"))

    # ============================================================ events

    def report(self, node_id: str, report: WorkerReport) -> None:
        """A worker's report (its topic names ``node_id``)."""
        task = self.tasks.get(report.task_id)
        if task is None:
            return  # already final: a late or duplicate report
        if task.node != node_id or task.attempt != report.attempt:
            # Only the (node, attempt) assigned now may move a task on: a report from
            # another node, an earlier attempt or before a restart is stale (or forged).
            log.debug("stale report for %s from %s (attempt %d)", task.id, node_id, report.attempt)
            return
        status = report.status
        if status in ("started", "partial") and task.state == "assigned":
            task.state = "running"
            task.started_mono = self.clock.monotonic()
            self._cancel_ack(task)
            if task.submit.progress:
                self.finals.reply(task, "started", node=node_id)
        if status == "partial":
            if task.submit.stream:
                self.finals.reply(task, "partial", output=report.output)
        elif status in ("done", "failed"):
            self.finish_reported(task, report)
        elif status == "rejected":
            error = report.error or ErrorInfo(code="rejected", message="worker rejected")
            if error.code not in NEUTRAL_REJECTIONS:
                self._outcome(task, ok=False)
            self._release(task)
            self._retry(task, error)

    def peer_lost(self, node_id: str, why: str) -> None:
        """``node_id`` is gone (will, or silent): its tasks are retried elsewhere."""
        for task_id in list(self.by_node.get(node_id, ())):
            task = self.tasks.get(task_id)
            if task is not None:
                self._release(task)
                self._retry(task, ErrorInfo(code="worker_lost", message=f"{node_id} {why}"))

    def cancel(self, task_id: str, ident: Identity | None, reason: str | None) -> bool:
        """Cancel an active task; ``ident`` None: the realm itself (a sysop op, a
        workflow).  False when there is no such active task."""
        task = self.tasks.get(task_id)
        if task is None:
            return False
        privileged = ident is None or ident.role in ("sysop", "orchestrator")
        if not privileged and ident is not None and ident.name != task.user:
            raise Refused("forbidden", "only the submitter or a sysop may cancel a task")
        if task.state in ("assigned", "running"):
            self._abort(task, reason or "cancelled")
            self._release(task)
        why = reason or "cancelled"
        self._finish(task, "cancelled", error=ErrorInfo(code="cancelled", message=why))
        return True

    # ============================================================== finals

    def finish_reported(self, task: Task, report: WorkerReport) -> None:
        """A worker's final for ``task`` (now, or kept by a standby for the next active)."""
        if report.status == "done":
            run_ms = None
            if task.assigned_mono is not None:  # as this orchestrator saw it, not the worker
                run_ms = round((self.clock.monotonic() - task.assigned_mono) * 1000, 3)
            self._outcome(task, ok=True, run_ms=run_ms)
            self._release(task)
            if report.replied:  # the worker numbered its final after every relayed partial
                task.seq = max(task.seq, report.seq - 1)
            self._finish(
                task, "done", output=report.output, run_ms=report.run_ms, sent=report.replied
            )
            return
        error = report.error or ErrorInfo(code="internal", message="worker failed")
        if error.code in PEER_FAULT_CODES:  # a failure the input chose is not the peer's
            self._outcome(task, ok=False)
        self._release(task)
        self._finish(task, "failed", error=error, run_ms=report.run_ms)

    def _finish(
        self,
        task: Task,
        status: str,
        *,
        output: Any = None,
        error: ErrorInfo | None = None,
        run_ms: float | None = None,
        sent: bool = False,
    ) -> None:
        """Make a task final: answer the submitter (unless the worker already
        did: ``sent``), remember the answer for duplicates, record history."""
        if self.tasks.pop(task.id, None) is None:
            return
        self.queue(task.capability).discard(task)
        task.state = "final"
        self.deadlines.discard(task, task.deadline_key)
        self.waits.discard(task, task.wait_key)
        self._cancel_ack(task)
        task.deadline_key = task.wait_key = None
        total_ms = round((self.clock.monotonic() - task.submitted_mono) * 1000, 3)
        update = self.finals.reply(
            task, status, output=output, error=error, run_ms=run_ms, node=task.node, send=not sent
        )
        output_bytes = self.finals.remember(task.id, task.user, update, output)
        code = error.code if error else None
        row = task.history_row(
            status, code, run_ms=run_ms, total_ms=total_ms, output_bytes=output_bytes
        )
        self.sink.finished(task, row)
        self.dispatch(task.capability)

    def running(self) -> Counter[str]:
        """Tasks on a worker now, by capability."""
        return Counter(
            t.capability for t in self.tasks.values() if t.state in ("assigned", "running")
        )
