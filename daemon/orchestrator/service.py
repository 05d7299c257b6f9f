"""The orchestrator service (``mtor orchestrator``).

Everything is driven by messages and timers on one event loop:

* registry updates from node ``state`` / ``info`` / ``health``;
* submissions → validation, identity, limits, idempotency → a fair queue per
  capability → assignment to the best free peer (``policy``);
* worker reports → progress relayed to the submitter, exactly one final;
* timers: deadline per task, acknowledgement per assignment, a slow sweep for
  silent peers and breakers whose cool-down ended.

Reliability: an unacknowledged assignment or a peer that dies mid-task sends
the task back to the queue (bounded attempts); active tasks are journalled in
SQLite so a restarted orchestrator queues them again; duplicate finals (late
results from an earlier attempt) are dropped, so the client sees one result.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import secrets
import time
import uuid
from collections import Counter, OrderedDict
from typing import Any, Final, TypeGuard

from daemon import __version__, gctune, topics
from daemon.accounts import ORCHESTRATOR_ACCOUNT, Accounts
from daemon.bus import Bus, Inbound
from daemon.config import Config
from daemon.errors import BusError, ConfigError, MessageError
from daemon.messages import M, decode, now
from daemon.orchestrator import policy
from daemon.orchestrator.ha import HighAvailability, Mirrored, SteppedDown
from daemon.orchestrator.identity import (
    Identities,
    Identity,
    Refused,
    RequestLimiter,
    check_code,
)
from daemon.orchestrator.queues import FairQueue
from daemon.orchestrator.registry import Peer, Registry
from daemon.orchestrator.state import StateError
from daemon.orchestrator.stats import Stats
from daemon.orchestrator.store import Store
from daemon.orchestrator.tasks import Task, TokenBucket, bucket_for
from daemon.orchestrator.users import Users
from daemon.protocol.admin import OrchestratorState, OrchestratorStats
from daemon.protocol.node import NodeHealth, NodeInfo, NodeState
from daemon.protocol.task import (
    PEER_FAULT_CODES,
    Constraints,
    DirectReply,
    ErrorInfo,
    TaskAbort,
    TaskAssign,
    TaskCancel,
    TaskSubmit,
    TaskUpdate,
    WorkerReport,
)
from daemon.sdnotify import Notifier
from daemon.timers import TimerWheel

log = logging.getLogger(__name__)

SWEEP_INTERVAL: Final = 1.0
# How often (s) long-gone peers are looked for (a pass over the whole registry).
FORGET_INTERVAL: Final = 30.0
# Worker rejections that hand a task back without counting against the peer.
# How long a peer that went offline keeps its tasks before they are retried (s).
LOST_GRACE: Final = 2.0
NEUTRAL_REJECTIONS: Final = frozenset({"overloaded", "shutting_down", "timeout", "stale_epoch"})
# Tasks a single dispatch pass may set aside because their constraints fit no free peer.
MAX_PARKED: Final = 64
# Outputs of finished tasks kept for resubmissions, at most (bytes): 10,000 finals of
# 1 MiB echoes would otherwise hold 10 GB.
FINISHED_MAX_BYTES: Final = 64 * 1024 * 1024
# Random bytes in an orchestrator-made task id (not guessable, unlike a counter).
TASK_ID_BYTES: Final = 12

__all__ = ["Orchestrator", "Refused"]


# A final update as remembered for duplicates: the update, or how to make it.
RememberedFinal = TaskUpdate | functools.partial[TaskUpdate]


class Orchestrator:
    def __init__(self, config: Config, *, notifier: Notifier | None = None) -> None:
        self.config = config
        self.cfg = config.orchestrator
        self.realm = config.realm
        self.boot_id = uuid.uuid4().hex[:12]
        self.notifier = notifier or Notifier({})
        self.started = time.monotonic()
        self.state_topic = topics.ORCH_STATE.build(realm=self.realm)
        self.bus = Bus(
            config.broker,
            config.daemon_client_id("orchestrator"),
            password=config.broker_password(),
            will=(self.state_topic, self.offline_state()),
            session_expiry=config.broker.session_expiry,
            duplicate_hint=f"is a second orchestrator running for realm {self.realm!r}?",
        )
        self.registry = Registry(self.cfg.breaker)
        self.queues: dict[str, FairQueue[Task]] = {}
        self.tasks: dict[str, Task] = {}
        self.by_node: dict[str, set[str]] = {}
        self.idempotency: OrderedDict[tuple[str, str], str] = OrderedDict()
        # Finals remembered for resubmissions: (user, final, output size), bounded in
        # number (dedupe_size) and in bytes of output (FINISHED_MAX_BYTES).
        self.finished: OrderedDict[str, tuple[str, RememberedFinal, int]] = OrderedDict()
        self._finished_bytes = 0
        self.user_running: Counter[str] = Counter()
        self.user_roles: dict[str, str] = {}
        self.buckets: dict[str, TokenBucket] = {}
        self.stats = Stats()
        state_dir = self.cfg.state_dir
        self.store = Store(
            state_dir / "history.sqlite3",
            self.cfg.history_retention_days,
            self.cfg.history_max_rows,
        )
        self.users = Users(state_dir / "users.json")
        accounts_file = self.cfg.accounts_file
        self.accounts = Accounts(accounts_file, self.realm) if accounts_file else None
        self.identities = Identities(self.cfg, self.users, self.accounts)
        self.requests = RequestLimiter(self.cfg.requests)
        self.reply_root = topics.REPLY.filter(realm=self.realm).removesuffix("+/#")
        self.rng = random.Random()
        # One loop timer per tick in use rather than two per task (see timers.py).
        self.deadlines: TimerWheel[Task] = TimerWheel(self._on_deadline)
        self.ack_timeouts: TimerWheel[Task] = TimerWheel(self._on_ack_timeout)
        self._node_topics: dict[str, str] = {}  # node id -> its task topic
        self._report_nodes: dict[str, str] = {}  # report topic -> node id (known peers)
        self._online = asyncio.Event()
        from daemon.orchestrator.admin import Admin
        from daemon.orchestrator.state import RealmStateStore

        self.admin = Admin(self)
        self.state = RealmStateStore(
            self.bus,
            self.realm,
            self.cfg.state_values,
            strict=self.cfg.state_strict,
            authorise=self._authorise_state,
            reply_ok=self._reply_ok,
        )
        self._alarm_code = self._read_alarm_code()
        from daemon.workflows.realm import RealmWorkflows

        self.workflows = RealmWorkflows(self)
        self.ha = HighAvailability(self)
        self._served = False  # requests are taken (became active once)
        self._connected_at = 0.0  # the last (re)connect to the broker (monotonic)
        self._connects = 0

    def offline_state(self) -> OrchestratorState:
        return OrchestratorState(state="offline", boot_id=self.boot_id, version=__version__)

    # ============================================================== lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the realm; take requests once this instance holds the lease (see
        :mod:`daemon.orchestrator.ha`).  Raises :class:`SteppedDown` when a newer
        active took over from it."""
        await self.store.open()
        await self.admin.bootstrap_sysop()
        r = self.realm
        sub = self.bus.subscribe
        await sub(topics.NODE_STATE.filter(realm=r), self._on_state)
        await sub(topics.NODE_INFO.filter(realm=r), self._on_info)
        await sub(topics.NODE_HEALTH.filter(realm=r), self._on_health, qos=0)
        await sub(topics.TASK_WORKER.filter(realm=r), self._on_report)
        await self.ha.start()
        self.bus.on_connect(self._announce)
        if self.cfg.prometheus_port:
            self.stats.serve_prometheus(self.cfg.prometheus_host, self.cfg.prometheus_port)
        try:
            async with asyncio.TaskGroup() as tg:
                bus_task = tg.create_task(self.bus.run(), name="bus")
                background = [
                    tg.create_task(self.store.run(), name="store"),
                    tg.create_task(self._sweep_loop(), name="sweep"),
                    tg.create_task(self._stats_loop(), name="stats"),
                    tg.create_task(self._lead(stop), name="lease"),
                ]
                if self.notifier.watchdog_interval:
                    background.append(tg.create_task(self._watchdog(), name="watchdog"))
                await stop.wait()
                self.notifier.stopping()
                log.info("orchestrator shutting down (%d active tasks journalled)", len(self.tasks))
                for t in background:
                    t.cancel()
                if self._served:
                    await self.workflows.stop()
                await self._goodbye()
                await self.bus.drain(1.0)
                bus_task.cancel()
        finally:
            self.deadlines.close()
            self.ack_timeouts.close()
            await self.store.close()
            self.users.close()
        if self.ha.stepped_down is not None:
            raise SteppedDown(f"orchestrator {self.ha.stepped_down.holder!r} took over")

    async def _lead(self, stop: asyncio.Event) -> None:
        try:
            await self.ha.run()
        except SteppedDown:
            stop.set()

    async def _goodbye(self) -> None:
        """A clean stop: the lease free at once (a standby takes over without waiting),
        and the realm told the orchestrator is offline; a standby's own presence."""
        if not self.bus.connected:
            return
        released = self.ha.release()
        with contextlib.suppress(TimeoutError, BusError):
            async with asyncio.timeout(1.0):
                if released is not None:
                    await self.bus.publish(self.ha.lease_topic, released, retain=True)
                    await self.bus.publish(self.state_topic, self.offline_state(), retain=True)
                offline = self.ha.presence("offline")
                await self.bus.publish(self.ha.instance_topic, offline, retain=True)

    async def become_active(self, mirror: dict[str, Mirrored], *, took_over: bool) -> None:
        """This instance holds the lease: take requests, adopt what the previous
        active left (``mirror``; ``took_over``: this one stood by while another
        was active), announce (clients resubmit what they wait for)."""
        if not self._served:
            self._served = True
            if not took_over:
                await self._recover()  # this state_dir's own journal: no one else ran
            else:
                for doc in await self.store.load_active():
                    self.store.journal_remove(str(doc.get("id")))  # the mirror is newer
            r = self.realm
            sub = self.bus.subscribe
            await sub(topics.TASK_SUBMIT.filter(realm=r), self._on_submit)
            await sub(topics.TASK_CONTROL.filter(realm=r), self._on_control)
            await sub(topics.ORCH_ADMIN.filter(realm=r), self.admin.on_request)
            await self.state.start()
            await self.workflows.start()
            from daemon.homeassistant.realm import attach as attach_homeassistant

            bridge = await attach_homeassistant(self.bus, self.config)  # the realm device
            if self.bus.connected:
                await bridge.refresh()  # its discovery, now: later on every connect
        self._adopt(mirror)
        await self._announce()

    def _adopt(self, mirror: dict[str, Mirrored]) -> None:
        for task_id, m in mirror.items():
            if task_id in self.tasks:
                continue
            task = self._task_from(m.doc)
            if task is None:
                continue
            self.tasks[task.id] = task
            self.store.journal_add(task.id, task.submitted, task.journal_doc)
            self._arm_deadline(task)
            peer = self.registry.peers.get(m.node) if m.node else None
            if m.final is not None and m.node is not None:
                task.attempt, task.node = m.attempt, m.node
                self._finish_reported(task, m.final)
            elif peer is not None and task.capability in peer.slots:
                self._take_slot(task, peer, attempt=m.attempt)
                # The worker re-announces it to the new epoch ("started"); one that
                # does not within ack_timeout is presumed gone, the task retried.
                task.ack_key = self.ack_timeouts.add_in(task, self.cfg.ack_timeout)
            else:
                self._queue(task).push(task)
        if mirror:
            log.info("took over %d task(s) from the previous active", len(mirror))

    async def _announce(self) -> None:
        self._connected_at = time.monotonic()
        self._connects += 1
        if not self.ha.active:
            return
        online = OrchestratorState(
            state="online", boot_id=self.boot_id, version=__version__, epoch=self.ha.epoch
        )
        await self.bus.publish(self.state_topic, online, retain=True)
        if not self._online.is_set():
            self._online.set()
            log.info("orchestrator online (boot %s)", self.boot_id)
            self.notifier.ready("orchestrator online")
            gctune.settle()
        for cap in list(self.queues):
            self._dispatch(cap)

    async def _watchdog(self) -> None:
        assert self.notifier.watchdog_interval
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(self.notifier.watchdog_interval)

    @staticmethod
    def _task_from(doc: dict[str, Any]) -> Task | None:
        """A task from its journal document (this state_dir's, or a standby's mirror)."""
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
        except (KeyError, ValueError, TypeError) as exc:
            log.warning("dropping unreadable journal entry: %s", exc)
            return None

    async def _recover(self) -> None:
        """Queue again what the previous run left active (see module docstring)."""
        docs = await self.store.load_active()
        for doc in docs:
            task = self._task_from(doc)
            if task is None:
                continue
            self.tasks[task.id] = task
            self._queue(task).push(task)
            self._arm_deadline(task)
        if docs:
            log.info("recovered %d task(s) from the journal", len(docs))

    # ============================================================== registry

    async def _on_state(self, msg: Inbound) -> None:
        got = _node_message(msg, topics.NODE_STATE, NodeState)
        if got is None:
            return
        node_id, state = got
        if self.registry.on_state(node_id, state, time.monotonic()):
            log.info("peer %s went offline", node_id)
            # Not at once: a broker that shuts down sends every client's will (and a
            # moment later drops us too); the worker, back with the same boot, still
            # runs its tasks.  Retried only if it is still gone after the grace.
            asyncio.get_running_loop().call_later(
                LOST_GRACE, self._peer_lost_later, node_id, state.boot_id, self._connects
            )
        self._dispatch_peer(node_id)

    def _peer_lost_later(self, node_id: str, boot_id: str, connects: int) -> None:
        peer = self.registry.peers.get(node_id)
        if peer is not None and peer.online and peer.boot_id == boot_id:
            return  # back, same boot: its tasks are still its own
        if not self.bus.connected or self._connects != connects:
            # We lost the broker too since: wait until we can see again.
            asyncio.get_running_loop().call_later(
                LOST_GRACE, self._peer_lost_later, node_id, boot_id, self._connects
            )
            return
        self._peer_lost(node_id, "went offline")

    async def _on_info(self, msg: Inbound) -> None:
        got = _node_message(msg, topics.NODE_INFO, NodeInfo)
        if got is not None:
            node_id, info = got
            self.registry.on_info(node_id, self._authorised(node_id, info), time.monotonic())
            self._dispatch_peer(node_id)

    def _authorised(self, node_id: str, info: NodeInfo) -> NodeInfo:
        """The advert with only the capabilities this account may offer."""
        allowed = [c for c in info.capabilities if self.identities.may_offer(node_id, c.name)]
        if len(allowed) == len(info.capabilities):
            return info
        refused = sorted({c.name for c in info.capabilities} - {c.name for c in allowed})
        log.warning("%s may not offer %s: ignored", node_id, ", ".join(refused)[:200])
        return info.model_copy(update={"capabilities": allowed})

    async def _on_health(self, msg: Inbound) -> None:
        got = _node_message(msg, topics.NODE_HEALTH, NodeHealth)
        if got is not None:
            self.registry.on_health(got[0], got[1], time.monotonic())

    def _dispatch_peer(self, node_id: str) -> None:
        peer = self.registry.peers.get(node_id)
        if peer is not None:
            for cap in peer.slots:
                self._dispatch(cap)

    def _peer_lost(self, node_id: str, why: str) -> None:
        for task_id in list(self.by_node.get(node_id, ())):
            task = self.tasks.get(task_id)
            if task is not None:
                self._release(task)
                self._retry(task, ErrorInfo(code="worker_lost", message=f"{node_id} {why}"))

    async def _sweep_loop(self) -> None:
        next_forget = time.monotonic() + FORGET_INTERVAL
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = time.monotonic()
            for node_id in self.registry.sweep(now, self.cfg.stale_after):
                log.warning("peer %s missed its heartbeats; treating it as gone", node_id)
                self._peer_lost(node_id, "stopped sending heartbeats")
            self.registry.reopen_breakers(now)
            if now >= next_forget:
                next_forget = now + FORGET_INTERVAL
                for node_id in self.registry.forget(now, self.cfg.forget_after):
                    log.info("forgot peer %s (gone for over %.0fs)", node_id, self.cfg.forget_after)
                    self._node_topics.pop(node_id, None)
                    report = topics.TASK_WORKER.build(realm=self.realm, node_id=node_id)
                    self._report_nodes.pop(report, None)
            for cap, q in self.queues.items():
                if len(q):
                    self._dispatch(cap)

    # ============================================================ submission

    async def _on_submit(self, msg: Inbound) -> None:
        if not self.ha.active:
            return  # stepped down: the active one answers (clients resubmit to it)
        # Submissions are limited per user and role by admission (_admit), not here.
        account = self.request_account(msg, topics.TASK_SUBMIT, "task", limited=False)
        if account is None:
            return
        reply_topic = msg.response_topic
        try:
            submit = decode(msg.payload, TaskSubmit)
        except MessageError as exc:
            log.warning("rejected submission from %s: %s (payload %s)", account, exc, msg.preview())
            if self._reply_ok(reply_topic, account):
                self._send(
                    reply_topic,
                    msg.correlation_data,
                    TaskUpdate(
                        task_id="invalid",
                        status="failed",
                        error=ErrorInfo(code=exc.code, message=str(exc)),
                    ),
                )
            return
        reply_topic = reply_topic or submit.reply_to
        if reply_topic is not None and not self._reply_ok(reply_topic, account):
            log.warning(
                "submission from %s with reply topic %r outside %s%s/ dropped",
                account,
                reply_topic[:200],
                self.reply_root,
                account,
            )
            return
        task_id = submit.task_id or secrets.token_urlsafe(TASK_ID_BYTES)
        try:
            ident = self.identify(account, submit.token, submit.user)
            user, role = ident.name, ident.role
            # A resubmission joins (or gets the result of) the task it repeats;
            # it is checked before admission so a cached result is never refused.
            if self._join_existing(submit, user, task_id, reply_topic, msg):
                return
            self._admit(submit, user, role)
            self.user_roles[user] = role
        except Refused as exc:
            update = TaskUpdate(
                task_id=task_id,
                status="failed",
                error=ErrorInfo(code=exc.code, message=str(exc)),
                correlation=submit.correlation,
            )
            log.info("refused %s task from %s: %s", submit.capability, account, exc)
            if reply_topic:
                self._send(reply_topic, msg.correlation_data, update)
            return
        now = time.time()
        timeout = submit.timeout or self.cfg.default_timeout
        deadline = min(submit.deadline or now + timeout, now + timeout)
        task = Task(
            id=task_id,
            submit=submit,
            user=user,
            role=role,
            deadline=deadline,
            reply_topic=reply_topic,
            correlation=msg.correlation_data,
            input_bytes=len(msg.payload),
            peer_timeout=deadline - now >= self.cfg.default_timeout * 0.999,
        )
        if submit.idempotency_key:
            self.idempotency[(user, submit.idempotency_key)] = task_id
            while len(self.idempotency) > self.cfg.dedupe_size:
                self.idempotency.popitem(last=False)
        self.tasks[task_id] = task
        self.store.journal_add(task_id, task.submitted, task.journal_doc)
        self.ha.accepted(task)
        self._arm_deadline(task)
        q = self._queue(task)
        # Nothing queued and a peer free: assign at once, as a push and _dispatch's
        # pop would, without the round trip through the queue.
        free = self.registry.free.get(submit.capability)
        peer = self._pick(task) if not len(q) and free and self._user_ok(user) else None
        if peer is None:
            position = q.push(task)
            if submit.progress:
                self._reply(task, "queued", position=position)
            self._dispatch(submit.capability)
            return
        if submit.progress:
            self._reply(task, "queued", position=0)
        self._assign(task, peer)

    def _join_existing(
        self,
        submit: TaskSubmit,
        user: str,
        task_id: str,
        reply_topic: str | None,
        msg: Inbound,
    ) -> bool:
        existing_id = task_id if submit.task_id else None
        if submit.idempotency_key:
            existing_id = self.idempotency.get((user, submit.idempotency_key), existing_id)
        if existing_id is None:
            return False
        done = self.finished.get(existing_id)
        if done is not None:
            owner, made, _ = done
            final = made if isinstance(made, TaskUpdate) else made()
            if owner != user:
                raise Refused("conflict", f"task id {existing_id!r} belongs to another user")
            if reply_topic:
                final = final.model_copy(update={"correlation": submit.correlation})
                self._send(reply_topic, msg.correlation_data, final)
            return True
        live = self.tasks.get(existing_id)
        if live is None:
            return False
        if live.user != user:
            raise Refused("conflict", f"task id {existing_id!r} belongs to another user")
        if reply_topic:
            watcher = (reply_topic, msg.correlation_data, submit.correlation)
            primary = (live.reply_topic, live.correlation)
            if watcher[:2] != primary and watcher not in live.watchers:
                live.watchers.append(watcher)
        return True

    def identify(
        self, account: str, token: str | None = None, on_behalf: str | None = None
    ) -> Identity:
        """Who a request from ``account`` (its topic's identity level) is for, and
        with which role; :class:`Refused` when unknown, unauthorised or banned."""
        return self.identities.identify(account, token, on_behalf)

    def request_account(
        self, msg: Inbound, pattern: topics.TopicPattern, what: str, *, limited: bool = True
    ) -> str | None:
        """The account a request topic names, or None when the request is not served:
        not of ``pattern``, retained (it would be served again at every start), or, when
        ``limited``, over the account's rate (``orchestrator.requests``; the
        orchestrator's own is not)."""
        fields = pattern.parse(msg.topic)
        if fields is None:
            return None
        account = fields["user"]
        if msg.retain:
            log.warning("retained %s request from %s ignored", what, account[:64])
            return None
        if limited and account != ORCHESTRATOR_ACCOUNT and not self.requests.allow(account):
            log.warning("%s requests from %s over the rate limit: dropped", what, account[:64])
            return None
        return account

    def _reply_ok(self, topic: str | None, account: str) -> TypeGuard[str]:
        """May ``account`` be answered on ``topic``?  Only inside its own reply space
        (``reply/<account>/...``): the orchestrator writes nowhere else for anyone."""
        return (
            topics.valid_reply_topic(topic)
            and topic.startswith(self.reply_root)
            and topic[len(self.reply_root) :].startswith(account + "/")
        )

    def _read_alarm_code(self) -> str | None:
        if self.cfg.alarm_code is not None:
            return self.cfg.alarm_code.get_secret_value()
        if self.cfg.alarm_code_file is not None:
            try:
                code = self.cfg.alarm_code_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"orchestrator.alarm_code_file: cannot read {self.cfg.alarm_code_file}: "
                    f"{exc.strerror}"
                ) from exc
            if not code:  # the panel would ask for a code nobody checks
                path = self.cfg.alarm_code_file
                raise ConfigError(f"orchestrator.alarm_code_file: {path} is empty")
            return code
        return None

    def _authorise_state(self, account: str, key: str, value: Any, code: str | None) -> str:
        """May ``account`` set realm state ``key`` to ``value``?  Returns who it is (for
        the record); raises StateError.  Roles per key (``orchestrator.state_roles``), a
        rate limit per identity, and the alarm code for disarming."""
        if not self.requests.allow(account):
            raise StateError("rate_limited", f"{account} sends state requests too fast")
        try:
            ident = self.identify(account)
        except Refused as exc:
            raise StateError(exc.code, str(exc)) from exc
        roles = self.cfg.state_roles
        allowed = roles.get(key, roles.get("*", []))
        if ident.role not in allowed:
            raise StateError("forbidden", f"a {ident.role} may not set {key!r}")
        if key == "armed" and value == "disarmed" and not check_code(self._alarm_code, code):
            raise StateError("bad_code", "disarming needs the alarm code")
        return ident.name

    def _admit(self, submit: TaskSubmit, user: str, role: str) -> None:
        limits = self.cfg.roles.get(role)
        if limits is not None:
            bucket = self.buckets.get(user)
            if bucket is None:
                bucket = self.buckets[user] = bucket_for(limits)
            if not bucket.take(time.monotonic()):
                raise Refused("rate_limited", f"user {user!r} exceeds {limits.rate_per_s:g}/s")
        if not self.registry.offered(submit.capability):
            raise Refused("unavailable", f"no peer offers {submit.capability!r}")
        q = self.queues.get(submit.capability)
        if q is not None and q.full:
            raise Refused("queue_full", f"the {submit.capability} queue is full ({q.maxsize})")
        if submit.deadline is not None and submit.deadline <= time.time():
            raise Refused("timeout", "the deadline has already passed")

    def _queue(self, task: Task) -> FairQueue[Task]:
        q = self.queues.get(task.capability)
        if q is None:
            q = self.queues[task.capability] = FairQueue(self.cfg.queue_size)
        return q

    def _arm_deadline(self, task: Task) -> None:
        task.deadline_key = self.deadlines.add_in(task, task.deadline - time.time())

    def _node_topic(self, node_id: str) -> str:
        topic = self._node_topics.get(node_id)
        if topic is None:
            topic = topics.NODE_TASK.build(realm=self.realm, node_id=node_id)
            if len(self._node_topics) < 4 * len(self.registry.peers) + 64:
                self._node_topics[node_id] = topic
        return topic

    # ============================================================ assignment

    def _user_ok(self, user: str) -> bool:
        # The role this user was admitted with (a token's role, not the name's).
        limits = self.cfg.roles.get(self.user_roles.get(user, self.cfg.anonymous_role))
        return (
            limits is None
            or limits.max_concurrent == 0
            or (self.user_running[user] < limits.max_concurrent)
        )

    def _dispatch(self, cap: str) -> None:
        if not self.ha.active:
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
            peer = self._pick(task)
            if peer is None:
                parked.append(task)
                if len(parked) >= MAX_PARKED:
                    break
                continue
            self._assign(task, peer)
        for task in reversed(parked):
            q.push(task, front=True)

    def _pick(self, task: Task) -> Peer | None:
        cap = task.capability
        free = self.registry.free[cap]
        c = task.submit.constraints
        if c.node:
            ids = [c.node] if c.node in free else []
        else:
            ids = free.sample(policy.SAMPLE_SIZE, self.rng)
            constrained = _has_constraints(c)
            if constrained or task.tried:
                fitting = [i for i in ids if self._fits(i, task)]
                if not fitting and len(free) > len(ids):
                    fitting = [i for i in free.items if self._fits(i, task)]
                ids = fitting
        if not ids:
            return None
        now = time.monotonic()
        if len(ids) == 1:  # nothing to compare: what policy.choose would say of one
            peer = self.registry.peers[ids[0]]
            slot = peer.slots[cap]
            if not slot.breaker.allows(now):
                self.registry.refresh(peer, cap, now)
                return None
            return peer if slot.in_use < slot.capacity else None
        candidates = []
        for node_id in ids:
            peer = self.registry.peers[node_id]
            slot = peer.slots[cap]
            if not slot.breaker.allows(now):
                self.registry.refresh(peer, cap, now)
                continue
            local = c.prefer_local and node_id == task.submit.origin
            candidates.append(peer.candidate(cap, local=local))
        best = policy.choose(candidates)
        return self.registry.peers[best.node_id] if best else None

    def _fits(self, node_id: str, task: Task) -> bool:
        peer = self.registry.peers[node_id]
        if node_id in task.tried and len(task.tried) < len(self.registry.index[task.capability]):
            return False
        c = task.submit.constraints
        if c.accelerator and not peer.has_accelerator:
            return False
        return peer.slots[task.capability].offers(c.backend, c.model, c.language)

    def _take_slot(self, task: Task, peer: Peer, *, attempt: int) -> None:
        """``task`` is (attempt ``attempt``) on ``peer`` now: its slot taken."""
        slot = peer.slots[task.capability]
        slot.in_use += 1
        slot.breaker.on_assign()
        self.registry.refresh(peer, task.capability)
        task.attempt = attempt
        task.node = peer.node_id
        task.tried.add(peer.node_id)
        task.state = "assigned"
        now = time.monotonic()
        task.assigned_mono = now
        if task.queue_ms is None:
            task.queue_ms = round((now - task.submitted_mono) * 1000, 3)
        on_node = self.by_node.get(peer.node_id)
        if on_node is None:
            on_node = self.by_node[peer.node_id] = set()
        on_node.add(task.id)
        self.user_running[task.user] += 1

    def _assign(self, task: Task, peer: Peer) -> None:
        self._take_slot(task, peer, attempt=task.attempt + 1)
        self.ha.assigned(task)
        assign = TaskAssign(
            task_id=task.id,
            attempt=task.attempt,
            capability=task.capability,
            input=task.submit.input,
            deadline=task.deadline,
            user=task.user,
            stream=task.submit.stream,
            constraints=task.submit.constraints,
            reply=self._direct_reply(task),
            epoch=self.ha.epoch,
        )
        expiry = max(1.0, task.deadline - time.time())
        self.bus.post(self._node_topic(peer.node_id), assign, expiry=expiry)
        task.ack_key = self.ack_timeouts.add_in(task, self.cfg.ack_timeout)
        if task.submit.progress:
            self._reply(task, "assigned", node=peer.node_id)

    def _direct_reply(self, task: Task) -> DirectReply | None:
        """Where the worker may send ``done`` itself: only the first attempt of a task
        whose submitter asked for it and gets no other update from us in between."""
        submit = task.submit
        if not (self.cfg.direct_replies and submit.direct and submit.reply_key):
            return None
        if task.attempt != 1 or task.watchers:
            return None
        if submit.progress:
            return None  # 'started' would come from us, numbered after the worker's final
        topic = self._direct_topic(task)
        if topic is None:
            return None
        return DirectReply(
            topic=topic,
            key=submit.reply_key,
            correlation_data=task.correlation.hex() if task.correlation else None,
            correlation=submit.correlation,
            seq=task.seq,
            queue_ms=task.queue_ms,
        )

    def _direct_topic(self, task: Task) -> str | None:
        """``reply/<account>/<x>/direct`` beside the task's reply topic
        ``reply/<account>/<x>/...``: the only reply topics the generated ACL lets node
        accounts write, and the submitter drops what lacks its reply_key there."""
        fields = topics.REPLY.parse(task.reply_topic or "")
        if fields is None:
            return None
        first = fields["rest"].split("/", 1)[0]
        return topics.REPLY.build(realm=self.realm, user=fields["user"], rest=f"{first}/direct")

    def _release(self, task: Task) -> None:
        """Give back the slot an assigned task holds."""
        if task.node is None or task.state not in ("assigned", "running"):
            return
        self._cancel_ack(task)
        peer = self.registry.peers.get(task.node)
        if peer is not None:
            slot = peer.slots.get(task.capability)
            if slot is not None:
                slot.in_use = max(0, slot.in_use - 1)
                slot.breaker.probing = False
            self.registry.refresh(peer, task.capability, time.monotonic())
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
        self._queue(task).push(task, front=True)
        self._dispatch(task.capability)

    def _peer_outcome(self, task: Task, ok: bool, run_ms: float | None = None) -> None:
        peer = self.registry.peers.get(task.node or "")
        if peer is None:
            return
        slot = peer.slots.get(task.capability)
        if slot is None:
            return
        slot.record(ok, run_ms)
        if ok:
            closed = slot.breaker.state == "closed"
            slot.breaker.on_success()
            if closed:
                return  # nothing that decides whether the peer is free has changed
        else:
            was = slot.breaker.state
            slot.breaker.on_failure(time.monotonic())
            if slot.breaker.state == "open" and was != "open":
                log.warning(
                    "blacklisted %s for %s for %.0fs (trip %d)",
                    peer.node_id,
                    task.capability,
                    slot.breaker.open_until - time.monotonic(),
                    slot.breaker.trips,
                )
        self.registry.refresh(peer, task.capability, time.monotonic())

    @staticmethod
    def _measured_ms(task: Task) -> float | None:
        """Assignment to result as this orchestrator saw it (never the worker's own word)."""
        if task.assigned_mono is None:
            return None
        return round((time.monotonic() - task.assigned_mono) * 1000, 3)

    def _cancel_ack(self, task: Task) -> None:
        self.ack_timeouts.discard(task, task.ack_key)
        task.ack_key = None

    def _on_ack_timeout(self, task: Task) -> None:
        task.ack_key = None
        if task.state != "assigned" or task.id not in self.tasks:
            return
        if not self.bus.connected or time.monotonic() - self._connected_at < self.cfg.ack_timeout:
            # We could not have heard the acknowledgement (no broker, or only just
            # back: the worker's report waits in its outbox): wait once more.
            task.ack_key = self.ack_timeouts.add_in(task, self.cfg.ack_timeout)
            return
        node = task.node
        log.warning("%s did not acknowledge task %s; reassigning", node, task.id)
        self._peer_outcome(task, ok=False)
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
                self._peer_outcome(task, ok=False)
            self._release(task)
        self._finish(task, "failed", error=ErrorInfo(code="timeout", message="deadline passed"))

    def _abort(self, task: Task, reason: str) -> None:
        if task.node is None:
            return
        abort = TaskAbort(task_id=task.id, attempt=task.attempt, reason=reason)
        self.bus.post(self._node_topic(task.node), abort)

    # ============================================================= reports

    async def _on_report(self, msg: Inbound) -> None:
        node_id = self._report_nodes.get(msg.topic)
        if node_id is None:
            fields = topics.TASK_WORKER.parse(msg.topic)
            if fields is None:
                return
            node_id = fields["node_id"]
            if node_id in self.registry.peers:  # bounded: only known peers are remembered
                self._report_nodes[msg.topic] = node_id
        try:
            report = decode(msg.payload, WorkerReport)
        except MessageError as exc:
            log.warning("bad report from %s: %s (%s)", node_id, exc, msg.preview())
            return
        self.registry.seen(node_id, time.monotonic())
        if not self.ha.active:
            self.ha.on_report(node_id, report)
            return
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
            task.started_mono = time.monotonic()
            self._cancel_ack(task)
            if task.submit.progress:
                self._reply(task, "started", node=node_id)
        if status == "partial":
            if task.submit.stream:
                self._reply(task, "partial", output=report.output)
        elif status in ("done", "failed"):
            self._finish_reported(task, report)
        elif status == "rejected":
            error = report.error or ErrorInfo(code="rejected", message="worker rejected")
            if error.code not in NEUTRAL_REJECTIONS:
                self._peer_outcome(task, ok=False)
            self._release(task)
            self._retry(task, error)

    # ============================================================== finals

    def _finish_reported(self, task: Task, report: WorkerReport) -> None:
        """A worker's final for ``task`` (now, or kept by a standby for the next active)."""
        if report.status == "done":
            self._peer_outcome(task, ok=True, run_ms=self._measured_ms(task))
            self._release(task)
            if report.replied:  # the worker numbered its final after every relayed partial
                task.seq = max(task.seq, report.seq - 1)
            self._finish(
                task, "done", output=report.output, run_ms=report.run_ms, sent=report.replied
            )
            return
        error = report.error or ErrorInfo(code="internal", message="worker failed")
        if error.code in PEER_FAULT_CODES:  # a failure the input chose is not the peer's
            self._peer_outcome(task, ok=False)
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
        self.ha.finished(task.id)
        self._queue(task).discard(task)
        task.state = "final"
        self.deadlines.discard(task, task.deadline_key)
        self._cancel_ack(task)
        task.deadline_key = None
        total_ms = round((time.monotonic() - task.submitted_mono) * 1000, 3)
        update = self._reply(
            task, status, output=output, error=error, run_ms=run_ms, node=task.node, send=not sent
        )
        output_bytes = _size(output)
        self.finished[task.id] = (task.user, update, output_bytes)
        self._finished_bytes += output_bytes
        while len(self.finished) > self.cfg.dedupe_size or (
            self._finished_bytes > FINISHED_MAX_BYTES and len(self.finished) > 1
        ):
            self._finished_bytes -= self.finished.popitem(last=False)[1][2]
        self.store.journal_remove(task.id)
        self.store.record(
            {
                "task_id": task.id,
                "user": task.user,
                "capability": task.capability,
                "node": task.node,
                "priority": task.submit.priority,
                "submitted": task.submitted,
                "queue_ms": task.queue_ms,
                "run_ms": run_ms,
                "total_ms": total_ms,
                "outcome": status,
                "error_code": error.code if error else None,
                "attempts": task.attempt,
                "input_bytes": task.input_bytes,
                "output_bytes": output_bytes,
            }
        )
        self.stats.record(task.capability, status, total_ms)
        self._dispatch(task.capability)

    def _reply(
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
            self._send(task.reply_topic, task.correlation, update)
        for topic, correlation, text in task.watchers:
            self._send(topic, correlation, update.model_copy(update={"correlation": text}))
        return update

    def _send(self, topic: str, correlation: bytes | None, update: TaskUpdate) -> None:
        self.bus.post(topic, update, correlation_data=correlation)

    # ============================================================== control

    async def _on_control(self, msg: Inbound) -> None:
        if not self.ha.active:
            return
        account = self.request_account(msg, topics.TASK_CONTROL, "control", limited=False)
        if account is None:
            return
        try:
            cancel = decode(msg.payload, TaskCancel)
        except MessageError as exc:
            log.warning("bad control message from %s: %s (%s)", account, exc, msg.preview())
            return
        try:
            ident = self.identify(account, cancel.token, cancel.user)
            ok = self.cancel(cancel.task_id, ident, cancel.reason)
        except Refused as exc:
            log.warning("refused cancel of %s by %s: %s", cancel.task_id, account, exc)
            return
        if not ok:
            log.info("cancel of unknown or finished task %s", cancel.task_id)

    def cancel(self, task_id: str, ident: Identity | None, reason: str | None) -> bool:
        """Cancel an active task; ``ident`` None: the realm itself (a sysop op, a workflow)."""
        task = self.tasks.get(task_id)
        if task is None:
            return False
        privileged = ident is None or ident.role in ("sysop", "orchestrator")
        if not privileged and ident is not None and ident.name != task.user:
            raise Refused("forbidden", "only the submitter or a sysop may cancel a task")
        if task.state in ("assigned", "running"):
            self._abort(task, reason or "cancelled")
            self._release(task)
        self._finish(
            task,
            "cancelled",
            error=ErrorInfo(code="cancelled", message=reason or "cancelled"),
        )
        return True

    # ================================================================ stats

    async def _stats_loop(self) -> None:
        topic = topics.ORCH_STATS.build(realm=self.realm)
        while True:
            await asyncio.sleep(self.cfg.stats_interval)
            if not self.ha.active:
                continue
            try:
                await self.bus.publish(
                    topic, self.snapshot(periodic=True), qos=0, retain=True, wait=False
                )
            except (BusError, MessageError):  # one bad snapshot never ends the TaskGroup
                log.exception("orchestrator stats not published")

    def snapshot(self, *, periodic: bool = False) -> OrchestratorStats:
        running: Counter[str] = Counter(
            t.capability for t in self.tasks.values() if t.state in ("assigned", "running")
        )
        queues = {cap: len(q) for cap, q in self.queues.items()}
        peers = {}
        online = 0
        for p in self.registry.peers.values():
            online += p.available
            peers[p.node_id] = {
                "online": p.online and not p.stale,
                "drained": p.drained,
                "blacklisted": p.blacklisted,
                "slots": {
                    name: {
                        "in_use": s.in_use,
                        "capacity": s.capacity,
                        "latency_ms": round(s.latency_ms, 3) if s.latency_ms else None,
                        "success": round(s.success, 3),
                        "breaker": s.breaker.state,
                    }
                    for name, s in p.slots.items()
                },
            }
        self.stats.gauges(queues, online)
        return OrchestratorStats(
            uptime_s=round(time.monotonic() - self.started, 1),
            peers_online=online,
            queues=queues,
            running=dict(running),
            completed=dict(self.stats.completed),
            failed=dict(self.stats.failed),
            throughput_per_s=self.stats.throughput(reset=periodic),
            latency_ms=self.stats.latency(),
            peers=peers,
        )


def _node_message(msg: Inbound, pattern: topics.TopicPattern, cls: type[M]) -> tuple[str, M] | None:
    """(node id, validated message) of a node's retained/periodic topic, or None.

    An empty payload (a cleared retained topic) is ignored; a malformed one is logged.
    """
    fields = pattern.parse(msg.topic)
    if fields is None or not msg.payload:
        return None
    try:
        return fields["node_id"], decode(msg.payload, cls)
    except MessageError as exc:
        log.warning("bad %s from %s: %s", cls.TYPE, fields["node_id"], exc)
        return None


def _has_constraints(c: Constraints) -> bool:
    return bool(c.accelerator or c.language or c.backend or c.model)


def _size(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, str | bytes):
        return len(value)
    return len(repr(value))
