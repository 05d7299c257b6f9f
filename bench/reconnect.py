"""Back online after a broker restart: Mosquitto stopped and started on the same port.

A sensors-only ``mtor node`` and the bare aiomqtt baseline client (the same
default backoff: 0.1 s doubling to 5 s, ±20 % jitter) both run against a
private Mosquitto.  Each run stops it (SIGTERM), waits ``--down`` seconds,
starts it again on the same port (ready once its log says " running"), and
times, from that moment, until each client's new ``online`` is on the broker.
The broker keeps nothing (``persistence false``), so an ``online`` seen after
the restart was published after it.  The broker's own stop + start time is
the floor beside them.

    .venv/bin/python -m bench.reconnect [--runs 5] [--down 0]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Final

from bench.common import (
    Observer,
    baseline_client,
    emit,
    machine,
    mtor_command,
    new_realm,
    spawn,
    stop,
    summary,
    write_node_config,
)
from daemon.broker import PrivateBroker

TARGET_S: Final = 5.0
ONLINE_TIMEOUT: Final = 20.0
# Between runs both clients settle (their backoff resets once connected).
PAUSE: Final = 0.5


async def measure(broker: PrivateBroker, runs: int, down: float) -> dict[str, Any]:
    realm = new_realm()
    samples: dict[str, list[float]] = {
        "node_back_online": [],
        "node_from_broker_stop": [],
        "baseline_aiomqtt_back_online": [],
        "broker_restart": [],
    }
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="mtor-bench-") as tmp:
        config = write_node_config(Path(tmp), broker.url, realm, "rc")
        try:
            async with Observer(broker.host, broker.port, realm).running() as observer:
                started = time.monotonic()
                procs.append(spawn([*mtor_command(), "node", "--config", str(config)]))
                procs.append(
                    spawn(baseline_client(broker.host, broker.port, realm, "base", once=False))
                )
                await observer.wait_online("rc", started, ONLINE_TIMEOUT)
                await observer.wait_online("base", started, ONLINE_TIMEOUT)
            for _ in range(runs):
                await asyncio.sleep(PAUSE)
                wall_stop, t_stop = time.time(), time.monotonic()
                await asyncio.to_thread(broker.stop)
                await asyncio.sleep(down)
                await asyncio.to_thread(broker.start)
                wall_ready, t_ready = time.time(), time.monotonic()
                samples["broker_restart"].append(t_ready - t_stop - down)
                async with Observer(broker.host, broker.port, realm).running() as observer:
                    node = await observer.wait_online("rc", 0.0, ONLINE_TIMEOUT)
                    base = await observer.wait_online("base", 0.0, ONLINE_TIMEOUT)
                samples["node_back_online"].append(node.wall_time() - wall_ready)
                samples["node_from_broker_stop"].append(node.wall_time() - wall_stop)
                samples["baseline_aiomqtt_back_online"].append(base.wall_time() - wall_ready)
            alive = all(p.poll() is None for p in procs)
        finally:
            for p in procs:
                with contextlib.suppress(Exception):
                    stop(p)
    result = {f"{name}_s": summary(values) for name, values in samples.items()}
    return {
        "benchmark": "reconnect",
        "down_s": down,
        **result,
        "clients_alive": alive,
        "target_s": TARGET_S,
        "pass": alive and result["node_back_online_s"]["max"] <= TARGET_S,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=5, help="restarts (the median is reported)")
    parser.add_argument(
        "--down", type=float, default=0.0, help="seconds the broker stays down per restart"
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with PrivateBroker() as broker:
        return await measure(broker, args.runs, args.down)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args()
    emit({"machine": machine(), **asyncio.run(run(args))})


if __name__ == "__main__":
    main()
