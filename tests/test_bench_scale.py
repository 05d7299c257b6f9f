"""bench.simnodes against a real Mosquitto: what the orchestrator would see of them."""

from __future__ import annotations

import asyncio
import contextlib

from bench.simnodes import SimNode, sim_config
from daemon import hostinfo, topics
from daemon.broker import PrivateBroker
from daemon.config import Config
from daemon.messages import decode
from daemon.protocol.node import NodeInfo, NodeState
from daemon.protocol.task import TaskAssign, WorkerReport
from tests.conftest import Collector, running_bus


async def test_simulated_nodes_announce_and_answer_tasks(
    broker: PrivateBroker, realm: str, config: Config
) -> None:
    sim = sim_config(broker.url, realm, max_concurrency=2)
    hardware = hostinfo.hardware()
    nodes = [SimNode(sim, f"smoke{i}", hardware, health_interval=30.0) for i in range(3)]
    tasks = [asyncio.create_task(n.run()) for n in nodes]
    try:
        async with asyncio.timeout(5):
            await asyncio.gather(*(n.announced.wait() for n in nodes))
        async with running_bus(config) as bus:
            states, infos, reports = Collector(), Collector(), Collector()
            await bus.subscribe(topics.NODE_STATE.filter(realm=realm), states)
            await bus.subscribe(topics.NODE_INFO.filter(realm=realm), infos)
            await bus.subscribe(topics.TASK_WORKER.filter(realm=realm), reports)
            await states.wait_count(3, timeout=5)
            await infos.wait_count(3, timeout=5)
            assert all(m.retain for m in states.messages + infos.messages)
            assert {decode(m.payload, NodeState).state for m in states.messages} == {"online"}
            info = decode(infos.messages[0].payload, NodeInfo)
            assert [(c.name, c.max_concurrency) for c in info.capabilities] == [("echo", 2)]

            assign = TaskAssign(task_id="smoke-1", attempt=1, capability="echo", input={"x": 1})
            await bus.publish(topics.NODE_TASK.build(realm=realm, node_id="smoke1"), assign)
            got = await reports.wait_for(
                lambda m: decode(m.payload, WorkerReport).status == "done", timeout=5
            )
            report = decode(got.payload, WorkerReport)
            assert report.task_id == "smoke-1"
            assert report.output == {"x": 1}
            assert got.topic == topics.TASK_WORKER.build(realm=realm, node_id="smoke1")
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
