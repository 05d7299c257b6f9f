"""The orchestrator service (``mtor orchestrator``): the MQTT shell around the
scheduling core.

It wires the parts, each testable on its own:

* :class:`~daemon.orchestrator.registry.Registry` — every peer, what it offers and
  how it is doing, from node ``state`` / ``info`` / ``health``;
* :class:`~daemon.orchestrator.admission.Admission` — who a request is from
  (the broker's identity), rates, bans, reply topics;
* :class:`~daemon.orchestrator.core.Scheduler` — the sans-IO core: queues,
  assignment, acknowledgements, retries, finals, worker loss, recovery;
* :class:`~daemon.orchestrator.ha.HighAvailability` — the lease: exactly one
  active orchestrator per realm, fenced by an epoch;
* the journal and history (:class:`~daemon.orchestrator.store.Store`), admin,
  realm state, realm workflows and the swarm's auctioneer (missions naming the
  orchestrator, recorded in the history as ``swarm.mission``).

This module decodes what arrives, hands it to the part it is for, and is the
core's :class:`~daemon.orchestrator.core.Sink` (posts on the bus, journals,
replicates, records).  Timers: deadlines and acknowledgements in the core, a
slow sweep here for silent peers and breakers whose cool-down ended.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from typing import Any, Final

from daemon import __version__, gctune, topics
from daemon.accounts import ORCHESTRATOR_ACCOUNT, Accounts
from daemon.bus import Bus, Inbound
from daemon.config import Config
from daemon.errors import BusError, MessageError
from daemon.messages import M, Message, decode
from daemon.orchestrator import recovery
from daemon.orchestrator.admin import Admin
from daemon.orchestrator.admission import Admission, Submission
from daemon.orchestrator.core import Scheduler
from daemon.orchestrator.ha import HighAvailability, SteppedDown
from daemon.orchestrator.identity import Refused
from daemon.orchestrator.registry import Registry
from daemon.orchestrator.state import RealmStateStore
from daemon.orchestrator.stats import Stats
from daemon.orchestrator.store import Store
from daemon.orchestrator.tasks import Mirrored, Task
from daemon.orchestrator.users import Users
from daemon.protocol.admin import OrchestratorState, OrchestratorStats
from daemon.protocol.node import NodeHealth, NodeInfo, NodeState
from daemon.protocol.task import ErrorInfo, TaskCancel, TaskUpdate, WorkerReport
from daemon.sdnotify import Notifier
from daemon.swarm.auctioneer import Auctioneer, MissionRecord
from daemon.workflows.realm import RealmWorkflows

log = logging.getLogger(__name__)

SWEEP_INTERVAL: Final = 1.0
# How often (s) long-gone peers are looked for (a pass over the whole registry).
FORGET_INTERVAL: Final = 30.0
# How long a peer that went offline keeps its tasks before they are retried (s).
LOST_GRACE: Final = 2.0
# Random bytes in an orchestrator-made task id (not guessable, unlike a counter).
TASK_ID_BYTES: Final = 12

__all__ = ["Orchestrator", "Refused"]


class Orchestrator:
    def __init__(self, config: Config, *, notifier: Notifier | None = None) -> None:
        self.config = config
        self.cfg = cfg = config.orchestrator
        self.realm = realm = config.realm
        self.boot_id = uuid.uuid4().hex[:12]
        self.notifier = notifier or Notifier({})
        self.started = time.monotonic()
        self.state_topic = topics.ORCH_STATE.build(realm=realm)
        self.bus = Bus(
            config.broker,
            config.daemon_client_id("orchestrator"),
            password=config.broker_password(),
            will=(self.state_topic, self.offline_state()),
            session_expiry=config.broker.session_expiry,
            duplicate_hint=f"is a second orchestrator running for realm {realm!r}?",
        )
        self.stats = Stats()
        self.store = Store(
            cfg.state_dir / "history.sqlite3", cfg.history_retention_days, cfg.history_max_rows
        )
        self.users = Users(cfg.state_dir / "users.json")
        accounts = Accounts(cfg.accounts_file, realm) if cfg.accounts_file else None
        self.admission = Admission(cfg, realm, self.users, accounts)
        self.registry = Registry(cfg.breaker)
        self.ha = HighAvailability(
            cfg,
            realm,
            cfg.instance or config.effective_node_id,
            self.bus,
            self.boot_id,
            tasks={},  # replaced by the core's table below
            on_active=self.become_active,
            offline=(self.state_topic, self.offline_state()),
        )
        self.core = Scheduler(cfg, realm, self.registry, self, self.ha)
        self.ha.tasks = self.tasks = self.core.tasks
        self.admin = Admin(
            state_dir=cfg.state_dir,
            admission=self.admission,
            users=self.users,
            scheduler=self.core,
            store=self.store,
            stats=self.snapshot,
            reply=self._post_reply,
        )
        self.state = RealmStateStore(
            self.bus,
            realm,
            cfg.state_values,
            strict=cfg.state_strict,
            authorise=self.admission.authorise_state,
            reply_ok=self.admission.reply_ok,
        )
        self.workflows = RealmWorkflows(
            config,
            self.bus,
            state=self.state,
            registry=self.registry,
            store=self.store,
            admission=self.admission,
        )
        self.auctioneer: Auctioneer | None = None  # once active
        self._report_nodes: dict[str, str] = {}  # report topic -> node id (known peers)
        self._online = asyncio.Event()
        self._served = False  # requests are taken (became active once)
        self._connected_at = 0.0  # the last (re)connect to the broker (monotonic)
        self._connects = 0

    def offline_state(self) -> OrchestratorState:
        return OrchestratorState(state="offline", boot_id=self.boot_id, version=__version__)

    # ============================================================== the core's sink

    def post(
        self,
        topic: str,
        message: Message,
        *,
        correlation_data: bytes | None = None,
        expiry: float | None = None,
    ) -> None:
        self.bus.post(topic, message, correlation_data=correlation_data, expiry=expiry)

    def _post_reply(self, topic: str, message: Message, correlation: bytes | None) -> None:
        self.bus.post(topic, message, correlation_data=correlation)

    def hearing_since(self) -> float | None:
        return self._connected_at if self.bus.connected else None

    def accepted(self, task: Task) -> None:
        self.store.journal_add(task.id, task.submitted, task.journal_doc)
        self.ha.accepted(task)

    def assigned(self, task: Task) -> None:
        self.ha.assigned(task)

    def finished(self, task: Task, row: dict[str, Any]) -> None:
        self.ha.finished(task.id)
        self.store.journal_remove(task.id)
        self.store.record(row)
        self.stats.record(task.capability, row["outcome"], row["total_ms"])

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
                    tg.create_task(self.ha.lead(stop), name="lease"),
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
                await self.ha.goodbye()
                await self.bus.drain(1.0)
                bus_task.cancel()
        finally:
            if self.auctioneer is not None:
                self.auctioneer.close()
            self.core.close()
            await self.store.close()
            self.users.close()
        if self.ha.stepped_down is not None:
            raise SteppedDown(f"orchestrator {self.ha.stepped_down.holder!r} took over")

    async def become_active(self, mirror: dict[str, Mirrored], took_over: bool) -> None:
        """This instance holds the lease: take requests, adopt what the previous
        active left (``mirror``; ``took_over``: this one stood by while another
        was active), announce (clients resubmit what they wait for)."""
        if not self._served:
            self._served = True
            docs = await self.store.load_active()
            if not took_over:  # this state_dir's own journal: no one else ran
                if n := recovery.recover(self.core, docs):
                    log.info("recovered %d task(s) from the journal", n)
            else:
                for doc in docs:
                    self.store.journal_remove(str(doc.get("id")))  # the mirror is newer
            r = self.realm
            sub = self.bus.subscribe
            await sub(topics.TASK_SUBMIT.filter(realm=r), self._on_submit)
            await sub(topics.TASK_CONTROL.filter(realm=r), self._on_control)
            await sub(topics.ORCH_ADMIN.filter(realm=r), self.admin.on_request)
            await self.state.start()
            await self.workflows.start()
            # Missions that name the orchestrator as their auctioneer (docs/swarm.md).
            self.auctioneer = Auctioneer(
                self.bus, r, ORCHESTRATOR_ACCOUNT, on_finished=self._mission_finished
            )
            await self.auctioneer.start()
            from daemon.homeassistant.realm import attach as attach_homeassistant

            bridge = await attach_homeassistant(self.bus, self.config)  # the realm device
            if self.bus.connected:
                await bridge.refresh()  # its discovery, now: later on every connect
        self.core.active_since = time.monotonic()
        recovery.adopt(self.core, mirror)
        await self._announce()

    async def _mission_finished(self, record: MissionRecord) -> None:
        self.store.record(record.history_row(time.time()))

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
        for cap in list(self.core.queues):
            self.core.dispatch(cap)

    async def _watchdog(self) -> None:
        assert self.notifier.watchdog_interval
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(self.notifier.watchdog_interval)

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
        self.core.dispatch_peer(node_id)

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
        self.core.peer_lost(node_id, "went offline")

    async def _on_info(self, msg: Inbound) -> None:
        got = _node_message(msg, topics.NODE_INFO, NodeInfo)
        if got is not None:
            node_id, info = got
            self.registry.on_info(node_id, self._authorised(node_id, info), time.monotonic())
            self.core.dispatch_peer(node_id)

    def _authorised(self, node_id: str, info: NodeInfo) -> NodeInfo:
        """The advert with only the capabilities this account may offer."""
        allowed = [c for c in info.capabilities if self.admission.may_offer(node_id, c.name)]
        if len(allowed) == len(info.capabilities):
            return info
        refused = sorted({c.name for c in info.capabilities} - {c.name for c in allowed})
        log.warning("%s may not offer %s: ignored", node_id, ", ".join(refused)[:200])
        return info.model_copy(update={"capabilities": allowed})

    async def _on_health(self, msg: Inbound) -> None:
        got = _node_message(msg, topics.NODE_HEALTH, NodeHealth)
        if got is not None:
            self.registry.on_health(got[0], got[1], time.monotonic())

    async def _sweep_loop(self) -> None:
        next_forget = time.monotonic() + FORGET_INTERVAL
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = time.monotonic()
            for node_id in self.registry.sweep(now, self.cfg.stale_after):
                log.warning("peer %s missed its heartbeats; treating it as gone", node_id)
                self.core.peer_lost(node_id, "stopped sending heartbeats")
            self.registry.reopen_breakers(now)
            if now >= next_forget:
                next_forget = now + FORGET_INTERVAL
                for node_id in self.registry.forget(now, self.cfg.forget_after):
                    log.info("forgot peer %s (gone for over %.0fs)", node_id, self.cfg.forget_after)
                    self.core.forget(node_id)
                    report = topics.TASK_WORKER.build(realm=self.realm, node_id=node_id)
                    self._report_nodes.pop(report, None)
            self.core.dispatch_all()

    # ============================================================ requests

    async def _on_submit(self, msg: Inbound) -> None:
        if not self.ha.active:
            return  # stepped down: the active one answers (clients resubmit to it)
        admission, core, corr = self.admission, self.core, msg.correlation_data
        got = admission.submission(msg)
        if not isinstance(got, Submission):
            if got is not None:
                self.bus.post(got[0], got[1], correlation_data=corr)
            return
        submit, reply_topic = got.submit, got.reply_topic
        task_id = submit.task_id or secrets.token_urlsafe(TASK_ID_BYTES)
        try:
            ident = admission.identify(got.account, submit.token, submit.user)
            # A resubmission joins (or gets the result of) the task it repeats.
            if core.join(submit, ident.name, task_id, reply_topic, corr):
                return
            admission.admit(submit, ident.name, ident.role, time.time(), time.monotonic())
            core.accept(
                submit, ident, task_id, reply=reply_topic, corr=corr, input_bytes=len(msg.payload)
            )
        except Refused as exc:
            error = ErrorInfo(code=exc.code, message=str(exc))
            update = TaskUpdate(
                task_id=task_id, status="failed", error=error, correlation=submit.correlation
            )
            log.info("refused %s task from %s: %s", submit.capability, got.account, exc)
            if reply_topic:
                self.bus.post(reply_topic, update, correlation_data=corr)

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
        if self.ha.active:
            self.core.report(node_id, report)
        else:
            self.ha.on_report(node_id, report)

    async def _on_control(self, msg: Inbound) -> None:
        if not self.ha.active:
            return
        account = self.admission.request_account(msg, topics.TASK_CONTROL, "control", limited=False)
        if account is None:
            return
        try:
            cancel = decode(msg.payload, TaskCancel)
        except MessageError as exc:
            log.warning("bad control message from %s: %s (%s)", account, exc, msg.preview())
            return
        try:
            ident = self.admission.identify(account, cancel.token, cancel.user)
            ok = self.core.cancel(cancel.task_id, ident, cancel.reason)
        except Refused as exc:
            log.warning("refused cancel of %s by %s: %s", cancel.task_id, account, exc)
            return
        if not ok:
            log.info("cancel of unknown or finished task %s", cancel.task_id)

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
        queues = {cap: len(q) for cap, q in self.core.queues.items()}
        return self.stats.snapshot(
            self.registry.peers.values(),
            queues,
            self.core.running(),
            uptime_s=time.monotonic() - self.started,
            periodic=periodic,
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
