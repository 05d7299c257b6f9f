"""Failover: kill -9 of the active orchestrator, with a standby running, while tasks run.

    python -m bench.failover [--runs 5] [--tasks 40]

Two ``mtor orchestrator`` processes and two ``mtor node`` workers (the reference
node) on a private Mosquitto.  Each run: ``--tasks`` sleep tasks (0.2 s) are in
flight, the active orchestrator is killed with SIGKILL, and we measure the time
until the standby announces itself online; every task must still end with one
result.  The killed one is started again (it becomes the standby).  JSON on
stdout: the failover times (p50, max) and the tasks lost / failed / duplicated.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from daemon.broker import PrivateBroker
from daemon.bus import Bus, Inbound
from daemon.client import RealmClient, TaskFailed
from daemon.config import build_config
from daemon.messages import decode
from daemon.protocol.admin import OrchestratorLease, OrchestratorState
from daemon.protocol.task import FINAL_STATUSES, TaskUpdate

ROOT = Path(__file__).resolve().parent.parent


def spawn(args: list[str], config: dict[str, Any], tmp: Path, name: str) -> subprocess.Popen[bytes]:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTOR_")}
    return subprocess.Popen(
        [sys.executable, "-m", "daemon.cli.main", *args, "-c", str(path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _after(online: list[tuple[float, str]], killed: float) -> bool:
    return any(t > killed for t, _ in online)


async def until(predicate: Callable[[], bool], timeout: float = 30) -> None:
    """Poll every 5 ms: the failover time is read off the watcher's handlers."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - state set by bus handlers, polled
            await asyncio.sleep(0.005)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    realm = "f" + uuid.uuid4().hex[:8]
    tmp = Path(tempfile.mkdtemp(prefix="mtor-failover-"))
    times: list[float] = []
    counts: Counter[str] = Counter()
    with PrivateBroker() as broker:
        base = {"realm": realm, "broker": {"url": broker.url}}

        def orchestrator(name: str) -> subprocess.Popen[bytes]:
            orch = {"instance": name, "state_dir": str(tmp / f"state-{name}"), "ack_timeout": 2.0}
            orch["roles"] = {"user": {"rate_per_s": 0, "max_concurrent": 0}}
            cfg = {**base, "node_id": name, "nodes": {}, "orchestrator": orch}
            return spawn(["orchestrator"], cfg, tmp, f"orch-{name}")

        procs = {name: orchestrator(name) for name in ("a", "b")}
        workers = [
            spawn(
                ["node"],
                {
                    **base,
                    "node_id": f"w{i}",
                    "nodes": {"ref": {"type": "reference", "max_concurrency": 8}},
                },
                tmp,
                f"w{i}",
            )
            for i in range(2)
        ]
        lease: list[OrchestratorLease] = []
        online: list[tuple[float, str]] = []

        async def on_lease(msg: Inbound) -> None:
            lease.append(decode(msg.payload, OrchestratorLease))

        async def on_state(msg: Inbound) -> None:
            state = decode(msg.payload, OrchestratorState)
            if state.state == "online":
                online.append((time.monotonic(), state.boot_id))

        config = build_config({**base, "nodes": {}})
        watcher = Bus(config.broker, f"bench-watch-{realm}")
        bus = Bus(config.broker, f"bench-client-{realm}")
        await watcher.subscribe(f"mtor/{realm}/orchestrator/lease", on_lease)
        await watcher.subscribe(f"mtor/{realm}/orchestrator/state", on_state)
        running = [asyncio.create_task(watcher.run()), asyncio.create_task(bus.run())]
        try:
            await bus.wait_connected(10)
            client = RealmClient(bus, realm, user="bench")
            await client.start()
            finals: Counter[str] = Counter()

            async def count(msg: Inbound) -> None:
                update = decode(msg.payload, TaskUpdate)
                if update.status in FINAL_STATUSES:
                    finals[update.task_id] += 1

            await bus.subscribe(client.reply_topic, count)
            async with asyncio.timeout(60):
                while True:  # both workers serve
                    try:
                        await client.call("echo", "ready", timeout=2)
                        break
                    except TaskFailed:
                        await asyncio.sleep(0.2)
            for _ in range(args.runs):
                await until(lambda: bool(lease and lease[-1].state == "held" and online))
                await asyncio.sleep(2.0)  # the standby is up and mirroring
                active = lease[-1].holder
                handles = [
                    await client.submit("sleep", {"seconds": 0.2}, timeout=60, direct=False)
                    for _ in range(args.tasks)
                ]
                await asyncio.sleep(0.3)
                killed = time.monotonic()
                procs[active].kill()
                procs[active].wait()
                await until(functools.partial(_after, online, killed))
                times.append(next(t for t, _ in online if t > killed) - killed)
                results = await asyncio.gather(
                    *(asyncio.wait_for(h.result(), 60) for h in handles), return_exceptions=True
                )
                await asyncio.sleep(0.5)
                counts["tasks"] += len(handles)
                counts["failed"] += sum(1 for r in results if isinstance(r, BaseException))
                counts["duplicated"] += sum(1 for h in handles if finals[h.task_id] > 1)
                counts["lost"] += sum(1 for h in handles if finals[h.task_id] == 0)
                procs[active] = orchestrator(active)  # back, as the standby
        finally:
            for task in running:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for proc in [*procs.values(), *workers]:
                proc.kill()
                proc.wait()
    return {
        "benchmark": "failover",
        "runs": args.runs,
        "failover_s": {
            "p50": round(statistics.median(times), 3),
            "max": round(max(times), 3),
            "all": [round(t, 3) for t in times],
        },
        "target_p50_s": 3.0,
        "tasks": dict(counts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=40)
    print(json.dumps(asyncio.run(measure(parser.parse_args())), indent=2))


if __name__ == "__main__":
    main()
