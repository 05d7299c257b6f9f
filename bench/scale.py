"""Scale: one orchestrator and 1,000 simulated node daemons on one Mosquitto.

A private Mosquitto (``max_connections -1``, ``$SYS`` every second), one real
``mtor orchestrator`` process on an open realm, and N simulated node daemons
(:mod:`bench.simnodes`: one MQTT connection each, ``--per-process`` of them
per OS process) that speak the node protocol with the project's own classes.
Everything is observed from outside the orchestrator: its registry through
the admin ``peers`` view (what ``mtor admin peers`` shows), its memory and CPU
from ``/proc``, the broker's traffic from ``$SYS/broker/...``.

Each step (the baseline, default 100 nodes, then ``--nodes``) gets a fresh
broker and orchestrator, and measures:

* ``register``: from spawning the simulator processes until the registry
  holds all N peers online with ``echo`` (target ≤ 10 s at 1,000);
* ``idle``: over ``--seconds``, orchestrator CPU % and RSS (target ≤ 150 MB at
  1,000 peers; RSS with no peer is the ``empty`` reading), broker CPU and
  packets per second received / sent (all MQTT packets; PUBLISH only for sent),
  bytes per second (what the broker sent this benchmark subtracted), and the
  size of the retained
  ``orchestrator/stats``;
* ``latency``: ``--tasks`` echo tasks one after another through
  :class:`~daemon.client.RealmClient` — submit → result p50/p99, and the
  orchestrator's ``queue_ms`` (its receipt of the submission → assignment: the
  decision time it reports);
* ``restart``: the orchestrator stopped and started again while the N nodes
  stay up: until it answers, and until its registry holds all N again from
  the retained adverts.

    flock /tmp/bench.lock .venv/bin/python -m bench.scale --nodes 1000 [--json]
        [--baseline 100] [--per-process 200] [--seconds 30] [--tasks 300] [--quick]

JSON on stdout (``--json``: only the JSON); progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from bench.__main__ import _git_describe
from bench.common import clean_env, cpu_seconds, emit, machine, mtor_command, rss_kib
from bench.realm import orchestrator_config, percentile
from bench.simnodes import raise_fd_limit
from daemon import topics
from daemon.broker import PrivateBroker
from daemon.bus import Bus, Inbound
from daemon.client import RealmClient, TaskFailed
from daemon.config import build_config
from daemon.errors import MessageError, MtorError
from daemon.messages import decode
from daemon.protocol.node import NodeState

TARGET_REGISTER_S: Final = 10.0  # issue 15: 1,000 simulated nodes registered
TARGET_RSS_MB: Final = 150.0  # issue 15: orchestrator with 1,000 peers
TARGET_AT: Final = 1000  # the targets are stated for this many nodes
TARGET_REANNOUNCE_S: Final = 5.0  # issue 15: every node re-announced after a broker restart
# Connections unlimited; $SYS counters every second (Mosquitto's default is 10 s).
BROKER_CONFIG: Final = "max_connections -1\nsys_interval 1\n"
# Not publish/messages/received: Mosquitto (2.0.11) counts a PUBLISH there only when
# `command & 0xF5 == 0x30`, so retained ones (health, adverts, births) never count.
SYS_TOPICS: Final = (
    "$SYS/broker/messages/received",
    "$SYS/broker/messages/sent",
    "$SYS/broker/publish/messages/sent",
    "$SYS/broker/bytes/received",
    "$SYS/broker/bytes/sent",
    "$SYS/broker/clients/connected",
)
POLL: Final = 0.25  # between two reads of the registry (admin 'peers')
SETTLE: Final = 3.0  # after registration: the last adverts and health are read
READY_TIMEOUT: Final = 30.0  # the orchestrator answers its first admin request
WARMUP_TASKS: Final = 20
TASK_TIMEOUT: Final = 10.0  # per echo task (s)
LATENCY_BUDGET: Final = 60.0  # the latency phase stops sending after this (s)
PREFIX: Final = "sim"

log = logging.getLogger(__name__)


@dataclass
class SysCounters:
    """``$SYS/broker/...`` values as they arrive, with monotonic arrival times."""

    samples: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    delivered: int = 0  # $SYS messages the broker sent us (they count in 'sent')
    delivered_bytes: int = 0  # and their topics and payloads (headers not counted)

    async def on_message(self, msg: Inbound) -> None:
        self.delivered += 1
        self.delivered_bytes += len(msg.topic) + len(msg.payload)
        with contextlib.suppress(ValueError):
            value = float(msg.payload.split()[0])
            self.samples.setdefault(msg.topic, []).append((time.monotonic(), value))

    def latest(self, topic: str) -> float | None:
        got = self.samples.get(topic)
        return got[-1][1] if got else None

    def rate(self, topic: str, start: float, end: float) -> float | None:
        """Per second between the first sample at/after ``start`` and the last before ``end``
        (a counter the broker did not republish did not change)."""
        inside = [s for s in self.samples.get(topic, []) if start <= s[0] <= end]
        before = [s for s in self.samples.get(topic, []) if s[0] < start]
        if before:
            inside.insert(0, (start, before[-1][1]))
        if not inside:
            return 0.0
        return (inside[-1][1] - inside[0][1]) / (end - start)


@dataclass
class Step:
    """One broker, one orchestrator, N simulated nodes, and the client that watches."""

    nodes: int
    per_process: int
    directory: Path
    broker: PrivateBroker
    realm: str = field(default_factory=lambda: "scale" + uuid.uuid4().hex[:8])
    orch: subprocess.Popen[bytes] | None = None
    sims: list[asyncio.subprocess.Process] = field(default_factory=list)
    sim_events: list[dict[str, Any]] = field(default_factory=list)
    sys: SysCounters = field(default_factory=SysCounters)
    stats_bytes: int = 0
    orch_name: str = "orchestrator"
    births: set[str] = field(default_factory=set)  # simulated nodes heard online since reset
    all_born: asyncio.Event = field(default_factory=asyncio.Event)
    _logs: list[IO[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        config = build_config(
            {"realm": self.realm, "broker": {"url": self.broker.url}, "nodes": {}}, environ={}
        )
        self.bus = Bus(config.broker, f"bench-scale-{uuid.uuid4().hex[:6]}")
        self.client = RealmClient(self.bus, self.realm)

    # ----------------------------------------------------------- processes

    def _log(self, name: str) -> IO[bytes]:
        f = (self.directory / f"{name}.log").open("wb")
        self._logs.append(f)
        return f

    def start_orchestrator(self, name: str) -> None:
        self.orch_name = name
        config = orchestrator_config(self.directory, self.broker.url, self.realm)
        self.orch = subprocess.Popen(
            [*mtor_command(), "orchestrator", "--config", str(config)],
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log(name),
            start_new_session=True,
        )

    def stop_orchestrator(self) -> None:
        proc, self.orch = self.orch, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    async def start_sims(self) -> None:
        count = math.ceil(self.nodes / self.per_process)
        for i in range(count):
            first = i * self.per_process
            n = min(self.per_process, self.nodes - first)
            cmd = [sys.executable, "-m", "bench.simnodes", "--broker", self.broker.url]
            cmd += ["--realm", self.realm, "--prefix", PREFIX, "--first", str(first)]
            cmd += ["--count", str(n)]
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                env=clean_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=self._log(f"sim{i}"),
                start_new_session=True,
            )
            self.sims.append(proc)
            asyncio.get_running_loop().create_task(self._read_sim(i, proc))

    async def _read_sim(self, i: int, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            with contextlib.suppress(ValueError):
                self.sim_events.append({"process": i, "mono": time.monotonic(), **json.loads(line)})

    async def stop_sims(self) -> None:
        for proc in self.sims:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in self.sims:
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        self.sims.clear()

    def sim_pids(self) -> list[int]:
        return [p.pid for p in self.sims if p.returncode is None]

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Step]:
        bus_task = asyncio.create_task(self.bus.run())
        try:
            await self.bus.wait_connected(10)
            for topic in SYS_TOPICS:
                await self.bus.subscribe(topic, self.sys.on_message, qos=0)
            await self.bus.subscribe(
                topics.ORCH_STATS.build(realm=self.realm), self._on_stats, qos=0
            )
            await self.bus.subscribe(topics.NODE_STATE.filter(realm=self.realm), self._on_birth)
            await self.client.start()
            yield self
        finally:
            await self.stop_sims()
            self.stop_orchestrator()
            bus_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await bus_task
            for f in self._logs:
                f.close()

    async def _on_stats(self, msg: Inbound) -> None:
        self.stats_bytes = len(msg.payload)
        self.sys.delivered += 1  # our subscription, not the realm's traffic
        self.sys.delivered_bytes += len(msg.topic) + len(msg.payload)

    async def _on_birth(self, msg: Inbound) -> None:
        fields = topics.NODE_STATE.parse(msg.topic)
        if fields is not None and msg.payload:
            with contextlib.suppress(MessageError):
                node_id = fields["node_id"]
                if node_id.startswith(PREFIX) and decode(msg.payload, NodeState).state == "online":
                    self.births.add(node_id)
                    if len(self.births) >= self.nodes:
                        self.all_born.set()

    async def wait_births(self, t0: float, timeout: float) -> float | None:
        """Until every simulated node has published its birth again (s since ``t0``)."""
        try:
            async with asyncio.timeout(timeout):
                await self.all_born.wait()
        except TimeoutError:
            return None
        return round(time.monotonic() - t0, 2)

    # ------------------------------------------------------------- readings

    async def wait_ready(self) -> float:
        """Until the orchestrator answers an admin request (s since now)."""
        t0 = time.monotonic()
        async with asyncio.timeout(READY_TIMEOUT):
            while True:
                self.check_orchestrator()
                with contextlib.suppress(MtorError):
                    await self.client.admin("peers", timeout=1.0)
                    return time.monotonic() - t0
                await asyncio.sleep(POLL)

    def check_orchestrator(self) -> None:
        if self.orch is None or self.orch.poll() is not None:
            tail = (self.directory / f"{self.orch_name}.log").read_text(errors="replace")
            raise SystemExit(f"the orchestrator exited:\n{tail[-2000:]}")

    async def registered(self) -> int:
        """Simulated peers the orchestrator's registry holds online with ``echo``."""
        peers = await self.client.admin("peers", timeout=5.0)
        return sum(
            1
            for node_id, p in peers.items()
            if node_id.startswith(PREFIX) and p["online"] and "echo" in p["slots"]
        )

    async def wait_registered(self, t0: float, timeout: float) -> dict[str, Any]:
        """Poll the registry until it holds all N; seconds since ``t0`` (monotonic).
        Past ``timeout``: ``s`` is None and ``seen`` says how many it held."""
        polls = 0
        seen = 0
        try:
            async with asyncio.timeout(timeout):
                while True:
                    self.check_orchestrator()
                    polls += 1
                    with contextlib.suppress(MtorError):
                        seen = await self.registered()
                    if seen >= self.nodes:
                        return {"s": round(time.monotonic() - t0, 2), "polls": polls}
                    await asyncio.sleep(POLL)
        except TimeoutError:
            return {"s": None, "seen": seen, "polls": polls}

    def cpu(self) -> dict[str, float]:
        assert self.orch is not None and self.broker.pid is not None
        return {
            "orchestrator": cpu_seconds(self.orch.pid)[0],
            "broker": cpu_seconds(self.broker.pid)[0],
            "simulators": sum(cpu_seconds(pid)[0] for pid in self.sim_pids()),
            "bench": cpu_seconds(os.getpid())[0],
        }

    def orch_rss(self) -> dict[str, float]:
        assert self.orch is not None
        kib = rss_kib(self.orch.pid)
        return {
            "rss_mb": round(kib["VmRSS"] / 1024, 1),
            "hwm_mb": round(kib["VmHWM"] / 1024, 1),
            "anon_mb": round(kib.get("RssAnon", 0) / 1024, 1),
        }


