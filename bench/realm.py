"""A small realm for the task benchmarks: orchestrator and worker processes.

Real ``mtor orchestrator`` / ``mtor node`` processes against a private
Mosquitto, driven from the benchmark process through the project's own
:class:`~daemon.bus.Bus` and :class:`~daemon.client.RealmClient` (the way a
program would use the realm), plus a load driver that keeps a fixed number of
requests in flight and reports latency percentiles and throughput.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final

import yaml

from bench.common import cpu_seconds, mtor_command, spawn, stop
from daemon import topics
from daemon.broker import PrivateBroker, free_port
from daemon.bus import Bus, Inbound
from daemon.client import RealmClient, TaskFailed
from daemon.config import build_config
from daemon.errors import MessageError
from daemon.messages import decode
from daemon.protocol.node import NodeState
from daemon.protocol.task import TaskAssign, WorkerReport

ONLINE_TIMEOUT: Final = 30.0
# Per-user limits off: the benchmark is one anonymous client, and the default
# "user" role (8 running, 50/s) would measure the limiter, not the dispatch.
UNLIMITED: Final = {"max_concurrent": 0, "rate_per_s": 0, "burst": 1}


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def orchestrator_config(
    directory: Path,
    broker_url: str,
    realm: str,
    *,
    credentials: dict[str, Any] | None = None,
    accounts_file: Path | None = None,
    direct_replies: bool = True,
) -> Path:
    data = {
        "realm": realm,
        "node_id": "orch",
        "broker": {"url": broker_url, **(credentials or {})},
        "logging": {"level": "warning"},
        "daemon": {"state_dir": str(directory / "orch-daemon")},
        "orchestrator": {
            "state_dir": str(directory / "orch-state"),
            "queue_size": 100_000,
            "roles": {"user": UNLIMITED},
            "direct_replies": direct_replies,
            "accounts_file": str(accounts_file) if accounts_file else None,
        },
        "nodes": {},
    }
    return write_yaml(directory / "orchestrator.yaml", data)


def worker_config(
    directory: Path,
    *,
    broker_url: str,
    realm: str,
    node_id: str,
    max_concurrency: int,
    capabilities: Sequence[str] = ("echo", "sleep"),
    credentials: dict[str, Any] | None = None,
) -> Path:
    data = {
        "realm": realm,
        "node_id": node_id,
        "broker": {"url": broker_url, **(credentials or {})},
        "logging": {"level": "warning"},
        "daemon": {"state_dir": str(directory / f"{node_id}-state")},
        "nodes": {
            "ref": {
                "type": "reference",
                "max_concurrency": max_concurrency,
                "capabilities": list(capabilities),
            }
        },
    }
    return write_yaml(directory / f"{node_id}.yaml", data)


# ------------------------------------------------------------------ load


def percentile(sorted_ms: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    i = min(len(sorted_ms) - 1, max(0, round(q / 100 * len(sorted_ms)) - 1))
    return sorted_ms[i]


async def drive(call: Callable[[int], Awaitable[Any]], n: int, inflight: int) -> dict[str, Any]:
    """Run ``call(i)`` for i in range(n) with ``inflight`` at once; latency and rate."""
    latencies: list[float] = []
    counter = iter(range(n))

    async def lane() -> None:
        for i in counter:
            t0 = time.perf_counter()
            await call(i)
            latencies.append((time.perf_counter() - t0) * 1000)

    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(inflight):
            tg.create_task(lane())
    wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "n": n,
        "inflight": inflight,
        "wall_s": round(wall, 3),
        "per_s": round(n / wall, 1),
        "p50_ms": round(percentile(latencies, 50), 3),
        "p90_ms": round(percentile(latencies, 90), 3),
        "p99_ms": round(percentile(latencies, 99), 3),
        "max_ms": round(latencies[-1], 3),
    }


class CpuMeter:
    """CPU % of one core per named process over a window (utime+stime from /proc)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.t0 = time.monotonic()
        self.c0 = {name: cpu_seconds(pid)[0] for name, pid in pids.items()}

    def read(self) -> dict[str, float]:
        window = time.monotonic() - self.t0
        out = {}
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError):
                out[name] = round(100 * (cpu_seconds(pid)[0] - self.c0[name]) / window, 1)
        out["total"] = round(sum(out.values()), 1)
        return out


async def measured(
    call: Callable[[int], Awaitable[Any]], n: int, inflight: int, pids: dict[str, int]
) -> dict[str, Any]:
    meter = CpuMeter(pids)
    result = await drive(call, n, inflight)
    result["cpu_percent"] = meter.read()
    return result


# --------------------------------------------------------------- processes


