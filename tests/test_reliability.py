"""Reliability with real processes: workers killed mid-run, orchestrator restarted.

Every task must end with exactly one final result — none lost, none twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.broker import PrivateBroker
from daemon.bus import Inbound
from daemon.client import RealmClient, TaskFailed
from daemon.messages import decode
from daemon.protocol.task import FINAL_STATUSES, TaskUpdate
from tests.conftest import MtorProcess, make_config, running_bus

pytestmark = pytest.mark.slow


def write(tmp: Path, name: str, data: dict[str, Any]) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def orchestrator(broker: PrivateBroker, realm: str, tmp: Path, **extra: Any) -> MtorProcess:
    cfg = write(
        tmp,
        "orch",
        {
            "realm": realm,
            "nodes": {},
            "orchestrator": {
                "state_dir": str(tmp / "state"),
                "max_attempts": 5,
                "ack_timeout": 2.0,
                "roles": {"user": {"rate_per_s": 0, "max_concurrent": 0}},
                **extra,
            },
        },
    )
    return MtorProcess(["orchestrator", "-c", str(cfg), "-b", broker.url])


def worker(broker: PrivateBroker, realm: str, tmp: Path, node_id: str, conc: int) -> MtorProcess:
    cfg = write(
        tmp,
        node_id,
        {"realm": realm, "nodes": {"ref": {"type": "reference", "max_concurrency": conc}}},
    )
    return MtorProcess(["node", "-c", str(cfg), "-b", broker.url, "-n", node_id])


async def wait_for_peers(client: RealmClient, n: int) -> None:
    """Until an echo to each of n pinned workers succeeds."""
    from daemon.protocol.task import Constraints

    async with asyncio.timeout(30):
        for i in range(n):
            while True:
                try:
                    await asyncio.wait_for(
                        client.call("echo", i, constraints=Constraints(node=f"w{i}"), timeout=2),
                        5,
                    )
                    break
                except (TaskFailed, TimeoutError):
                    await asyncio.sleep(0.1)


class FinalCounter:
    def __init__(self) -> None:
        self.finals: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()

    async def __call__(self, msg: Inbound) -> None:
        u = decode(msg.payload, TaskUpdate)
        if u.status in FINAL_STATUSES:
            key = msg.correlation_data.decode() if msg.correlation_data else u.task_id
            self.finals[key] += 1
            self.outcomes[u.status if u.status == "done" else u.error.code if u.error else "?"] += 1


async def test_kill9_workers_while_2000_tasks_run(
    broker: PrivateBroker, realm: str, tmp_path: Path, processes: list[MtorProcess]
) -> None:
    processes.append(orchestrator(broker, realm, tmp_path))
    workers = {f"w{i}": worker(broker, realm, tmp_path, f"w{i}", 16) for i in range(3)}
    processes.extend(workers.values())
    total, in_flight = int(os.environ.get("RELIABILITY_TASKS", "2000")), 48
    rng = random.Random(7)
    async with running_bus(make_config(broker.url, realm)) as bus:
        client = RealmClient(bus, realm, user="load")
        await client.start()
        counter = FinalCounter()
        await bus.subscribe(client.reply_topic, counter)
        await bus.subscribe(client.direct_topic, counter)  # the workers' direct finals
        await wait_for_peers(client, 3)
        kills = 0
        sem = asyncio.Semaphore(in_flight)
        ids: list[str] = []

        async def one(i: int) -> None:
            async with sem:
                # direct=False: the orchestrator's own exactly-once guarantee, counted
                # on the wire (direct replies may repeat in a race; RealmClient drops those)
                h = await client.submit("sleep", {"seconds": 0.005}, timeout=60, direct=False)
                ids.append(h.task_id)
                with contextlib.suppress(TaskFailed):
                    await h.result()

        async def killer() -> None:
            nonlocal kills
            while True:
                await asyncio.sleep(0.15)
                name = rng.choice(sorted(workers))
                workers[name].kill9()
                kills += 1
                await asyncio.sleep(0.05)
                workers[name] = worker(broker, realm, tmp_path, name, 16)
                processes.append(workers[name])

        chaos = asyncio.create_task(killer())
        try:
            await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(total))), 240)
        finally:
            chaos.cancel()
        # Let any (wrong) duplicate finals arrive before counting.
        await client.call("echo", "sentinel", timeout=10)
        await asyncio.sleep(0.5)
    assert kills >= 3
    assert len(ids) == total
    assert all(counter.finals[i] == 1 for i in ids), Counter(counter.finals.values())
    assert sum(counter.finals[i] for i in ids) == total
    # Retries hide the kills: nearly everything succeeds; anything else failed clearly.
    assert counter.outcomes["done"] >= total * 0.98, counter.outcomes
    assert set(counter.outcomes) <= {"done", "worker_lost", "no_ack", "shutting_down"}


async def test_orchestrator_restart_loses_nothing(
    broker: PrivateBroker, realm: str, tmp_path: Path, processes: list[MtorProcess]
) -> None:
    orch = orchestrator(broker, realm, tmp_path)
    processes.append(orch)
    processes.append(worker(broker, realm, tmp_path, "w0", 4))
    async with running_bus(make_config(broker.url, realm)) as bus:
        client = RealmClient(bus, realm, user="u")
        await client.start()
        counter = FinalCounter()
        await bus.subscribe(client.reply_topic, counter)
        await bus.subscribe(client.direct_topic, counter)  # the workers' direct finals
        await wait_for_peers(client, 1)
        handles = [
            await client.submit("sleep", {"seconds": 0.2}, timeout=60, direct=False)
            for _ in range(30)
        ]
        await asyncio.sleep(0.6)  # some done, some running, most queued
        orch.kill9()
        await asyncio.sleep(0.3)
        processes.append(orchestrator(broker, realm, tmp_path))
        results = await asyncio.wait_for(
            asyncio.gather(*(h.result() for h in handles), return_exceptions=True), 90
        )
        await asyncio.sleep(0.5)
    assert all(isinstance(r, dict) and r["node"] == "w0" for r in results), results
    assert all(counter.finals[h.task_id] == 1 for h in handles), counter.finals


@pytest.mark.parametrize(
    "mode",
    [(True, True), (False, True), (True, False)],
    ids=["direct", "relayed", "off"],
)
async def test_direct_reply_comes_from_the_worker(
    broker: PrivateBroker,
    realm: str,
    tmp_path: Path,
    processes: list[MtorProcess],
    mode: tuple[bool, bool],
) -> None:
    """With ``direct`` the worker answers ``done`` itself: it arrives while the
    orchestrator is frozen (SIGSTOP).  Without it (not asked, or
    ``orchestrator.direct_replies: false``), only once the orchestrator runs."""
    ask, allowed = mode  # the client asks for direct replies; the orchestrator allows them
    direct = ask and allowed
    orch = orchestrator(broker, realm, tmp_path, direct_replies=allowed)
    processes.append(orch)
    processes.append(worker(broker, realm, tmp_path, "w0", 4))
    async with running_bus(make_config(broker.url, realm)) as bus:
        client = RealmClient(bus, realm, user="u")
        await client.start()
        counter = FinalCounter()
        await bus.subscribe(client.reply_topic, counter)
        await bus.subscribe(client.direct_topic, counter)  # the workers' direct finals
        await wait_for_peers(client, 1)
        handle = await client.submit("sleep", {"seconds": 0.4}, timeout=30, direct=ask)
        result = asyncio.ensure_future(handle.result())
        await asyncio.sleep(0.2)  # assigned and running on w0
        os.kill(orch.proc.pid, signal.SIGSTOP)
        try:
            done, _ = await asyncio.wait({result}, timeout=5 if direct else 1.0)
        finally:
            os.kill(orch.proc.pid, signal.SIGCONT)
        assert bool(done) == direct  # without direct, the answer waits for the orchestrator
        assert (await asyncio.wait_for(result, 10))["node"] == "w0"
        assert handle.final is not None
        assert (handle.final.seq, handle.final.node) == (1, "w0")
        assert handle.final.queue_ms is not None
        assert handle.final.run_ms is not None
        # The orchestrator learnt of the end too (slot free, one final on the wire).
        assert await asyncio.wait_for(client.call("echo", "after", timeout=5), 10) == "after"
        await asyncio.sleep(0.3)
    assert counter.finals[handle.task_id] == 1
