"""Scaling: ``sleep`` tasks through the orchestrator with 1, 2, 4 worker processes.

One ``mtor orchestrator`` and N ``mtor node`` workers (reference node, ``sleep``
with ``max_concurrency`` c each) on a private Mosquitto.  With a sleep of
s seconds a worker can finish at most c/s tasks per second, so with
``in-flight = workers x c`` the ideal throughput is ``workers x c / s`` and
linear in the number of workers.  Workers are added one step at a time to
the same running orchestrator.

Reported per step: throughput, latency p50/p99, the scaling factor against
the measured 1-worker throughput (target ≥ 0.9 x linear) and the efficiency
against the ideal ``c / s`` per worker (the baseline: a perfect dispatcher).

    .venv/bin/python -m bench.scaling [--workers 1 2 4] [--concurrency 2]
        [--sleep 0.005] [--seconds 5] [--oversubscribe 1]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any, Final

from bench.common import emit, machine
from bench.realm import Realm, measured
from daemon.broker import PrivateBroker

TARGET_SCALING: Final = 0.9
SETTLE: Final = 1.0  # the orchestrator reads the new worker's state and info


async def measure(broker: PrivateBroker, args: argparse.Namespace) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    payload = {"seconds": args.sleep}
    c = args.concurrency
    with tempfile.TemporaryDirectory(prefix="mtor-bench-") as tmp:
        realm = Realm(broker, Path(tmp))
        async with realm.running():
            started = 0
            await realm.start_worker("w1", c)
            started = 1
            await realm.start_orchestrator()

            async def call(_i: int) -> Any:
                return await realm.call("sleep", payload)

            for workers in args.workers:
                while started < workers:
                    started += 1
                    await realm.start_worker(f"w{started}", c)
                await asyncio.sleep(SETTLE)
                ideal = workers * c / args.sleep
                inflight = workers * c * args.oversubscribe
                n = max(100, int(ideal * args.seconds))
                await measured(call, min(n, 200), inflight, realm.pids())  # warm-up
                step = await measured(call, n, inflight, realm.pids())
                step["workers"] = workers
                step["ideal_per_s"] = round(ideal, 1)
                step["efficiency_vs_ideal"] = round(step["per_s"] / ideal, 3)
                steps.append(step)
                print(f"{workers} workers: {step['per_s']}/s of {ideal:.0f}", file=sys.stderr)
    base = steps[0]["per_s"] / steps[0]["workers"]
    for step in steps:
        step["scaling_vs_1_worker"] = round(step["per_s"] / (base * step["workers"]), 3)
    worst = min(s["scaling_vs_1_worker"] for s in steps)
    return {
        "benchmark": "scaling",
        "sleep_s": args.sleep,
        "concurrency_per_worker": c,
        "oversubscribe": args.oversubscribe,
        "steps": steps,
        "target_scaling": TARGET_SCALING,
        "pass": worst >= TARGET_SCALING,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--concurrency", type=int, default=2, help="sleep slots per worker")
    parser.add_argument("--sleep", type=float, default=0.005, help="task duration (s)")
    parser.add_argument("--seconds", type=float, default=5.0, help="ideal duration of a step")
    parser.add_argument(
        "--oversubscribe",
        type=int,
        default=1,
        help="in flight = workers x concurrency x this (>1 keeps a queue in the orchestrator)",
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    if sorted(args.workers) != args.workers:
        raise SystemExit("--workers must be ascending")
    with PrivateBroker() as broker:
        return await measure(broker, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    emit({"machine": machine(), **asyncio.run(run(parser.parse_args()))})


if __name__ == "__main__":
    main()
