"""The node daemon (``mtor node``): hosts the configured nodes on one bus.

Lifecycle: connect (the will says *offline* with this boot's id) → on every
connect publish *online*, the capability advert and health → set up each node
(backends load off the loop) and run it under a supervisor → on SIGTERM stop
taking work, let in-flight tasks finish within the shutdown budget, publish
*offline* and disconnect cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from daemon import __version__, gctune, hostinfo, topics
from daemon.bus import Bus, Inbound
from daemon.config import Config
from daemon.errors import MessageError
from daemon.messages import decode
from daemon.node import Node, NodeContext
from daemon.protocol.node import (
    Capability,
    NodeCommand,
    NodeHealth,
    NodeInfo,
    NodeState,
    NodeSummary,
)
from daemon.sdnotify import Notifier
from daemon.supervisor import Supervised, supervise
from daemon.worker import Worker
from nodes.catalog import node_class

if TYPE_CHECKING:
    from daemon.workflows.local import LocalWorkflows

log = logging.getLogger(__name__)

# Budget for the final "offline" publish during shutdown.
OFFLINE_PUBLISH_TIMEOUT: Final = 1.0


@dataclass
class HostedNode:
    name: str
    type_name: str
    job: Supervised
    node: Node | None = None
    task: asyncio.Task[None] | None = None
    ready: bool = False


def with_auto_nodes(config: Config) -> Config:
    """``mtor up``: add a default node of each optional type that works here and
    that the config does not already have: reference echo/sleep; chat when the
    llama.cpp package and the default model are installed; vision (detect,
    faces) with OpenCV; voice as an stt/tts server (no microphone) with
    faster-whisper or piper.  Each backend still fails soft in its node."""
    import importlib.util

    from nodes.chat.config import ChatConfig
    from nodes.reference.config import ReferenceConfig
    from nodes.vision.config import VisionConfig
    from nodes.voice.config import VoiceConfig

    have = {cfg.type for cfg in config.nodes.values()}
    extra: dict[str, object] = {}
    if "reference" not in have:
        extra["reference"] = ReferenceConfig()
    if "chat" not in have and importlib.util.find_spec("llama_cpp") is not None:
        from daemon.modelstore import ModelStore

        chat = ChatConfig()
        try:
            models = {b.model for b in chat.backends if getattr(b, "model", None)}
            if all(ModelStore.default().status(str(m)).present for m in models):
                extra["chat"] = chat
        except Exception as exc:  # a broken manifest must not stop the realm
            log.warning("chat not started automatically: %s", exc)
    if "vision" not in have and importlib.util.find_spec("cv2") is not None:
        extra["vision"] = VisionConfig()
    if "voice" not in have and any(
        importlib.util.find_spec(m) is not None for m in ("faster_whisper", "vosk", "piper")
    ):
        extra["voice"] = VoiceConfig(type="voice")
    if not extra:
        return config
    nodes = {**config.nodes, **{k: v for k, v in extra.items() if k not in config.nodes}}
    return config.model_copy(update={"nodes": nodes})


class NodeDaemon:
    """One node daemon process: one MQTT identity hosting several nodes."""

    def __init__(
        self, config: Config, *, notifier: Notifier | None = None, auto_nodes: bool = False
    ) -> None:
        if auto_nodes:
            config = with_auto_nodes(config)
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
        )
        self.hardware = hostinfo.hardware()
        self.cpu = hostinfo.CpuMeter()
        self.hosted: dict[str, HostedNode] = {}
        self.ctx = NodeContext(
            node_id=nid,
            config=config,
            bus=self.bus,
            state_dir=config.daemon.state_dir,
            announce=self.publish_info,
        )
        self._tg: asyncio.TaskGroup | None = None
        self._online = asyncio.Event()
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

    def summaries(self) -> list[NodeSummary]:
        return [
            NodeSummary(
                name=h.name,
                type=h.type_name,
                status=h.job.status,
                restarts=h.job.restarts,
                error=h.job.error,
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
        )

    async def publish_info(self) -> None:
        """Advertise what works now (and route tasks to exactly that)."""
        info = self.info()
        routes: dict[str, tuple[Node, int]] = {}
        for cap in info.capabilities:
            hosted = self.hosted.get(cap.node)
            if hosted is None or hosted.node is None:
                continue
            # Several adverts of one name on one node (e.g. two chat backends) add up;
            # the node picks the backend from the task's constraints.
            node, slots = routes.get(cap.name, (hosted.node, 0))
            if node is hosted.node:
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
        for name, cfg in self.config.nodes.items():
            if not cfg.enabled:
                continue
            hosted = HostedNode(name, cfg.type, Supervised(name))
            self.hosted[name] = hosted
            try:
                hosted.node = node_class(cfg.type)(name, cfg, self.ctx)
            except ImportError as exc:
                hosted.job.status = "failed"
                hosted.job.error = f"missing package: {exc}"
                log.warning("node %s (%s) unavailable: %s", name, cfg.type, exc)

    async def _run_node(self, hosted: HostedNode) -> None:
        node = hosted.node
        assert node is not None
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

    def _start_node(self, hosted: HostedNode) -> None:
        assert self._tg is not None
        if hosted.node is not None:
            hosted.task = self._tg.create_task(self._run_node(hosted), name=f"node:{hosted.name}")

    async def restart_node(self, name: str) -> None:
        hosted = self.hosted.get(name)
        if hosted is None or hosted.node is None:
            raise MessageError(f"no node named {name!r}", code="not_found")
        if hosted.task is not None:
            hosted.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await hosted.task
        hosted.job.restarts += 1
        hosted.job.error = None
        self._start_node(hosted)

    async def _on_command(self, msg: Inbound) -> None:
        fields = topics.NODE_CMD.parse(msg.topic)
        if fields is None:
            return
        try:
            cmd = decode(msg.payload or b"{}", NodeCommand)
            command = fields["command"]
            if command == "restart":
                names = (
                    [cmd.node]
                    if cmd.node
                    else [n for n, h in self.hosted.items() if h.node is not None]
                )
                for name in names:
                    await self.restart_node(name)
                log.info("restarted %s on command", ", ".join(names))
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
            for hosted in self.hosted.values():
                self._start_node(hosted)
            background = [tg.create_task(self._health_loop(), name="health")]
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
        budget = self.config.daemon.shutdown_timeout
        deadline = time.monotonic() + budget
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.1, budget - OFFLINE_PUBLISH_TIMEOUT - 0.5)):
                await self.worker.stop()
        if self.workflows is not None:
            await self.workflows.stop()
        for task in background:
            task.cancel()
        node_tasks = [h.task for h in self.hosted.values() if h.task is not None]
        for task in node_tasks:
            task.cancel()
        if node_tasks:
            await asyncio.wait(node_tasks, timeout=max(0.1, deadline - time.monotonic() - 1.0))
        for hosted in self.hosted.values():
            if hosted.node is not None:
                with contextlib.suppress(Exception):
                    await hosted.node.close()
        offline = NodeState(
            state="offline", boot_id=self.boot_id, version=__version__, reason="shutdown"
        )
        if self.bus.connected:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(OFFLINE_PUBLISH_TIMEOUT):
                    await self.bus.publish(self.state_topic, offline, qos=1, retain=True)
        await self.bus.drain(timeout=max(0.1, deadline - time.monotonic()))
