"""Idle footprint of a sensors-only `mtor node`: RSS and CPU % of one core.

Three processes idle side by side for the same window, each connected to
the same private Mosquitto where it applies:

* ``node``: ``mtor node`` with the default sensors node (every builtin, 10 s
  interval, 30 s health) — what a Pi would run;
* ``baseline_aiomqtt``: a bare aiomqtt client that connected and sits idle
  (``bench.baseline_client``) — the floor for "Python + MQTT";
* ``baseline_python``: ``python -c "time.sleep()"`` — the interpreter alone.

CPU is (utime + stime) from ``/proc/<pid>/stat`` over the window; RSS is
``VmRSS`` from ``/proc/<pid>/status`` at its end (``VmHWM`` is the peak).

    .venv/bin/python -m bench.node_footprint [--seconds 60] [--settle 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

from bench.common import (
    Observer,
    baseline_client,
    cpu_seconds,
    emit,
    machine,
    mtor_command,
    new_realm,
    rss_kib,
    spawn,
    stop,
    write_node_config,
)
from daemon.broker import PrivateBroker

TARGET_RSS_MB: Final = 45.0
TARGET_CPU_PERCENT: Final = 0.5
ONLINE_TIMEOUT: Final = 20.0


def _usage(pid: int, cpu0: tuple[float, float], window: float) -> dict[str, Any]:
    own, children = cpu_seconds(pid)
    mem = rss_kib(pid)
    cpu = own - cpu0[0]
    return {
        "rss_mb": round(mem["VmRSS"] / 1024, 1),
        "peak_rss_mb": round(mem["VmHWM"] / 1024, 1),
        "rss_anon_mb": round(mem.get("RssAnon", 0) / 1024, 1),
        "rss_file_mb": round(mem.get("RssFile", 0) / 1024, 1),
        "threads": mem.get("Threads"),
        "cpu_s": round(cpu, 3),
        "children_cpu_s": round(children - cpu0[1], 3),
        "cpu_percent": round(100.0 * cpu / window, 3),
    }


async def measure(broker: PrivateBroker, seconds: float, settle: float) -> dict[str, Any]:
    realm = new_realm()
    with tempfile.TemporaryDirectory(prefix="mtor-bench-") as tmp:
        config = write_node_config(Path(tmp), broker.url, realm, "idle")
        procs: dict[str, subprocess.Popen[bytes]] = {}
        try:
            async with Observer(broker.host, broker.port, realm).running() as observer:
                started = time.monotonic()
                procs["node"] = spawn([*mtor_command(), "node", "--config", str(config)])
                procs["baseline_aiomqtt"] = spawn(
                    baseline_client(broker.host, broker.port, realm, "base", once=False)
                )
                procs["baseline_python"] = spawn(
                    [sys.executable, "-c", "import time; time.sleep(1e6)"]
                )
                await observer.wait_online("idle", started, ONLINE_TIMEOUT)
                await observer.wait_online("base", started, ONLINE_TIMEOUT)
            # Let start-up work (first reads, info, health) finish before the window.
            await asyncio.sleep(settle)
            cpu0 = {name: cpu_seconds(p.pid) for name, p in procs.items()}
            t0 = time.monotonic()
            await asyncio.sleep(seconds)
            window = time.monotonic() - t0
            usage = {name: _usage(p.pid, cpu0[name], window) for name, p in procs.items()}
            for name, p in procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited during the window (status {p.returncode})")
        finally:
            for p in procs.values():
                with contextlib.suppress(Exception):
                    stop(p)
    node = usage["node"]
    return {
        "benchmark": "idle_footprint",
        "window_s": round(window, 1),
        "settle_s": settle,
        "node": node,
        "baseline_aiomqtt": usage["baseline_aiomqtt"],
        "baseline_python": usage["baseline_python"],
        "targets": {"rss_mb": TARGET_RSS_MB, "cpu_percent": TARGET_CPU_PERCENT},
        "pass": {
            "rss": node["rss_mb"] <= TARGET_RSS_MB,
            "cpu": node["cpu_percent"] <= TARGET_CPU_PERCENT,
        },
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=60.0, help="measuring window (s)")
    parser.add_argument("--settle", type=float, default=5.0, help="wait after online (s)")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with PrivateBroker() as broker:
        return await measure(broker, args.seconds, args.settle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args()
    emit({"machine": machine(), **asyncio.run(run(args))})


if __name__ == "__main__":
    main()
