"""Gateway overhead: the same task over HTTP and over MQTT, in the same run; chat
time to first token through the gateway against the realm client (what `mtor ask`
uses); WebSocket event fan-out to many clients.

    .venv/bin/python -m bench.gateway [--n 400] [--clients 50] [--events 200] [--chat]
        [--chat-runs 10] [--phases echo,fanout]

Real processes, as `mtor up` runs them: a generated broker directory (accounts,
passwords, ACL), `mtor orchestrator`, `mtor node` (a reference node, echo with
max_concurrency 64; with --chat also SmolLM2) and `mtor gateway`, each logged in
with its own account.  Both paths act as the sysop (no per-user limits): over MQTT
with the `admin` broker account and RealmClient, over HTTP with the sysop's API
token and httpx (keep-alive, one connection per request in flight).

One JSON document on stdout (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import httpx
import websockets

from bench.common import emit, machine, mtor_command, spawn, stop
from bench.realm import CpuMeter, drive, percentile
from daemon import __version__, topics
from daemon.broker import PrivateBroker, free_port
from daemon.bus import Bus
from daemon.client import RealmClient
from daemon.config import Config, build_config, read_yaml
from daemon.protocol.node import Event
from daemon.provision.local import LocalBroker, child_config, prepare

ONLINE_TIMEOUT: Final = 60.0
SENSOR: Final = "bench-sensor"  # the node account the fan-out events come from


class Setup:
    def __init__(self, directory: Path, chat: bool) -> None:
        self.dir = directory
        self.chat = chat
        self.realm = "gwbench" + uuid.uuid4().hex[:6]
        self.port = free_port()
        self.procs: dict[str, Any] = {}
        self.base: dict[str, Any] = {
            "realm": self.realm,
            "logging": {"level": "warning"},
            "daemon": {"state_dir": str(directory / "state")},
            "orchestrator": {"state_dir": str(directory / "orch"), "queue_size": 100_000},
            "gateway": {"port": self.port, "max_ws_clients": 1000},
        }
        nodes: dict[str, Any] = {
            "ref": {"type": "reference", "max_concurrency": 64, "capabilities": ["echo"]}
        }
        if chat:
            nodes["mind"] = {
                "type": "chat",
                "backends": [{"type": "llama_cpp", "n_threads": 2, "warmup_tokens": 8}],
            }
        self.nodes = nodes

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Setup]:
        seed = build_config({**self.base, "node_id": "box", "nodes": {}})
        self.local: LocalBroker = await asyncio.to_thread(prepare, seed)
        self.local.dir.add(SENSOR, "node", local=True)
        broker = PrivateBroker.generated(self.local.dir.conf_file, self.local.port)
        await asyncio.to_thread(broker.start)
        try:
            for role, account, extra in (
                ("orchestrator", "orchestrator", {}),
                ("node", "box", {"nodes": self.nodes}),
                ("gateway", "gateway", {}),
            ):
                path = child_config(self.local, account, {**self.base, **extra}, role)
                args = [*mtor_command(), role, "--config", str(path)]
                self.procs[role] = spawn(args)
            self.token = await self._sysop_token()
            yield self
        finally:
            for proc in self.procs.values():
                with contextlib.suppress(Exception):
                    stop(proc)
            await asyncio.to_thread(broker.cleanup)

    async def _sysop_token(self) -> str:
        token_file = self.dir / "orch" / "sysop.token"
        async with asyncio.timeout(ONLINE_TIMEOUT):
            while not token_file.is_file():  # noqa: ASYNC110 - another process writes it
                await asyncio.sleep(0.1)
        return token_file.read_text().strip()

    def config(self, account: str) -> Config:
        return build_config(read_yaml(child_config(self.local, account, self.base, "bench")))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pids(self) -> dict[str, int]:
        """The realm's processes and this one (the clients: httpx, RealmClient)."""
        return {**{name: p.pid for name, p in self.procs.items()}, "bench": os.getpid()}