class Realm:
    """Broker + processes + a client bus in this process; everything stopped on exit."""

    def __init__(
        self,
        broker: PrivateBroker,
        directory: Path,
        *,
        realm: str | None = None,
        secure: SecureRealm | None = None,
    ) -> None:
        self.broker = broker
        self.dir = directory
        self.realm = realm or "bench" + uuid.uuid4().hex[:8]
        self.secure = secure
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        mine = secure.credentials(secure.client) if secure else {}
        self.bus = Bus(
            build_config(
                {"realm": self.realm, "broker": {"url": broker.url, **mine}, "nodes": {}}
            ).broker,
            f"bench-client-{uuid.uuid4().hex[:6]}",
            password=secure.password(secure.client) if secure else None,
        )
        self.client = RealmClient(self.bus, self.realm)
        self.online: dict[str, asyncio.Event] = {}

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Realm]:
        bus_task = asyncio.create_task(self.bus.run())
        try:
            await self.bus.wait_connected(10)
            await self.bus.subscribe(topics.NODE_STATE.filter(realm=self.realm), self._on_state)
            await self.client.start()
            yield self
        finally:
            for name in list(self.procs):
                self.stop(name)
            bus_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await bus_task

    async def _on_state(self, msg: Inbound) -> None:
        fields = topics.NODE_STATE.parse(msg.topic)
        if fields is None or not msg.payload:
            return
        with contextlib.suppress(MessageError):
            if decode(msg.payload, NodeState).state == "online":
                self.online.setdefault(fields["node_id"], asyncio.Event()).set()

    def pids(self) -> dict[str, int]:
        pids = {name: p.pid for name, p in self.procs.items() if p.poll() is None}
        if self.broker._proc is not None:
            pids["broker"] = self.broker._proc.pid
        pids["bench"] = os.getpid()
        return pids

    def spawn(self, name: str, args: Sequence[str]) -> None:
        self.procs[name] = spawn(args, quiet=not os.environ.get("BENCH_VERBOSE"))

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None:
            with contextlib.suppress(Exception):
                stop(proc)

    async def start_worker(self, node_id: str, max_concurrency: int) -> None:
        config = worker_config(
            self.dir,
            broker_url=self.broker.url,
            realm=self.realm,
            node_id=node_id,
            max_concurrency=max_concurrency,
            credentials=self.secure.credentials(node_id) if self.secure else None,
        )
        event = self.online.setdefault(node_id, asyncio.Event())
        event.clear()
        self.spawn(node_id, [*mtor_command(), "node", "--config", str(config)])
        async with asyncio.timeout(ONLINE_TIMEOUT):
            await event.wait()

    async def start_orchestrator(
        self, *, profile: Path | None = None, direct_replies: bool = True
    ) -> None:
        secure = self.secure
        config = orchestrator_config(
            self.dir,
            self.broker.url,
            self.realm,
            credentials=secure.credentials("orchestrator") if secure else None,
            accounts_file=secure.accounts_file if secure else None,
            direct_replies=direct_replies,
        )
        cmd = [*mtor_command(), "orchestrator", "--config", str(config)]
        if profile is not None:  # cProfile writes its file when the process exits normally
            cmd = [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "daemon.cli.main"]
            cmd += ["orchestrator", "--config", str(config)]
        self.spawn("orchestrator", cmd)
        await self.wait_capability("echo")

    async def wait_capability(self, capability: str) -> None:
        """Until a task of ``capability`` completes (the orchestrator sees a peer)."""
        async with asyncio.timeout(ONLINE_TIMEOUT):
            while True:
                handle = await self.client.submit(capability, {"seconds": 0}, timeout=5)
                try:
                    async with asyncio.timeout(1.0):
                        await handle.result()
                except (TimeoutError, TaskFailed):
                    self.client.pending.pop(handle.task_id, None)
                    await asyncio.sleep(0.2)
                else:
                    return

    async def call(self, capability: str, payload: Any, *, direct: bool = True) -> Any:
        return await self.client.call(capability, payload, direct=direct)


class SecureRealm:
    """A generated broker directory (``mtor broker init``): accounts, passwords, ACL."""

    def __init__(self, directory: Path, realm: str, nodes: Sequence[str], client: str) -> None:
        from daemon.provision.brokerdir import BrokerDir

        self.realm, self.client = realm, client
        self.port = free_port()
        self.dir = BrokerDir.init(directory, realm, port=self.port, tls_port=None)
        for node in nodes:
            self.dir.add(node, "node")
        self.dir.add(client, "user")
        self.accounts_file = self.dir.accounts_file

    def password(self, name: str) -> str:
        return self.dir.password(name)

    def credentials(self, name: str) -> dict[str, Any]:
        return {
            "username": name,
            "password_file": str(self.dir.client_dir(name) / "password"),
        }

    def broker(self) -> PrivateBroker:
        return PrivateBroker.generated(self.dir.conf_file, self.port)


class DirectWorker:
    """The worker's own protocol without the orchestrator: assign → report."""

    def __init__(self, realm: Realm, node_id: str) -> None:
        self.bus = realm.bus
        self.task_topic = topics.NODE_TASK.build(realm=realm.realm, node_id=node_id)
        self.report_topic = topics.TASK_WORKER.build(realm=realm.realm, node_id=node_id)
        self.waiting: dict[str, asyncio.Future[WorkerReport]] = {}

    async def start(self) -> None:
        await self.bus.subscribe(self.report_topic, self._on_report)

    async def _on_report(self, msg: Inbound) -> None:
        report = decode(msg.payload, WorkerReport)
        if report.status in ("done", "failed", "rejected"):
            fut = self.waiting.pop(report.task_id, None)
            if fut is not None and not fut.done():
                fut.set_result(report)

    async def call(self, capability: str, payload: Any) -> Any:
        task_id = uuid.uuid4().hex
        fut = asyncio.get_running_loop().create_future()
        self.waiting[task_id] = fut
        assign = TaskAssign(task_id=task_id, attempt=1, capability=capability, input=payload)
        await self.bus.publish(self.task_topic, assign, wait=False)
        report = await fut
        if report.status != "done":
            raise RuntimeError(f"direct task {report.status}: {report.error}")
        return report.output