def cpu_percent(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    return {k: round(100 * (after[k] - before[k]) / wall, 1) for k in after}


def broker_problems(broker: PrivateBroker) -> list[str]:
    words = ("error", "warning", "refus", "limit", "too many")
    return [line for line in broker.log_tail(200) if any(w in line.lower() for w in words)]


def log_problems(path: Path, limit: int = 10) -> list[str]:
    """The orchestrator's WARNING / ERROR lines (it logs at warning in this benchmark)."""
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    found = [line[:300] for line in lines if "WARNING" in line or "ERROR" in line]
    return found[:limit] + ([f"... {len(found) - limit} more"] if len(found) > limit else [])


async def idle(step: Step, seconds: float) -> dict[str, Any]:
    cpu0 = step.cpu()
    delivered0, delivered_bytes0 = step.sys.delivered, step.sys.delivered_bytes
    start = time.monotonic()
    await asyncio.sleep(seconds)
    end = time.monotonic()
    wall = end - start
    # What the broker sent this benchmark ($SYS, orchestrator/stats) counts as sent.
    own = (step.sys.delivered - delivered0) / wall
    own_bytes = (step.sys.delivered_bytes - delivered_bytes0) / wall
    rates = {t.removeprefix("$SYS/broker/"): step.sys.rate(t, start, end) for t in SYS_TOPICS[:5]}
    rounded = {
        "received_per_s": rates["messages/received"] or 0.0,
        "sent_per_s": (rates["messages/sent"] or 0.0) - own,
        "publish_sent_per_s": (rates["publish/messages/sent"] or 0.0) - own,
        "bytes_received_per_s": rates["bytes/received"] or 0.0,
        "bytes_sent_per_s": (rates["bytes/sent"] or 0.0) - own_bytes,
    }
    return {
        "seconds": round(wall, 1),
        "cpu_percent": cpu_percent(cpu0, step.cpu(), wall),
        "orchestrator": step.orch_rss(),
        "broker_messages": {k: round(max(0.0, v), 1) for k, v in rounded.items()},
        "broker_clients": step.sys.latest("$SYS/broker/clients/connected"),
        "stats_payload_bytes": step.stats_bytes,
    }


async def latency(step: Step, tasks: int) -> dict[str, Any]:
    total: list[float] = []
    queue: list[float] = []
    nodes: set[str] = set()
    cpu0, t0 = step.cpu(), time.monotonic()
    failed: Counter[str] = Counter()
    done = 0
    for i in range(WARMUP_TASKS + tasks):
        if time.monotonic() - t0 > LATENCY_BUDGET:
            failed["not_sent_budget_spent"] += WARMUP_TASKS + tasks - i
            break
        started = time.perf_counter()
        handle = await step.client.submit("echo", {"i": i}, timeout=TASK_TIMEOUT)
        try:
            async with asyncio.timeout(TASK_TIMEOUT + 1):
                await handle.result()
        except TaskFailed as exc:  # counted, not fatal: a realm in trouble is a result
            failed[exc.code] += 1
            continue
        except TimeoutError:
            step.client.pending.pop(handle.task_id, None)
            failed["no_answer"] += 1
            continue
        done += 1
        if i < WARMUP_TASKS:
            continue
        total.append((time.perf_counter() - started) * 1000)
        final = handle.final
        if final is not None:
            if final.queue_ms is not None:
                queue.append(final.queue_ms)
            if final.node:
                nodes.add(final.node)
    wall = time.monotonic() - t0
    total.sort()
    queue.sort()
    if not total:
        return {"tasks": tasks, "failed": dict(failed)}
    out: dict[str, Any] = {
        "tasks": tasks,
        "failed": dict(failed),
        "inflight": 1,
        "per_s": round(done / wall, 1),  # finished one after another, warm-up included
        "p50_ms": round(percentile(total, 50), 3),
        "p99_ms": round(percentile(total, 99), 3),
        "max_ms": round(total[-1], 3),
        "distinct_workers": len(nodes),
        "cpu_percent": cpu_percent(cpu0, step.cpu(), wall),
    }
    if queue:
        out["orchestrator_queue_ms"] = {
            "p50": round(percentile(queue, 50), 3),
            "p99": round(percentile(queue, 99), 3),
        }
    return out


def note(text: str) -> None:
    log.info("%s", text)


async def measure_step(nodes: int, args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit(nodes * 2 + 1024)  # Mosquitto inherits it: one socket per node
    with (
        tempfile.TemporaryDirectory(prefix="mtor-scale-") as tmp,
        PrivateBroker(extra_config=BROKER_CONFIG) as broker,
    ):
        step = Step(nodes, args.per_process, Path(tmp), broker)
        async with step.running():
            out: dict[str, Any] = {"nodes": nodes, "processes": math.ceil(nodes / args.per_process)}
            step.start_orchestrator("orchestrator")
            out["orchestrator_ready_s"] = round(await step.wait_ready(), 2)
            await asyncio.sleep(1.0)
            out["empty"] = step.orch_rss()

            note(f"[{nodes}] starting {out['processes']} simulator processes")
            cpu0, t0 = step.cpu(), time.monotonic()
            await step.start_sims()
            reg = await step.wait_registered(t0, args.register_timeout)
            wall = time.monotonic() - t0
            reg["cpu_percent"] = cpu_percent(cpu0, step.cpu(), wall)
            reg["cpu_s"] = {k: round(v * wall / 100, 2) for k, v in reg["cpu_percent"].items()}
            started = [e["mono"] - t0 for e in step.sim_events if e["event"] == "started"]
            announced = [e["mono"] - t0 for e in step.sim_events if e["event"] == "announced"]
            reg["simulators_imported_s"] = round(max(started), 2) if started else None
            if len(announced) == out["processes"]:
                reg["simulators_announced_s"] = round(max(announced), 2)
            reg["connects"] = sum(e.get("connects", 0) for e in step.sim_events)
            reg["pass"] = None  # the targets are for TARGET_AT nodes
            if nodes >= TARGET_AT:
                reg["pass"] = reg["s"] is not None and reg["s"] <= TARGET_REGISTER_S
            out["register"] = reg
            note(f"[{nodes}] registered in {reg['s']} s; idle for {args.seconds:g} s")

            await asyncio.sleep(SETTLE)
            out["idle"] = await idle(step, args.seconds)
            rss = out["idle"]["orchestrator"]["rss_mb"]
            out["idle"]["pass"] = rss <= TARGET_RSS_MB if nodes >= TARGET_AT else None
            out["idle"]["per_peer_kb"] = round((rss - out["empty"]["rss_mb"]) * 1024 / nodes, 1)
            note(f"[{nodes}] orchestrator {rss} MB; {args.tasks} echo tasks")

            out["latency"] = await latency(step, args.tasks)

            note(f"[{nodes}] broker restart")
            step.births.clear()
            step.all_born.clear()
            t0 = time.monotonic()
            broker.restart()  # no persistence: every retained birth and advert is gone
            back = await step.wait_births(t0, args.register_timeout)
            reg3 = await step.wait_registered(t0, args.register_timeout)
            out["broker_restart"] = {
                "reannounced_s": back,
                "registered_s": reg3["s"],
                "pass": None,
            }
            if nodes >= TARGET_AT:
                out["broker_restart"]["pass"] = back is not None and back <= TARGET_REANNOUNCE_S
            await asyncio.sleep(SETTLE)

            note(f"[{nodes}] orchestrator restart")
            step.stop_orchestrator()
            t0 = time.monotonic()
            step.start_orchestrator("orchestrator-restart")
            ready = await step.wait_ready()
            reg2 = await step.wait_registered(t0, args.register_timeout)
            await asyncio.sleep(SETTLE)
            out["restart"] = {
                "ready_s": round(ready, 2),
                "registered_s": reg2["s"],
                "orchestrator": step.orch_rss(),
            }
            out["broker_log"] = broker_problems(broker)
            out["orchestrator_log"] = log_problems(step.directory / "orchestrator.log")
            out["orchestrator_log"] += log_problems(step.directory / "orchestrator-restart.log")
            note(
                f"[{nodes}] echo p50 {out['latency'].get('p50_ms')} ms, "
                f"failed {out['latency']['failed']}; restart: all {nodes} again in {reg2['s']} s"
            )
            return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [n for n in (args.baseline, args.nodes) if n]
    steps = [await measure_step(n, args) for n in sorted(set(sizes))]
    final = steps[-1]
    return {
        "benchmark": "scale",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "git": _git_describe(),
        "machine": machine(),
        "args": {
            k: getattr(args, k) for k in ("nodes", "baseline", "per_process", "seconds", "tasks")
        },
        "targets": {
            "register_s": TARGET_REGISTER_S,
            "orchestrator_rss_mb": TARGET_RSS_MB,
            "reannounce_s": TARGET_REANNOUNCE_S,
            "at_nodes": TARGET_AT,
        },
        "steps": steps,
        "pass": {
            "register": final["register"]["pass"],
            "rss": final["idle"]["pass"],
            "reannounce": final["broker_restart"]["pass"],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1000, help="simulated node daemons")
    parser.add_argument("--baseline", type=int, default=100, help="a first step (0: none)")
    parser.add_argument("--per-process", type=int, default=200, help="simulated nodes per process")
    parser.add_argument("--seconds", type=float, default=30.0, help="idle window (s)")
    parser.add_argument("--tasks", type=int, default=300, help="echo tasks for the latency")
    parser.add_argument(
        "--register-timeout", type=float, default=60.0, help="give up waiting for all N (s)"
    )
    parser.add_argument("--quick", action="store_true", help="200 nodes, 10 s idle, 100 tasks")
    parser.add_argument("--json", action="store_true", help="JSON only (no progress lines)")
    args = parser.parse_args()
    if args.quick:
        args.nodes, args.seconds, args.tasks = 200, 10.0, 100
    if not args.json:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    result = asyncio.run(run(args))
    emit(result)


if __name__ == "__main__":
    main()
