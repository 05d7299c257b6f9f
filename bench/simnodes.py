"""Simulated node daemons, many per process, for ``bench.scale``.

Each :class:`SimNode` is what the broker and the orchestrator see of one
``mtor node`` with the reference node: its own MQTT connection (a
:class:`~daemon.bus.Bus` with the retained *offline* will on
``node/<id>/state`` and the daemon's persistent session), on every connect the
retained *online* birth, the retained capability advert (``echo`` with its
``max_concurrency``) and health, health every ``health_interval`` seconds, and
assigned tasks answered by the project's own :class:`~daemon.worker.Worker`
running a real :class:`~nodes.reference.node.ReferenceNode`.  What it leaves
out of the real daemon is what nobody outside the process sees: supervision,
local workflows, hardware readings for health (one process's figures would be
repeated N times) and signal handling.

    python -m bench.simnodes --broker mqtt://127.0.0.1:1883 --realm r \\
        --prefix sim --first 0 --count 200

One JSON line per milestone on stdout (``started`` after imports,
``announced`` once every node has published its birth, advert and health);
SIGTERM ends it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import resource
import signal
import socket
import sys
import time
import uuid
from typing import Any, Final

from daemon import __version__, hostinfo, topics
from daemon.bus import Bus, Inbound
from daemon.config import Config, build_config
from daemon.errors import MessageError
from daemon.messages import decode
from daemon.node import NodeContext
from daemon.protocol.node import (
    BusStats,
    Hardware,
    NodeCommand,
    NodeHealth,
    NodeInfo,
    NodeState,
    NodeSummary,
)
from daemon.worker import Worker
from nodes.reference.config import ReferenceConfig
from nodes.reference.node import ReferenceNode

log = logging.getLogger(__name__)

# File descriptors a process needs beyond its sockets (stdio, the loop's self-pipe, ...).
SPARE_FDS: Final = 64


def raise_fd_limit(needed: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit to ``needed`` (within the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = want
    return soft


class SimNode:
    """One simulated node daemon: one MQTT identity offering the reference node."""

    def __init__(
        self, config: Config, node_id: str, hardware: Hardware, health_interval: float
    ) -> None:
        self.node_id = node_id
        self.boot_id = uuid.uuid4().hex[:12]
        self.hardware = hardware
        self.health_interval = health_interval
        self.started = time.monotonic()
        realm = config.realm
        self.state_topic = topics.NODE_STATE.build(realm=realm, node_id=node_id)
        self.info_topic = topics.NODE_INFO.build(realm=realm, node_id=node_id)
        self.health_topic = topics.NODE_HEALTH.build(realm=realm, node_id=node_id)
        self.cmd_filter = topics.NODE_CMD.filter(realm=realm, node_id=node_id)
        offline = NodeState(state="offline", boot_id=self.boot_id, version=__version__)
        self.bus = Bus(
            config.broker,
            f"mtor-node-{node_id}",  # what Config.daemon_client_id gives on an open broker
            will=(self.state_topic, offline),
            session_expiry=config.broker.session_expiry,
        )
        self.worker = Worker(self.bus, realm, node_id)
        ctx = NodeContext(
            node_id=node_id,
            config=config,
            bus=self.bus,
            state_dir=config.daemon.state_dir,
            announce=self.publish_info,
        )
        ref_config = config.nodes["ref"]
        assert isinstance(ref_config, ReferenceConfig)
        self.node = ReferenceNode("ref", ref_config, ctx)
        self.summary = [NodeSummary(name="ref", type="reference", status="running")]
        self.announced = asyncio.Event()

    def info(self) -> NodeInfo:
        return NodeInfo(
            node_id=self.node_id,
            boot_id=self.boot_id,
            version=__version__,
            hostname=socket.gethostname(),
            hardware=self.hardware,
            nodes=self.summary,
            capabilities=self.node.capabilities(),
        )

    def health(self) -> NodeHealth:
        return NodeHealth(
            boot_id=self.boot_id,
            uptime_s=round(time.monotonic() - self.started, 1),
            active_tasks=self.worker.active,
            nodes=self.summary,
            bus=BusStats(**self.bus.stats()),
        )

    async def publish_info(self) -> None:
        info = self.info()
        routes = {c.name: (self.node, c.max_concurrency) for c in info.capabilities}
        self.worker.set_routes(dict(routes))
        await self.bus.publish(self.info_topic, info, qos=1, retain=True, wait=False)

    async def publish_health(self) -> None:
        await self.bus.publish(self.health_topic, self.health(), qos=0, retain=True, wait=False)

    async def _announce(self) -> None:
        """As NodeDaemon._announce: birth (acknowledged), advert, health."""
        online = NodeState(state="online", boot_id=self.boot_id, version=__version__)
        await self.bus.publish(self.state_topic, online, qos=1, retain=True)
        await self.publish_info()
        await self.publish_health()
        self.announced.set()

    async def _on_command(self, msg: Inbound) -> None:
        fields = topics.NODE_CMD.parse(msg.topic)
        if fields is None:
            return
        try:
            decode(msg.payload or b"{}", NodeCommand)
        except MessageError as exc:
            log.warning("bad command on %s: %s", msg.topic, exc)
            return
        if fields["command"] == "announce":
            await self._announce()

    async def _health_loop(self) -> None:
        await self.announced.wait()
        while True:
            await asyncio.sleep(self.health_interval)
            await self.publish_health()

    async def run(self) -> None:
        self.bus.on_connect(self._announce)
        await self.bus.subscribe(self.cmd_filter, self._on_command)
        await self.worker.start()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.bus.run(), name=f"bus:{self.node_id}")
            tg.create_task(self._health_loop(), name=f"health:{self.node_id}")


def sim_config(broker_url: str, realm: str, max_concurrency: int) -> Config:
    return build_config(
        {
            "realm": realm,
            "node_id": "sim",
            "broker": {"url": broker_url},
            "nodes": {
                "ref": {
                    "type": "reference",
                    "capabilities": ["echo"],
                    "max_concurrency": max_concurrency,
                }
            },
        },
        environ={},
    )


def say(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, "t": time.time(), **fields}) + "\n")
    sys.stdout.flush()


async def run_nodes(args: argparse.Namespace) -> None:
    raise_fd_limit(args.count + SPARE_FDS)
    config = sim_config(args.broker, args.realm, args.concurrency)
    hardware = hostinfo.hardware()
    nodes = [
        SimNode(config, f"{args.prefix}{i:05d}", hardware, args.health_interval)
        for i in range(args.first, args.first + args.count)
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(n.run()) for n in nodes]

        async def announced() -> None:
            await asyncio.gather(*(n.announced.wait() for n in nodes))
            connects = sum(n.bus.connects for n in nodes)
            say("announced", count=len(nodes), connects=connects)

        watcher = tg.create_task(announced())
        await stop.wait()
        watcher.cancel()
        for task in tasks:
            task.cancel()


def main() -> None:
    say("started")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", required=True, help="broker URL")
    parser.add_argument("--realm", required=True)
    parser.add_argument("--prefix", default="sim", help="node ids: <prefix><number>")
    parser.add_argument("--first", type=int, default=0, help="number of the first node")
    parser.add_argument("--count", type=int, required=True, help="nodes in this process")
    parser.add_argument("--concurrency", type=int, default=4, help="echo max_concurrency")
    parser.add_argument("--health-interval", type=float, default=30.0, help="seconds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_nodes(args))


if __name__ == "__main__":
    main()
