"""What authorisation costs: the orchestrated path on a generated broker vs an open one.

Interleaved pairs, each a fresh realm of real processes (one ``mtor node``
worker with the reference ``echo``, one ``mtor orchestrator``):

* ``open``: a private Mosquitto that takes anyone, no accounts file (names in
  topics are claims);
* ``secure``: the broker directory ``mtor broker init`` writes (passwords,
  the per-account ACL Mosquitto checks on every publish and delivery), the
  orchestrator with its accounts file (identity from the topic's account,
  roles from accounts.json, reply-space checks), node and client with their
  own accounts.

Both use the default path of a ``RealmClient``: the assigned worker sends the
final straight to the client's ``reply/<account>/<x>/direct`` with the
client's reply key (what the generated ACL lets node accounts write), and
reports to the orchestrator.

    .venv/bin/python -m bench.auth [--pairs 3] [--n 4000] [--n1 1000] [--inflight 16]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Final

from bench.common import emit, machine
from bench.realm import Realm, SecureRealm, measured
from daemon.broker import PrivateBroker

PAYLOAD: Final = {"text": "hello realm", "n": 42}
WORKER: Final = "w1"
CLIENT: Final = "bench"
# The target of issue 13: authorisation within 10 % of the open realm.
TARGET_RATIO: Final = 1.10


async def one(secure: bool, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mtor-bench-auth-") as tmp:
        directory = Path(tmp)
        realm_name = "bench" + directory.name[-8:].replace("_", "x").lower()
        sec = SecureRealm(directory / "broker", realm_name, [WORKER], CLIENT) if secure else None
        with sec.broker() if sec else PrivateBroker() as broker:
            realm = Realm(broker, directory, realm=realm_name, secure=sec)
            async with realm.running():
                await realm.start_worker(WORKER, args.max_concurrency)
                await realm.start_orchestrator(direct_replies=True)

                async def call(_i: int) -> Any:
                    return await realm.call("echo", PAYLOAD, direct=True)

                await measured(call, args.warmup, args.inflight, realm.pids())
                single = await measured(call, args.n1, 1, realm.pids())
                many = await measured(call, args.n, args.inflight, realm.pids())
    name = "secure" if secure else "open"
    print(f"{name}: 1={single['p50_ms']}ms {args.inflight}={many['per_s']}/s", file=sys.stderr)
    return {"inflight_1": single, f"inflight_{args.inflight}": many}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"open": [], "secure": []}
    for i in range(args.pairs):
        order = (False, True) if i % 2 == 0 else (True, False)  # ABBA: drift cancels out
        for secure in order:
            runs["secure" if secure else "open"].append(await one(secure, args))
    key = f"inflight_{args.inflight}"

    def med(kind: str, phase: str, field: str) -> float:
        return float(statistics.median(r[phase][field] for r in runs[kind]))

    per_s = {k: med(k, key, "per_s") for k in runs}
    p50 = {k: med(k, "inflight_1", "p50_ms") for k in runs}
    throughput_ratio = per_s["open"] / per_s["secure"]
    latency_ratio = p50["secure"] / p50["open"]
    return {
        "benchmark": "auth",
        "runs": runs,
        "median_per_s": per_s,
        "median_p50_ms_inflight_1": p50,
        "throughput_cost_ratio": round(throughput_ratio, 3),
        "p50_cost_ratio": round(latency_ratio, 3),
        "target_ratio": TARGET_RATIO,
        "pass": throughput_ratio <= TARGET_RATIO and latency_ratio <= TARGET_RATIO,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=3, help="open/secure pairs (ABBA order)")
    parser.add_argument("--n", type=int, default=4000, help="tasks with --inflight at once")
    parser.add_argument("--n1", type=int, default=1000, help="tasks one at a time")
    parser.add_argument("--inflight", type=int, default=16, help="requests in flight")
    parser.add_argument("--warmup", type=int, default=300, help="untimed tasks first")
    parser.add_argument("--max-concurrency", type=int, default=64, help="worker echo slots")
    args = parser.parse_args()
    emit({"machine": machine(), **asyncio.run(run(args))})


if __name__ == "__main__":
    main()
