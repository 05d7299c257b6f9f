"""The swarm on a real Mosquitto: simulated robots as real `mtor node` processes,
missions announced with `mtor mission`, a winner killed with kill -9 and its
mission re-auctioned; the same without any orchestrator (there is none here) and
with the CLI as the auctioneer; hostile messages; robots in one process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from daemon import topics
from daemon.broker import PrivateBroker
from daemon.bus import Bus, Inbound
from daemon.config import Config
from daemon.messages import decode
from daemon.protocol.node import NodeState
from daemon.protocol.swarm import (
    Area,
    Award,
    MissionAck,
    MissionAnnounce,
    MissionProgress,
    Point,
    RobotProfile,
    RobotState,
)
from daemon.swarm.agent import RobotAgent
from daemon.swarm.auction import Timing
from daemon.swarm.watch import Watcher, announce
from nodes.swarm.config import SimDriverConfig
from nodes.swarm.sim import SimVehicle
from tests.conftest import ROOT, Collector, MtorProcess, make_config, mtor_env, write_config

pytestmark = pytest.mark.slow

FAST = Timing(settle_s=0.1, award_timeout_s=0.8, misses=3)


def robot_config(broker: PrivateBroker, realm: str, node_id: str, x: float, **sim: Any) -> dict:  # type: ignore[type-arg]
    return {
        "realm": realm,
        "node_id": node_id,
        "broker": {"url": broker.url},
        "daemon": {"health_interval": 3600, "state_dir": f"state-{node_id}"},
        "homeassistant": {"enabled": False},
        "nodes": {
            "robot": {
                "type": "swarm",
                "sensors": ["camera"],
                "heartbeat_s": 0.3,
                "settle_s": 0.1,
                "award_timeout_s": 0.8,
                "driver": {"type": "sim", "start": [x, 0.0], "speed_mps": 40.0, **sim},
            }
        },
    }


def mission_cli(broker: PrivateBroker, realm: str, *args: str, timeout: float = 30) -> Any:
    out = subprocess.run(
        [sys.executable, "-m", "daemon.cli.main", "mission", "announce", "--broker", broker.url,
         "--realm", realm, "--json", *args],
        env=mtor_env(), cwd=ROOT, capture_output=True, timeout=timeout, check=False,
    )  # fmt: skip
    assert out.stdout, out.stderr.decode()
    return out.returncode, json.loads(out.stdout.decode().strip().splitlines()[-1])


async def wait_robots(config: Config, ids: set[str], timeout: float = 20) -> None:
    """Until every robot published its retained state (its node runs)."""
    seen: set[str] = set()
    got = asyncio.Event()

    async def on(msg: Inbound) -> None:
        fields = topics.SWARM_ROBOT.parse(msg.topic)
        if fields and msg.payload:
            seen.add(fields["sender"])
            if ids <= seen:
                got.set()

    bus = Bus(config.broker, f"t-{time.monotonic_ns()}")
    task = asyncio.create_task(bus.run())
    try:
        await bus.wait_connected(5)
        await bus.subscribe(topics.SWARM_ROBOT.filter(realm=config.realm), on)
        async with asyncio.timeout(timeout):
            await got.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def start_robots(
    tmp_path: Path, broker: PrivateBroker, realm: str, xs: dict[str, float], **sim: Any
) -> dict[str, MtorProcess]:
    procs = {}
    for node_id, x in xs.items():
        d = tmp_path / node_id
        d.mkdir()
        path = write_config(d, robot_config(broker, realm, node_id, x, **sim))
        procs[node_id] = MtorProcess(["node", "--config", str(path)], cwd=d)
    return procs


# ------------------------------------------------------------------ real processes


def test_robot_processes_auction_among_themselves_and_reauction_after_kill9(
    tmp_path: Path, broker: PrivateBroker, realm: str, processes: list[MtorProcess]
) -> None:
    procs = start_robots(tmp_path, broker, realm, {"r1": 0.0, "r2": 50.0, "r3": 100.0})
    processes.extend(procs.values())
    asyncio.run(wait_robots(make_config(broker.url, realm), set(procs)))

    # nearest wins (r2 at x=50 for x=60), no orchestrator anywhere
    rc, out = mission_cli(broker, realm, "--at", "60,0", "--id", "near")
    assert rc == 0 and out["status"] == "done", out
    assert out["sectors"][0]["winner"] == "r2" and out["rounds"] == 1
    assert out["sectors"][0]["awarded_s"] < 2.0

    # a long mission for r3; it is killed on the way: r2 takes over in a later round
    cli = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli.main", "mission", "announce", "--broker", broker.url,
         "--realm", realm, "--json", "--at", "400,0", "--id", "far", "--timeout", "40"],
        env=mtor_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        asyncio.run(_wait_for_holder(make_config(broker.url, realm), "far", "r3"))
        procs["r3"].kill9()
        stdout, stderr = cli.communicate(timeout=45)
    finally:
        if cli.poll() is None:
            cli.kill()
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    assert cli.returncode == 0, (summary, stderr.decode()[-2000:])
    sector = summary["sectors"][0]
    assert sector["winners"][0] == "r3" and sector["winner"] == "r2", summary
    assert summary["rounds"] >= 2
    assert any("r3 dropped out" in text for _, text in summary["timeline"]), summary


async def _wait_for_holder(config: Config, mission: str, node: str) -> None:
    """Until ``node`` acknowledged ``mission`` and reported progress."""
    got = asyncio.Event()

    async def on(msg: Inbound) -> None:
        if msg.topic == topics.SWARM_PROGRESS.build(realm=config.realm, sender=node):
            p = decode(msg.payload, MissionProgress)
            if p.mission == mission and p.fraction > 0:
                got.set()

    bus = Bus(config.broker, f"t-{time.monotonic_ns()}")
    task = asyncio.create_task(bus.run())
    try:
        await bus.wait_connected(5)
        await bus.subscribe(topics.SWARM_PROGRESS.filter(realm=config.realm), on)
        async with asyncio.timeout(20):
            await got.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