@contextlib.asynccontextmanager
async def bus_for(config: Config) -> AsyncIterator[Bus]:
    bus = Bus(config.broker, f"bench-{uuid.uuid4().hex[:8]}", password=config.broker_password())
    task = asyncio.create_task(bus.run())
    try:
        await bus.wait_connected(10)
        yield bus
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def wait_ready(http: httpx.AsyncClient, client: RealmClient, capabilities: set[str]) -> None:
    async with asyncio.timeout(ONLINE_TIMEOUT):
        while True:
            with contextlib.suppress(httpx.HTTPError):
                r = await http.get("/api/capabilities")
                if r.status_code == 200 and capabilities <= set(r.json()):
                    break
            await asyncio.sleep(0.2)
        await client.call("echo", "warm", timeout=10)


async def echo_phase(
    s: Setup, http: httpx.AsyncClient, client: RealmClient, n: int
) -> dict[str, Any]:
    async def over_mqtt(i: int) -> None:
        out = await client.call("echo", {"i": i}, timeout=30)
        assert out == {"i": i}, out

    async def over_http(i: int) -> None:
        body = {"capability": "echo", "input": {"i": i}, "wait": True}
        r = await http.post("/api/tasks", json=body)
        assert r.status_code == 202 and r.json()["output"] == {"i": i}, r.text

    async def http_only(i: int) -> None:
        r = await http.get("/api/whoami")  # the HTTP stack alone: no realm behind it
        assert r.status_code == 200, r.text

    out: dict[str, Any] = {}
    await drive(over_mqtt, 50, 4)  # warm both paths
    await drive(over_http, 50, 4)
    for inflight in (1, 16):
        count = n if inflight == 1 else n * 4
        runs = (("mqtt", over_mqtt), ("http", over_http), ("http_stack_only", http_only))
        for name, call in runs:
            meter = CpuMeter(s.pids())
            result = await drive(call, count, inflight)
            result["cpu_percent"] = meter.read()
            out[f"{name}_inflight_{inflight}"] = result
        out[f"overhead_p50_ms_inflight_{inflight}"] = round(
            out[f"http_inflight_{inflight}"]["p50_ms"] - out[f"mqtt_inflight_{inflight}"]["p50_ms"],
            3,
        )
    return out


async def chat_phase(http: httpx.AsyncClient, client: RealmClient, runs: int) -> dict[str, Any]:
    """Time to the first streamed token: RealmClient (as `mtor ask`) vs the gateway."""
    prompt = [{"role": "user", "content": "Name three colours."}]

    async def ttft_mqtt() -> float:
        t0 = time.perf_counter()
        handle = await client.submit("chat", {"messages": prompt, "max_tokens": 8})
        first = None
        async for update in handle:
            if first is None and update.status == "partial":
                first = time.perf_counter() - t0
        assert first is not None
        return first * 1000

    async def ttft_http() -> float:
        body = {"model": "chat", "messages": prompt, "max_tokens": 8, "stream": True}
        t0 = time.perf_counter()
        first = None
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                text = line.startswith("data: {") and '"content": "' in line
                if first is None and text and '"content": ""' not in line:
                    first = time.perf_counter() - t0
        assert first is not None
        return first * 1000

    mqtt: list[float] = []
    web: list[float] = []
    await ttft_mqtt()
    await ttft_http()
    for i in range(runs):  # alternated, and which goes first too: drift hits both alike
        if i % 2:
            mqtt.append(await ttft_mqtt())
            web.append(await ttft_http())
        else:
            web.append(await ttft_http())
            mqtt.append(await ttft_mqtt())
    return {
        "runs": runs,
        "mqtt_ttft_ms": [round(x, 1) for x in mqtt],
        "http_ttft_ms": [round(x, 1) for x in web],
        "mqtt_ttft_p50_ms": round(statistics.median(mqtt), 1),
        "http_ttft_p50_ms": round(statistics.median(web), 1),
        "overhead_p50_ms": round(statistics.median(web) - statistics.median(mqtt), 1),
        "mqtt_ttft_min_ms": round(min(mqtt), 1),
        "http_ttft_min_ms": round(min(web), 1),
        "target_overhead_ms": 5,
    }


