"""Run every node-daemon benchmark and print one JSON document.

    .venv/bin/python -m bench [--seconds 60] [--runs 5] [--down 0 10]

Each part also runs alone: ``bench.node_footprint``, ``bench.startup``,
``bench.reconnect`` (see their ``--help``).  Each gets its own private
Mosquitto, so nothing else on the machine is measured by mistake.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import time
from typing import Any

from bench import node_footprint, reconnect, startup
from bench.common import ROOT, emit, machine
from daemon import __version__
from daemon.broker import PrivateBroker


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "mtor_version": __version__,
        "git": _git_describe(),
        "machine": machine(),
    }
    with PrivateBroker() as broker:
        out["startup"] = await startup.measure(broker, args.runs)
    with PrivateBroker() as broker:
        out["idle_footprint"] = await node_footprint.measure(broker, args.seconds, args.settle)
    out["reconnect"] = []
    for down in args.down:
        with PrivateBroker() as broker:
            out["reconnect"].append(await reconnect.measure(broker, args.runs, down))
    out["pass"] = bool(
        out["startup"]["pass"]
        and all(out["idle_footprint"]["pass"].values())
        and all(r["pass"] for r in out["reconnect"])
    )
    return out


def _git_describe() -> str | None:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    node_footprint.add_arguments(parser)
    parser.add_argument("--runs", type=int, default=5, help="runs of startup and reconnect")
    parser.add_argument(
        "--down",
        type=float,
        nargs="+",
        default=[0.0, 10.0],
        help="broker down time(s) for the reconnect runs (s)",
    )
    emit(asyncio.run(run_all(parser.parse_args())))


if __name__ == "__main__":
    main()
