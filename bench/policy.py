"""Assignment decision time and registry memory with 1,000 simulated peers.

In-process, no broker.  A real :class:`~daemon.orchestrator.registry.Registry`
is fed the same ``state`` / ``info`` / ``health`` messages 1,000 peers would
send (each advertising ``echo``, varied slots in use, host load, latency and
success), then ``Orchestrator._pick`` — the decision the orchestrator makes
for every assignment: sample the free set, build candidates, ``policy.choose``
— is timed on an ``Orchestrator`` that is constructed but never run.

Cases:

* ``pick``: an unconstrained task (the common case, power of d choices);
* ``pick_constrained``: a task with a ``language`` only 1 % of peers offer,
  so the sample rarely fits and ``_pick`` falls back to scanning the free set;
* baseline ``score_all``: ``policy.choose`` over candidates built for *every*
  free peer, the decision without sampling.

Memory: tracemalloc's traced bytes after building the registry minus before,
divided by the number of peers (the decoded ``NodeInfo`` / ``NodeHealth``
each peer keeps are included).

    .venv/bin/python -m bench.policy [--peers 1000] [--decisions 20000]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
import tracemalloc
from typing import Any, Final

from bench.common import emit, machine
from bench.realm import percentile
from daemon.config import build_config
from daemon.orchestrator import policy
from daemon.orchestrator.placement import Placement
from daemon.orchestrator.ports import SystemClock
from daemon.orchestrator.registry import Registry
from daemon.orchestrator.tasks import Task
from daemon.protocol.node import Capability, Hardware, NodeHealth, NodeInfo, NodeState
from daemon.protocol.task import Constraints, TaskSubmit

TARGET_MEDIAN_US: Final = 50.0


def populate(registry: Registry, peers: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    now = time.monotonic()
    for i in range(peers):
        node_id, boot = f"peer{i:05d}", f"boot{i:05d}"
        capacity = rng.choice([1, 2, 4, 8, 16])
        languages = ["de"] if i % 100 == 0 else ["en"]
        info = NodeInfo(
            node_id=node_id,
            boot_id=boot,
            version="bench",
            hostname=node_id,
            hardware=Hardware(arch="x86_64", cpu_count=rng.choice([2, 4, 8]), ram_mb=8192),
            capabilities=[
                Capability(
                    name="echo",
                    node="ref",
                    backend="builtin",
                    languages=languages,
                    max_concurrency=capacity,
                )
            ],
        )
        load = rng.uniform(0, 4)
        registry.on_state(node_id, NodeState(state="online", boot_id=boot), now)
        registry.on_info(node_id, info, now)
        registry.on_health(
            node_id, NodeHealth(boot_id=boot, uptime_s=100, load=(load, load, load)), now
        )
        peer = registry.peers[node_id]
        slot = peer.slots["echo"]
        for _ in range(rng.randrange(capacity)):  # every peer keeps at least one free slot
            registry.take(peer, "echo")
        if rng.random() < 0.8:
            slot.latency_ms = rng.uniform(0.5, 50)
        slot.success = rng.uniform(0.9, 1.0)


def timed(fn: Any, n: int) -> dict[str, Any]:
    samples = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        fn()
        samples.append((clock() - t0) / 1000)
    samples.sort()
    return {
        "n": n,
        "median_us": round(statistics.median(samples), 2),
        "p90_us": round(percentile(samples, 90), 2),
        "p99_us": round(percentile(samples, 99), 2),
        "max_us": round(samples[-1], 2),
    }


def make_task(constraints: Constraints | None = None) -> Task:
    submit = TaskSubmit(capability="echo", input="x", constraints=constraints or Constraints())
    return Task(
        id="t1",
        submit=submit,
        user="bench",
        role="user",
        deadline=time.time() + 60,
        reply_topic=None,
        correlation=None,
    )


def measure(peers: int, decisions: int) -> dict[str, Any]:
    config = build_config({"realm": "bench", "nodes": {}})
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    registry = Registry(config.orchestrator.breaker)
    populate(registry, peers)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    placement = Placement(registry, random.Random(), SystemClock())
    free = registry.free["echo"]

    plain, constrained = make_task(), make_task(Constraints(language="de"))
    picked = placement.pick(plain)
    fits = placement.pick(constrained)
    assert picked is not None and fits is not None

    def pick() -> None:
        placement.pick(plain)

    def pick_constrained() -> None:
        placement.pick(constrained)

    def score_all() -> None:
        candidates = []
        for node_id in free.items:
            candidates.append(registry.peers[node_id].candidate("echo"))
        policy.choose(candidates)

    timed(pick, min(decisions, 2000))  # warm-up
    results = {
        "pick": timed(pick, decisions),
        "pick_constrained": timed(pick_constrained, max(200, decisions // 20)),
        "score_all": timed(score_all, max(200, decisions // 20)),
    }
    return {
        "benchmark": "policy",
        "peers": peers,
        "free_peers": len(free),
        "sample_size": policy.SAMPLE_SIZE,
        **results,
        "registry_bytes_per_peer": round((after - before) / peers),
        "registry_mb": round((after - before) / 2**20, 2),
        "target_median_us": TARGET_MEDIAN_US,
        "pass": results["pick"]["median_us"] <= TARGET_MEDIAN_US,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peers", type=int, default=1000, help="simulated peers")
    parser.add_argument("--decisions", type=int, default=20000, help="timed decisions")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args()
    emit({"machine": machine(), **measure(args.peers, args.decisions)})


if __name__ == "__main__":
    main()