async def fanout_phase(s: Setup, clients: int, events: int, rate: float) -> dict[str, Any]:
    """``clients`` WebSockets logged in; ``events`` sensor events published at ``rate``/s
    and then as one burst: delivery latency (publish -> each client) and losses."""
    ws_url = s.url.replace("http://", "ws://") + "/api/ws"
    socks = []
    for _ in range(clients):
        ws = await websockets.connect(ws_url, max_size=None)
        await ws.send(json.dumps({"token": s.token}))
        assert json.loads(await ws.recv())["kind"] == "snapshot"
        socks.append(ws)
    result: dict[str, Any] = {"clients": clients}
    try:
        async with bus_for(s.config(SENSOR)) as bus:
            topic = topics.EVENT.build(realm=s.realm, node_id=SENSOR, domain="bench", name="tick")
            for phase, interval in (("paced", 1 / rate), ("burst", 0.0)):
                run = uuid.uuid4().hex[:8]
                lat: list[float] = []
                got = [0] * clients

                async def reader(
                    k: int, ws: Any, run: str = run, lat: list[float] = lat, got: list[int] = got
                ) -> None:
                    while got[k] < events:
                        msg = json.loads(await ws.recv())
                        if msg["kind"] != "event" or msg["data"]["attrs"].get("run") != run:
                            continue
                        lat.append((time.time() - msg["data"]["attrs"]["t"]) * 1000)
                        got[k] += 1

                meter = CpuMeter(s.pids())
                readers = [asyncio.create_task(reader(k, ws)) for k, ws in enumerate(socks)]
                t0 = time.perf_counter()
                for i in range(events):
                    ev = Event(value=i, attrs={"run": run, "t": time.time()})
                    await bus.publish(topic, ev, qos=0, wait=False)
                    if interval:
                        await asyncio.sleep(interval)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(30):
                        await asyncio.gather(*readers)
                for t in readers:
                    t.cancel()
                wall = time.perf_counter() - t0
                lat.sort()
                delivered = sum(got)
                result[phase] = {
                    "events": events,
                    "rate_per_s": rate if interval else None,
                    "delivered": delivered,
                    "expected": events * clients,
                    "messages_per_s": round(delivered / wall, 1),
                    "p50_ms": round(percentile(lat, 50), 2) if lat else None,
                    "p99_ms": round(percentile(lat, 99), 2) if lat else None,
                    "max_ms": round(lat[-1], 2) if lat else None,
                    "cpu_percent": meter.read(),
                }
    finally:
        for ws in socks:
            with contextlib.suppress(Exception):
                await ws.close()
    return result


async def main(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "bench": "gateway",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "mtor_version": __version__,
        "machine": machine(),
    }
    with tempfile.TemporaryDirectory(prefix="mtor-gw-bench-") as tmp:
        s = Setup(Path(tmp), args.chat)
        async with s.running():
            limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
            headers = {"Authorization": f"Bearer {s.token}"}
            async with (
                httpx.AsyncClient(
                    base_url=s.url, headers=headers, timeout=60, limits=limits
                ) as http,
                bus_for(s.config("admin")) as bus,
            ):
                client = RealmClient(bus, s.realm)
                await client.start()
                await wait_ready(http, client, {"echo", "chat"} if args.chat else {"echo"})
                if "echo" in args.phases:
                    out["echo"] = await echo_phase(s, http, client, args.n)
                if args.chat:
                    out["chat"] = await chat_phase(http, client, args.chat_runs)
                if "fanout" in args.phases:
                    out["fanout"] = await fanout_phase(s, args.clients, args.events, args.rate)
    return out


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=400, help="echo tasks at 1 in flight (x4 at 16)")
    p.add_argument("--clients", type=int, default=50, help="WebSocket clients")
    p.add_argument("--events", type=int, default=200, help="events per fan-out phase")
    p.add_argument("--rate", type=float, default=100.0, help="paced events per second")
    p.add_argument("--chat", action="store_true", help="also chat TTFT (needs the chat extra)")
    p.add_argument("--chat-runs", type=int, default=10)
    p.add_argument(
        "--phases", default="echo,fanout", help="comma-separated: echo, fanout (default both)"
    )
    args = p.parse_args()
    args.phases = set(args.phases.split(","))
    emit(asyncio.run(main(args)))


if __name__ == "__main__":
    cli()
