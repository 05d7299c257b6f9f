"""Workflow engine overhead: an event-triggered one-step workflow vs a raw task round trip.

One private Mosquitto, an in-process orchestrator and reference worker
(``echo``), and this process as the client.  Measured in the same run:

* ``raw_echo``: ``RealmClient.call("echo")`` round trip (the baseline);
* ``event_to_submit``: event published → the workflow's ``task/submit`` seen
  on the broker (the engine's reaction time: decode, match, conditions, run
  start, template render, submit);
* ``event_to_finished``: event published → the run's ``finished`` event
  (one ``echo`` step);
* ``overhead_per_step``: ``event_to_finished`` - ``raw_echo`` (p50), which
  also contains one extra broker hop for the event and one for ``finished``;
* ``runs_per_s``: many events at once (``max_concurrent`` high).

    .venv/bin/python -m bench.workflows [--n 300] [--burst 500]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from typing import Any, Final

from bench.common import emit, machine
from daemon.broker import PrivateBroker
from daemon.bus import Bus, Inbound
from daemon.client import RealmClient
from daemon.config import build_config
from daemon.messages import decode
from daemon.orchestrator.service import Orchestrator
from daemon.protocol.node import Event
from daemon.protocol.workflow import WorkflowEvent
from daemon.runtime import NodeDaemon

TARGET_OVERHEAD_MS: Final = 1.0
FLOW: Final = {
    "triggers": [{"type": "event", "topic": "+/bench/tick"}],
    "max_concurrent": 1000,
    "steps": [{"id": "e", "task": "echo", "input": {"n": "{{ trigger.value }}"}}],
}


# Both the benchmark client and the engine (user "workflows") submit as the anonymous
# "user" role; its default rate limit (50/s) would be what is measured otherwise.
UNLIMITED: Final = {"user": {"max_concurrent": 0, "rate_per_s": 0, "burst": 1}}
FLOWS: Final = {"tick": FLOW}


def _pct(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {
        "p50_ms": round(statistics.median(xs), 3),
        "p90_ms": round(xs[int(len(xs) * 0.9)], 3),
        "mean_ms": round(statistics.fmean(xs), 3),
    }


async def measure(broker: PrivateBroker, n: int, burst: int) -> dict[str, Any]:
    realm = "b" + uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory() as tmp:
        base: dict[str, Any] = {"realm": realm, "broker": {"url": broker.url}, "nodes": {}}
        orch = Orchestrator(
            build_config(
                {**base, "orchestrator": {"state_dir": tmp, "roles": UNLIMITED}, "workflows": FLOWS}
            )
        )
        worker = NodeDaemon(
            build_config({**base, "node_id": "w1", "nodes": {"ref": {"type": "reference"}}})
        )
        stops = [asyncio.Event(), asyncio.Event()]
        tasks = [asyncio.create_task(orch.run(stops[0])), asyncio.create_task(worker.run(stops[1]))]
        await asyncio.wait_for(orch._online.wait(), 10)
        await asyncio.wait_for(worker._online.wait(), 10)
        while not orch.registry.capable_online("echo"):  # noqa: ASYNC110 - no event for it
            await asyncio.sleep(0.01)
        bus = Bus(build_config(base).broker, "bench-" + uuid.uuid4().hex[:6])
        bus_task = asyncio.create_task(bus.run())
        await bus.wait_connected(5)
        client = RealmClient(bus, realm)
        await client.start()
        try:
            return await _phases(bus, client, realm, n, burst)
        finally:
            bus_task.cancel()
            for s in stops:
                s.set()
            await asyncio.gather(*tasks, return_exceptions=True)
    return {}


async def _phases(bus: Bus, client: RealmClient, realm: str, n: int, burst: int) -> dict[str, Any]:
    submits: dict[str, asyncio.Future[float]] = {}
    finished: dict[str, asyncio.Future[float]] = {}
    loop = asyncio.get_running_loop()

    async def on_submit(msg: Inbound) -> None:
        if b'"user":"workflows"' in msg.payload:
            for fut in submits.values():
                if not fut.done():
                    fut.set_result(time.perf_counter())
                    break

    async def on_event(msg: Inbound) -> None:
        ev = decode(msg.payload, WorkflowEvent)
        if ev.kind == "finished":
            for fut in finished.values():
                if not fut.done():
                    fut.set_result(time.perf_counter())
                    break

    await bus.subscribe(f"mtor/{realm}/task/submit", on_submit)
    await bus.subscribe(f"mtor/{realm}/workflow/tick/event", on_event)
    topic = f"mtor/{realm}/event/bench/bench/tick"
    for _ in range(20):  # warm-up
        await client.call("echo", {"n": 1})
    raw: list[float] = []
    for i in range(n):
        t0 = time.perf_counter()
        await client.call("echo", {"n": i})
        raw.append((time.perf_counter() - t0) * 1000)
    to_submit: list[float] = []
    to_finish: list[float] = []
    for i in range(n + 20):
        submits["x"] = loop.create_future()
        finished["x"] = loop.create_future()
        t0 = time.perf_counter()
        await bus.publish(topic, Event(value=i))
        t_sub = await asyncio.wait_for(submits["x"], 10)
        t_fin = await asyncio.wait_for(finished["x"], 10)
        if i >= 20:
            to_submit.append((t_sub - t0) * 1000)
            to_finish.append((t_fin - t0) * 1000)
    submits.clear()
    done = 0
    all_done = loop.create_future()

    async def count(msg: Inbound) -> None:
        nonlocal done
        if decode(msg.payload, WorkflowEvent).kind == "finished":
            done += 1
            if done == burst and not all_done.done():
                all_done.set_result(None)

    finished.clear()
    await bus.subscribe(f"mtor/{realm}/workflow/+/event", count)
    t0 = time.perf_counter()
    for i in range(burst):
        await bus.publish(topic, Event(value=i), wait=False)
    try:
        await asyncio.wait_for(all_done, 60)
    except TimeoutError:
        print(f"burst: only {done} of {burst} runs finished", file=sys.stderr)
    runs_per_s = done / (time.perf_counter() - t0)
    raw_s, fin_s = _pct(raw), _pct(to_finish)
    overhead = round(fin_s["p50_ms"] - raw_s["p50_ms"], 3)
    return {
        "raw_echo": raw_s,
        "event_to_submit": _pct(to_submit),
        "event_to_finished": fin_s,
        "overhead_per_step_p50_ms": overhead,
        "runs_per_s": round(runs_per_s, 1),
        "n": n,
        "burst": burst,
        "burst_finished": done,
        "target_overhead_ms": TARGET_OVERHEAD_MS,
        "pass": overhead <= TARGET_OVERHEAD_MS and done == burst,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--burst", type=int, default=500)
    args = parser.parse_args()

    async def run() -> dict[str, Any]:
        with PrivateBroker() as broker:
            return {"machine": machine(), "workflows": await measure(broker, args.n, args.burst)}

    out = asyncio.run(run())
    print(out["workflows"], file=sys.stderr)
    emit(out)


if __name__ == "__main__":
    main()
