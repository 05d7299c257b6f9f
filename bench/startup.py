"""Start-up time: process spawn → its retained ``online`` seen on the broker.

Each run, interleaved so all see the same machine state:

* ``node``: ``mtor node`` (sensors only) until ``node/<id>/state`` = online
  reaches an observer subscribed beforehand;
* ``baseline_aiomqtt_publish``: ``bench.baseline_client --once`` (a bare
  aiomqtt connect + retained publish) until its online is seen;
* ``baseline_import_aiomqtt``: ``python -c "import aiomqtt"``;
* ``import_node_code``: ``python -c "import daemon.cli.main, daemon.runtime,
  nodes.sensors.node"`` — the node's own import cost;
* ``baseline_python``: the interpreter alone.

The ``python -c`` ones are timed until they print "ready" after their
imports, so interpreter teardown is not counted (as it is not for the others).

    .venv/bin/python -m bench.startup [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
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

TARGET_S: Final = 1.5
ONLINE_TIMEOUT: Final = 20.0
NODE_IMPORTS: Final = "import daemon.cli.main, daemon.runtime, nodes.sensors.node"


async def _ready_time(code: str) -> float:
    """Spawn ``python -c code`` and time it until it says it is ready (teardown excluded)."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        f"{code}\nprint('ready', flush=True)",
        stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    async with asyncio.timeout(ONLINE_TIMEOUT):
        line = await proc.stdout.readline()
        elapsed = time.monotonic() - started
        code_ = await proc.wait()
    if line.strip() != b"ready" or code_ != 0:
        raise RuntimeError(f"python -c {code!r} failed (status {code_})")
    return elapsed


async def _online_time(observer: Observer, args: list[str], node_id: str) -> float:
    started = time.monotonic()
    proc = spawn(args)
    try:
        seen = await observer.wait_online(node_id, started, ONLINE_TIMEOUT)
    finally:
        await asyncio.to_thread(stop, proc)
    return seen.arrived - started


async def measure(broker: PrivateBroker, runs: int) -> dict[str, Any]:
    realm = new_realm()
    samples: dict[str, list[float]] = {
        "node": [],
        "baseline_aiomqtt_publish": [],
        "baseline_import_aiomqtt": [],
        "import_node_code": [],
        "baseline_python": [],
    }
    with tempfile.TemporaryDirectory(prefix="mtor-bench-") as tmp:
        async with Observer(broker.host, broker.port, realm).running() as observer:
            # A warm-up so every run finds the same warm page cache.
            await _ready_time(NODE_IMPORTS)
            for i in range(runs):
                node_id = f"start{i}"
                config = write_node_config(Path(tmp), broker.url, realm, node_id)
                samples["node"].append(
                    await _online_time(
                        observer, [*mtor_command(), "node", "--config", str(config)], node_id
                    )
                )
                base_id = f"base{i}"
                samples["baseline_aiomqtt_publish"].append(
                    await _online_time(
                        observer,
                        baseline_client(broker.host, broker.port, realm, base_id, once=True),
                        base_id,
                    )
                )
                samples["baseline_import_aiomqtt"].append(await _ready_time("import aiomqtt"))
                samples["import_node_code"].append(await _ready_time(NODE_IMPORTS))
                samples["baseline_python"].append(await _ready_time("pass"))
    result = {name: summary(values) for name, values in samples.items()}
    return {
        "benchmark": "startup_to_online_s",
        **result,
        "target_s": TARGET_S,
        "pass": result["node"]["median"] <= TARGET_S,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=5, help="runs (the median is reported)")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with PrivateBroker() as broker:
        return await measure(broker, args.runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args()
    emit({"machine": machine(), **asyncio.run(run(args))})


if __name__ == "__main__":
    main()
