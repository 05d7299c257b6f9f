"""The node daemon (``mtor node``): hosts the configured nodes on one bus.

Lifecycle: connect (the will says *offline* with this boot's id) → on every
connect publish *online*, the capability advert and health → probe the nodes
whose native backends have no verdict yet in a child (:mod:`daemon.probe`: a
backend that kills it costs only its node) → set up each node (backends load
off the loop) and run it under a supervisor → on SIGTERM stop taking work, let
in-flight tasks finish within the shutdown budget, publish *offline* and
disconnect cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from typing import TYPE_CHECKING, Final

from daemon import __version__, gctune, hostinfo, topics
from daemon.bus import Bus, Inbound
from daemon.config import Config
from daemon.errors import MessageError
from daemon.heap import collect_garbage, pin_mmap_threshold, trim_heap
from daemon.hosting import HostedNode
from daemon.messages import decode
from daemon.node import NodeContext
from daemon.plugins import node_class, node_type
from daemon.probe import BackendGuard, Target, Tracked, loading, log_imports
from daemon.protocol.node import (
    BusStats,
    Capability,
    NodeCommand,
    NodeHealth,
    NodeInfo,
    NodeState,
    NodeSummary,
    SpoolStats,
)
from daemon.sdnotify import Notifier
from daemon.spool import EventSpool, spool_path
from daemon.supervisor import Supervised, supervise
from daemon.worker import Executor, Worker

if TYPE_CHECKING:
    from daemon.workflows.local import LocalWorkflows

log = logging.getLogger(__name__)

# Budget for the final "offline" publish during shutdown.
OFFLINE_PUBLISH_TIMEOUT: Final = 1.0
# The least the event spool waits for acknowledgements at a clean stop (s).
SPOOL_CLOSE_MIN: Final = 1.5
# A node's close() (models unloaded, clients closed) on a restart or shutdown.
NODE_CLOSE_TIMEOUT: Final = 10.0


class NodeDaemon:
    """One node daemon process: one MQTT identity hosting several nodes."""

    def __init__(self, config: Config, *, notifier: Notifier | None = None) -> None:
        self.config = config
        self.node_id = config.effective_node_id
        self.boot_id = uuid.uuid4().hex[:12]
        self.notifier = notifier or Notifier({})
        self.started = time.monotonic()
        realm, nid = config.realm, self.node_id
        self.state_topic = topics.NODE_STATE.build(realm=realm, node_id=nid)
        self.info_topic = topics.NODE_INFO.build(realm=realm, node_id=nid)
        self.health_topic = topics.NODE_HEALTH.build(realm=realm, node_id=nid)
        offline = NodeState(state="offline", boot_id=self.boot_id, version=__version__)
        self.bus = Bus(
            config.broker,
            config.daemon_client_id("node"),
            password=config.broker_password(),
            will=(self.state_topic, offline),
            session_expiry=config.broker.session_expiry,
            duplicate_hint=f"is a second daemon running with node id {nid!r}?",
        )
        self.hardware = hostinfo.hardware()
        self.cpu = hostinfo.CpuMeter()
        self.hosted: dict[str, HostedNode] = {}
        self.spool = EventSpool(spool_path(config.daemon.state_dir, realm, nid), self.boot_id)
        self.ctx = NodeContext(
            node_id=nid,
            config=config,
            bus=self.bus,
            state_dir=config.daemon.state_dir,
            announce=self.publish_info,
            events=self.spool,
        )
        self._tg: asyncio.TaskGroup | None = None
        self._restart_lock = asyncio.Lock()
        self._restarts: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._online = asyncio.Event()
        self.guard: BackendGuard | None = None
        self._loaded = asyncio.Event()  # every node made (or found unavailable)
        self.workflows: LocalWorkflows | None = None
        self.worker = Worker(self.bus, config.realm, nid)
        from daemon.homeassistant.node import node_bridge

        self.homeassistant = node_bridge(self)  # discovery configs follow publish_info

    # -------------------------------------------------------------- messages

    def capabilities(self) -> list[Capability]:
        caps: list[Capability] = []
        for hosted in self.hosted.values():
            if hosted.ready and hosted.node is not None and hosted.job.status == "running":
                try:
                    caps.extend(hosted.node.capabilities())
                except Exception:
                    log.exception("node %s failed to list its capabilities", hosted.name)
        return caps

    def starting(self) -> bool:
        """Is a hosted node still starting (probed, loading, setting up)?"""
        return any(
            not h.ready and h.job.status not in ("failed", "stopped") for h in self.hosted.values()
        )

    def summaries(self) -> list[NodeSummary]:
        return [
            NodeSummary(
                name=h.name,
                type=h.type_name,
                status=h.job.status,
                restarts=h.job.restarts,
                error=h.job.error or h.note,
            )
            for h in self.hosted.values()
        ]

    def info(self) -> NodeInfo:
        return NodeInfo(
            node_id=self.node_id,
            boot_id=self.boot_id,
            version=__version__,
            hostname=socket.gethostname(),
            area=self.config.area,
            hardware=self.hardware,
            nodes=self.summaries(),
            capabilities=self.capabilities(),
            workflows=sorted(self.workflows.engine.flows) if self.workflows else [],
        )

    def health(self) -> NodeHealth:
        mem = hostinfo.memory()
        mem_pct = mem_used = None
        if mem and mem[0]:
            mem_pct = round(100.0 * (1 - mem[1] / mem[0]), 1)
            mem_used = int((mem[0] - mem[1]) / 1024)
        temp = hostinfo.cpu_temperature()
        return NodeHealth(
            boot_id=self.boot_id,
            uptime_s=round(time.monotonic() - self.started, 1),
            cpu_percent=self.cpu.sample(),
            load=hostinfo.load(),
            mem_percent=mem_pct,
            mem_used_mb=mem_used,
            rss_mb=hostinfo.rss_mb(),
            temperature_c=round(temp, 1) if temp is not None else None,
            battery_percent=hostinfo.battery_percent(),
            active_tasks=self.worker.active,
            nodes=self.summaries(),
            bus=BusStats(**self.bus.stats()),
            spool=SpoolStats(**self.spool.stats()),
        )

    async def publish_info(self) -> None:
        """Advertise what works now (and route tasks to exactly that)."""
        info = self.info()
        routes: dict[str, tuple[Executor, int]] = {}
        for cap in info.capabilities:
            hosted = self.hosted.get(cap.node)
            if hosted is None or hosted.node is None:
                continue
            executor = hosted.executor or hosted.node
            # Several adverts of one name on one node (e.g. two chat backends) add up;
            # the node picks the backend from the task's constraints.
            node, slots = routes.get(cap.name, (executor, 0))
            if node is executor:
                routes[cap.name] = (node, slots + cap.max_concurrency)
        self.worker.set_routes(routes)
        await self.bus.publish(self.info_topic, info, qos=1, retain=True, wait=False)
        await self.homeassistant.refresh()

    async def publish_health(self) -> None:
        await self.bus.publish(self.health_topic, self.health(), qos=0, retain=True, wait=False)

    async def _announce(self) -> None:
        """On every connect: birth, advert, health (after subscriptions are in place)."""
        online = NodeState(state="online", boot_id=self.boot_id, version=__version__)
        await self.bus.publish(self.state_topic, online, qos=1, retain=True)
        await self.publish_info()
        await self.publish_health()
        if not self._online.is_set():
            self._online.set()
            log.info("%s online (boot %s)", self.node_id, self.boot_id)
            self.notifier.ready(f"online as {self.node_id}")
            gctune.settle()

    # ----------------------------------------------------------------- nodes

    def _build_nodes(self) -> None:
        """The hosted nodes (made later, by :meth:`_load_nodes`) and their crash guard;
        reads what the last run's fault log says before anything loads."""
        targets = []
        for name, cfg in self.config.nodes.items():
            if not cfg.enabled:
                continue
            self.hosted[name] = HostedNode(name, cfg.type, Supervised(name))
            impl = node_type(cfg.type).implementation
            targets.append(Target(name, impl, cfg.model_dump(mode="json")))
        self.guard = BackendGuard(self.config, self.node_id, targets)
        self.guard.open()
        log_imports()

    async def _load_nodes(self) -> None:
        """Probe what has no verdict, then make and start every node that may load."""
        guard = self.guard
        assert guard is not None
        later = [name for name in self.hosted if guard.needs_probe(name)]
        try:
            # What needs no probe starts at once, beside the probe of the rest.
            self._make_nodes(guard, [name for name in self.hosted if name not in later])
            if later:
                await self.publish_info()
                await guard.vet()
                self._make_nodes(guard, later)
        finally:
            self._loaded.set()
        await self.publish_info()

    def _make_nodes(self, guard: BackendGuard, names: list[str]) -> None:
        for name in names:
            hosted = self.hosted[name]
            verdict = guard.verdict(name)
            hosted.note = verdict.note()
            if verdict.unavailable:
                hosted.job.status = "failed"
                log.error("node %s (%s) not loaded: %s", name, hosted.type_name, hosted.note)
                continue
            cfg = self.config.nodes[name]
            entry = cfg.model_dump(exclude_defaults=True)
            log.info("loading node %s (%s) %s", name, hosted.type_name, _backends(entry))
            token = loading.set(name)  # its imports are logged (log_imports)
            try:
                hosted.node = node_class(cfg.type)(name, cfg, self.ctx)
            except ImportError as exc:
                hosted.job.status = "failed"
                hosted.job.error = f"missing package: {exc}"
                log.warning("node %s (%s) unavailable: %s", name, cfg.type, exc)
                continue
            except Exception as exc:  # one node's constructor must not stop the others
                hosted.job.status = "failed"
                hosted.job.error = f"cannot be made: {type(exc).__name__}: {exc}"[:300]
                log.exception("node %s (%s) cannot be made", name, cfg.type)
                continue
            finally:
                loading.reset(token)
            hosted.executor = Tracked(hosted.node, name, guard.busy)
            delay = guard.start_delay(
                name, self.config.daemon.restart_initial_delay, self.config.daemon.restart_max_delay
            )
            self._start_node(hosted, delay)

    async def _run_node(self, hosted: HostedNode, delay: float = 0.0) -> None:
        node = hosted.node
        assert node is not None
        if delay:
            hosted.job.status = "restarting"
            log.warning("node %s crashed the last run: loading it in %.1fs", hosted.name, delay)
            await asyncio.sleep(delay)
        log.info("setting up node %s", hosted.name)
        token = loading.set(hosted.name)
        try:
            await node.setup()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            hosted.job.status = "failed"
            hosted.job.error = f"setup failed: {type(exc).__name__}: {exc}"[:300]
            log.exception("node %s failed to set up; it is not advertised", hosted.name)
            await self.publish_info()
            return
        finally:
            loading.reset(token)
        # What loading allocated only for the while (files read, graphs built) is
        # free now: hand it back (70 MB with the auto nodes, at start and per restart).
        await asyncio.to_thread(trim_heap)
        hosted.ready = True
        hosted.job.status = "running"
        await self.publish_info()

        async def changed(_job: Supervised) -> None:
            await self.publish_info()
            await self.publish_health()

        try:
            await supervise(
                hosted.job,
                node.run,
                initial_delay=self.config.daemon.restart_initial_delay,
                max_delay=self.config.daemon.restart_max_delay,
                on_change=changed,
            )
        finally:
            hosted.ready = False

    def _start_node(self, hosted: HostedNode, delay: float = 0.0) -> None:
        assert self._tg is not None
        if hosted.node is not None:
            hosted.task = self._tg.create_task(
                self._run_node(hosted, delay), name=f"node:{hosted.name}"
            )

    async def restart_nodes(self, names: list[str]) -> None:
        """Stop the nodes, release what their setup loaded, and set them up again.

        The old models must be gone before the new ones load: a ``setup`` on a
        node that still held them doubled them on every restart.  All named
        nodes stop and close before any loads again, so the memory of the old
        ones is free (and handed back to the kernel) before the new ones take it.
        """
        hosted = [self.hosted[name] for name in names]
        async with self._restart_lock:  # one restart at a time: never two setups of a node
            for h in hosted:
                await self._stop_node(h)
                h.job.status = "starting"
                h.job.restarts += 1
                h.job.error = None
            await self.publish_info()  # not advertised (nor routed to) while they reload
            for h in hosted:
                await self._close_node(h, NODE_CLOSE_TIMEOUT)
            collect_garbage()
            await asyncio.to_thread(trim_heap)
            for h in hosted:
                self._start_node(h)
        log.info("restarted %s on command", ", ".join(names))

    async def _restart_in_background(self, only: str | None) -> None:
        # A restart waits for models to unload: off the dispatch loop, so the
        # daemon's other messages are not held up behind it.  One asked for while
        # the nodes are still being probed and made restarts them once they are.
        await self._loaded.wait()
        names = [n for n, h in self.hosted.items() if h.node is not None and only in (None, n)]
        if not names:
            return
        try:
            await self.restart_nodes(names)
        except Exception:
            log.exception("restarting %s failed", ", ".join(names))

    async def _stop_node(self, hosted: HostedNode) -> None:
        task, hosted.task = hosted.task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        hosted.ready = False

    async def _close_node(self, hosted: HostedNode, timeout: float) -> None:
        if hosted.node is None:
            return
        try:
            async with asyncio.timeout(timeout):
                await hosted.node.close()
        except TimeoutError:
            log.warning("node %s did not close within %.1fs", hosted.name, timeout)
        except Exception:
            log.exception("node %s failed to close", hosted.name)

    async def _on_command(self, msg: Inbound) -> None:
        fields = topics.NODE_CMD.parse(msg.topic)
        if fields is None:
            return
        try:
            cmd = decode(msg.payload or b"{}", NodeCommand)
            command = fields["command"]
            if command == "restart":
                if cmd.node and cmd.node not in self.hosted:
                    raise MessageError(f"no node named {cmd.node!r}", code="not_found")
                if self.hosted and self._tg is not None and not self._stopping:
                    task = self._tg.create_task(
                        self._restart_in_background(cmd.node), name="restart"
                    )
                    self._restarts.add(task)
                    task.add_done_callback(self._restarts.discard)
            elif command == "announce":
                await self._announce()
            else:
                raise MessageError(f"unknown command {command!r}", code="unknown_command")
        except MessageError as exc:
            log.warning("bad command on %s: %s (payload %s)", msg.topic, exc, msg.preview())

    # ------------------------------------------------------------------- run

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.daemon.health_interval)
            await self.publish_health()

    async def _watchdog_loop(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; raises :class:`BusAuthError` if refused."""
        pin_mmap_threshold()  # before any model loads: see its docstring
        await self.spool.open()  # the seq to go on from, and what an earlier run left
        self.spool.start(self.bus)
        self._build_nodes()
        self.bus.on_connect(self._announce)
        cmd_filter = topics.NODE_CMD.filter(realm=self.config.realm, node_id=self.node_id)
        await self.bus.subscribe(cmd_filter, self._on_command)
        await self.worker.start()
        from daemon.workflows.local import start_local_workflows

        self.workflows = await start_local_workflows(self)
        await self.homeassistant.start()
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            bus_task = tg.create_task(self.bus.run(), name="bus")
            background = [
                tg.create_task(self._load_nodes(), name="load"),
                tg.create_task(self._health_loop(), name="health"),
            ]
            if self.notifier.watchdog_interval:
                background.append(
                    tg.create_task(self._watchdog_loop(self.notifier.watchdog_interval))
                )
            await stop.wait()
            self.notifier.stopping()
            log.info("shutting down")
            await self._shutdown(background)
            bus_task.cancel()

    async def _shutdown(self, background: list[asyncio.Task[None]]) -> None:
        self._stopping = True  # no restart starts a node from here on
        budget = self.config.daemon.shutdown_timeout
        deadline = time.monotonic() + budget
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.1, budget - OFFLINE_PUBLISH_TIMEOUT - 0.5)):
                await self.worker.stop()
        if self.workflows is not None:
            await self.workflows.stop()
        for task in background:
            task.cancel()
        restarts = list(self._restarts)
        for task in restarts:
            task.cancel()
        if restarts:
            await asyncio.wait(restarts, timeout=max(0.1, deadline - time.monotonic() - 1.0))
        node_tasks = [h.task for h in self.hosted.values() if h.task is not None]
        for task in node_tasks:
            task.cancel()
        if node_tasks:
            await asyncio.wait(node_tasks, timeout=max(0.1, deadline - time.monotonic() - 1.0))
        for hosted in self.hosted.values():
            await self._close_node(hosted, max(0.1, deadline - time.monotonic() - 1.0))
        # The spool waits for the broker's acknowledgement of what is in flight: at
        # least SPOOL_CLOSE_MIN, even when closing the nodes used up the budget (an
        # event delivered but still spooled goes out again at the next start).
        remaining = deadline - time.monotonic() - 1.0
        await self.spool.close(timeout=max(SPOOL_CLOSE_MIN, remaining))
        if self.guard is not None:
            self.guard.close()  # a clean stop: no task in flight, no fault to read
        offline = NodeState(
            state="offline", boot_id=self.boot_id, version=__version__, reason="shutdown"
        )
        if self.bus.connected:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(OFFLINE_PUBLISH_TIMEOUT):
                    await self.bus.publish(self.state_topic, offline, qos=1, retain=True)
        await self.bus.drain(timeout=max(0.1, deadline - time.monotonic()))


def _backends(entry: dict[str, object]) -> str:
    """The backend and model choices of a node's config entry, for the log line
    written before it loads them."""
    keys = ("backend", "model", "engine", "detector", "stt", "tts", "wake", "vad")
    picked = {k: v for k, v in entry.items() if any(word in k for word in keys)}
    return ", ".join(f"{k}={v}" for k, v in picked.items())[:300] or "(defaults)"
