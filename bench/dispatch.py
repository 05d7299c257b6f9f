"""Dispatch overhead: a task through the orchestrator vs straight to the worker.

All real processes on one private Mosquitto: one ``mtor node`` worker with
the reference ``echo`` (max_concurrency 64) and, for the orchestrated path,
one ``mtor orchestrator``.  From this process, each path is driven with 1
and with 16 requests in flight:

* ``orchestrated``: ``RealmClient.call("echo", payload)`` — submit, queue,
  assign, worker; the worker sends ``done`` straight to the client
  (``TaskSubmit.direct``, RealmClient's default) and reports to the
  orchestrator;
* ``orchestrated_relayed``: the same with ``direct=False`` — the final update
  relayed by the orchestrator (what a plain MQTT client gets by default);
* ``direct``: the worker's own protocol with no orchestrator running — a
  ``TaskAssign`` published to ``node/<id>/task`` and its ``WorkerReport``
  awaited on ``task/worker/<id>`` (same worker process, same client bus);
* ``raw_mtor_mqtt``: MQTT 5 request/response between two bare
  :class:`daemon.mqtt.Connection` clients (``bench.raw_echo``) — the floor of
  the project's own MQTT client, what the Bus and the models add comes on top;
* ``raw_aiomqtt``: the same between two bare aiomqtt clients
  (``bench.mqtt_echo``) — what a typical Python MQTT service pays.

Everything shares the machine, the benchmark client included; CPU % of one
core per process is reported for every phase so contention is visible.

    .venv/bin/python -m bench.dispatch [--n 3000] [--n1 1000] [--inflight 16]
        [--profile orchestrator.prof]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from bench.common import emit, machine
from bench.mqtt_echo import EchoClient
from bench.raw_echo import RawEchoClient
from bench.realm import DirectWorker, Realm, measured
from daemon.broker import PrivateBroker

TARGET_P50_RATIO: Final = 2.0
TARGET_PER_S: Final = 3000.0
PAYLOAD: Final = {"text": "hello realm", "n": 42}
WORKER: Final = "w1"


async def _phase(name: str, call: Any, realm: Realm, args: argparse.Namespace) -> dict[str, Any]:
    n1, n, inflight = args.n1, args.n, args.inflight
    await measured(call, args.warmup, inflight, realm.pids())  # connections, lazy imports
    one = await measured(call, n1, 1, realm.pids())
    many = await measured(call, n, inflight, realm.pids())
    print(f"{name}: 1={one['p50_ms']}ms {inflight}={many['per_s']}/s", file=sys.stderr)
    return {"inflight_1": one, f"inflight_{inflight}": many}


async def measure(broker: PrivateBroker, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mtor-bench-") as tmp:
        realm = Realm(broker, Path(tmp))
        async with realm.running():
            await realm.start_worker(WORKER, args.max_concurrency)

            # 1. floors: two bare clients of each MQTT library, no Bus, no models
            data = b'{"text":"hello realm","n":42}'
            clients: dict[str, tuple[str, Callable[[str, int, str], Any]]] = {
                "raw_mtor_mqtt": ("bench.raw_echo", RawEchoClient),
                "raw_aiomqtt": ("bench.mqtt_echo", EchoClient),
            }
            for name, (module, make) in clients.items():
                topic = f"bench/{realm.realm}/{name}"
                realm.spawn(
                    name, [sys.executable, "-m", module, broker.host, str(broker.port), topic]
                )
                await asyncio.sleep(
                    1.0
                )  # the responder subscribes (it publishes nothing to wait on)
                raw = make(broker.host, broker.port, topic)
                async with raw.running():

                    async def raw_call(_i: int, raw: Any = raw) -> Any:
                        return await raw.call(data)

                    out[name] = await _phase(name, raw_call, realm, args)
                realm.stop(name)

            # 2. direct: the worker's protocol, no orchestrator running
            direct = DirectWorker(realm, WORKER)
            await direct.start()

            async def direct_call(_i: int) -> Any:
                return await direct.call("echo", PAYLOAD)

            out["direct"] = await _phase("direct", direct_call, realm, args)

            # 3. through the orchestrator
            await realm.start_orchestrator(profile=args.profile)

            async def orch_call(_i: int) -> Any:
                return await realm.call("echo", PAYLOAD)

            out["orchestrated"] = await _phase("orchestrated", orch_call, realm, args)

            # 4. the same without the direct reply: every update relayed by the orchestrator
            async def strict_call(_i: int) -> Any:
                return await realm.call("echo", PAYLOAD, direct=False)

            out["orchestrated_relayed"] = await _phase("relayed", strict_call, realm, args)
    return out


def verdict(out: dict[str, Any], inflight: int) -> dict[str, Any]:
    key = f"inflight_{inflight}"
    orch, direct = out["orchestrated"], out["direct"]
    ratio_1 = orch["inflight_1"]["p50_ms"] / direct["inflight_1"]["p50_ms"]
    ratio_n = orch[key]["p50_ms"] / direct[key]["p50_ms"]
    return {
        "p50_ratio_inflight_1": round(ratio_1, 2),
        f"p50_ratio_{key}": round(ratio_n, 2),
        "orchestrated_per_s": orch[key]["per_s"],
        "relayed_p50_ratio_inflight_1": round(
            out["orchestrated_relayed"]["inflight_1"]["p50_ms"] / direct["inflight_1"]["p50_ms"], 2
        ),
        "relayed_per_s": out["orchestrated_relayed"][key]["per_s"],
        "targets": {"p50_ratio": TARGET_P50_RATIO, "per_s": TARGET_PER_S},
        "pass": {
            "p50_ratio": ratio_1 <= TARGET_P50_RATIO,
            "throughput": orch[key]["per_s"] >= TARGET_PER_S,
        },
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=3000, help="tasks with --inflight at once")
    parser.add_argument("--n1", type=int, default=1000, help="tasks one at a time")
    parser.add_argument("--inflight", type=int, default=16, help="requests in flight")
    parser.add_argument("--warmup", type=int, default=200, help="untimed tasks first")
    parser.add_argument("--max-concurrency", type=int, default=64, help="worker echo slots")
    parser.add_argument(
        "--profile", type=Path, default=None, help="run the orchestrator under cProfile"
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with PrivateBroker() as broker:
        out = await measure(broker, args)
    return {"benchmark": "dispatch", **out, **verdict(out, args.inflight)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args()
    emit({"machine": machine(), **asyncio.run(run(args))})


if __name__ == "__main__":
    main()
