"""Swarm auctions: time to award with N simulated robots, re-auction after kill -9,
allocation quality against the optimum, beside a raw MQTT round trip of the same run.

    .venv/bin/python -m bench.swarm [--robots 10 50] [--missions 10] [--window 0.2]
                                    [--kills 3] [--quality 50x40] [--quality-kill 5] [--seed 1]

On a private Mosquitto, in this process: N robots (each its own MQTT connection,
a :class:`~daemon.swarm.agent.RobotAgent` with the kinematic simulator, 1 m/s so
none finishes during the run) and a watcher.  Phases:

* **baseline**: publish → receive round trip of one QoS 1 message through the
  broker (the project's Bus on both ends), p50 of 100;
* **award**: ``--missions`` point missions one after another (peer-run: no
  auctioneer); time from the announce's publish to the winner's ack reaching the
  watcher.  The floor is the bid window plus the claim's settle time plus three
  broker hops (announce, claim, ack);
* **re-auction**: a robot as a real ``mtor node`` process placed to win, killed
  with SIGKILL once it reports progress; time from the kill to the new winner's
  ack (its will, a new round's bid window, settle), ``--kills`` times;
* **quality**: ``mtor sim swarm --uniform`` (daemon/swarm/simfleet.py) with R robots
  and M missions at random places (``--quality RxM``), three ways: the M missions as
  one announce allocated by an auctioneer (this process), the same allocated by
  the robots among themselves, and M separate announces (independent peer-run
  auctions); then ``--quality-kill`` winners killed.  Total travel (each first
  winner's start to its mission) against the optimum
  (``scipy.optimize.linear_sum_assignment`` on the same positions) and a
  centralised greedy allocator (nearest free pair first).

JSON on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml

from daemon import topics
from daemon.broker import PrivateBroker
from daemon.bus import Bus, Inbound
from daemon.config import BrokerConfig, build_config
from daemon.messages import decode
from daemon.protocol.node import NodeState
from daemon.protocol.swarm import MissionAnnounce, MissionProgress, Point, RobotProfile
from daemon.swarm.agent import RobotAgent
from daemon.swarm.auction import Timing
from daemon.swarm.watch import Watcher, announce
from nodes.swarm.config import SimDriverConfig
from nodes.swarm.sim import SimVehicle

ROOT = Path(__file__).resolve().parent.parent
TIMING = Timing(settle_s=0.1, award_timeout_s=1.0, misses=3)
WAIT_S = 20.0


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 4)


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50_s": pct(values, 0.5),
        "p90_s": pct(values, 0.9),
        "max_s": round(max(values), 4) if values else None,
        "mean_s": round(statistics.fmean(values), 4) if values else None,
    }


@contextlib.asynccontextmanager
async def connected(broker: BrokerConfig, name: str, **kw: Any) -> AsyncIterator[Bus]:
    bus = Bus(broker, f"{name}-{uuid.uuid4().hex[:6]}", **kw)
    task = asyncio.create_task(bus.run())
    try:
        await bus.wait_connected(10)
        yield bus
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def baseline(broker: BrokerConfig, realm: str, n: int = 100) -> dict[str, Any]:
    """QoS 1 publish → delivery through the broker, one at a time."""
    got: asyncio.Queue[float] = asyncio.Queue()

    async def on(msg: Inbound) -> None:
        got.put_nowait(time.perf_counter())

    topic = f"bench/{realm}/rtt"
    times = []
    async with connected(broker, "rtt-a") as a, connected(broker, "rtt-b") as b:
        await b.subscribe(topic, on)
        for _ in range(n):
            t0 = time.perf_counter()
            await a.publish(topic, b"x", qos=1, wait=False)
            times.append(await asyncio.wait_for(got.get(), 5) - t0)
    return {"what": "QoS 1 publish -> subscriber, Bus to Bus", **summary(times)}


class Fleet:
    """N simulated robots, each with its own connection and will, in this process."""

    def __init__(self, broker: BrokerConfig, realm: str) -> None:
        self.broker, self.realm = broker, realm
        self.agents: dict[str, RobotAgent] = {}
        self.tasks: list[asyncio.Task[None]] = []

    async def add(self, node_id: str, x: float, y: float, speed: float = 1.0) -> None:
        will_topic = topics.NODE_STATE.build(realm=self.realm, node_id=node_id)
        will = (will_topic, NodeState(state="offline", boot_id="bench"))
        bus = Bus(self.broker, f"{node_id}-{uuid.uuid4().hex[:6]}", will=will)
        self.tasks.append(asyncio.create_task(bus.run()))
        await bus.wait_connected(10)
        profile = RobotProfile(max_speed_mps=speed, range_m=1e6)
        vehicle = SimVehicle(SimDriverConfig(start=(x, y), speed_mps=speed), profile)
        agent = RobotAgent(bus, self.realm, node_id, vehicle, heartbeat_s=0.5, timing=TIMING)
        self.agents[node_id] = agent
        self.tasks.append(asyncio.create_task(agent.run()))

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t


async def robots_ready(watcher: Watcher, ids: set[str]) -> None:
    async with asyncio.timeout(WAIT_S):
        while not ids <= set(watcher.robots):
            watcher.robot_seen.clear()
            await watcher.robot_seen.wait()


def count_wire(counter: dict[str, int]) -> Any:
    async def on(msg: Inbound) -> None:
        f = topics.SWARM_ANY.parse(msg.topic)
        if f is not None:
            counter[f["kind"]] = counter.get(f["kind"], 0) + 1

    return on


async def award_phase(
    broker: BrokerConfig, n: int, missions: int, window: float, rng: random.Random
) -> dict[str, Any]:
    realm = "b" + uuid.uuid4().hex[:8]
    fleet = Fleet(broker, realm)
    wire: dict[str, int] = {}
    try:
        async with connected(broker, "watch") as bus:
            watcher = Watcher(bus, realm, timing=TIMING)
            await watcher.start()
            for i in range(n):
                await fleet.add(f"r{i:03d}", rng.uniform(0, 1000), rng.uniform(0, 1000))
            await robots_ready(watcher, set(fleet.agents))
            await bus.subscribe(topics.SWARM_ANY.filter(realm=realm), count_wire(wire))
            times, rounds = [], []
            for k in range(missions):
                target = Point(x=rng.uniform(0, 1000), y=rng.uniform(0, 1000))
                m = MissionAnnounce(mission=f"m{k}", target=target, bid_window_s=window)
                t0 = asyncio.get_running_loop().time()
                await announce(bus, realm, "bench", m)
                w = watcher.get("bench", m.mission)
                async with asyncio.timeout(WAIT_S):
                    while 0 not in w.acked_at:
                        w.changed.clear()
                        await w.changed.wait()
                times.append(w.acked_at[0][0] - t0)
                auction = watcher.auction("bench", m.mission)
                rounds.append(auction.round if auction else 0)
            await asyncio.sleep(0.3)  # late messages of the last mission
    finally:
        await fleet.close()
    per_mission = {k: round(v / missions, 1) for k, v in sorted(wire.items()) if k != "robot"}
    return {
        "robots": n,
        "missions": missions,
        "bid_window_s": window,
        "settle_s": TIMING.settle_s,
        "announce_to_ack": summary(times),
        "overhead_p50_s": round((pct(times, 0.5) or 0) - window - TIMING.settle_s, 4),
        "rounds_max": max(rounds, default=0),
        "messages_per_mission": per_mission,
    }


def robot_process(
    tmp: Path, broker: PrivateBroker, realm: str, node_id: str, x: float
) -> subprocess.Popen[bytes]:
    d = tmp / node_id
    d.mkdir(exist_ok=True)
    cfg = {
        "realm": realm,
        "node_id": node_id,
        "broker": {"url": broker.url},
        "daemon": {"health_interval": 3600, "state_dir": str(d / "state")},
        "homeassistant": {"enabled": False},
        "nodes": {
            "robot": {
                "type": "swarm",
                "heartbeat_s": 0.5,
                "settle_s": TIMING.settle_s,
                "award_timeout_s": TIMING.award_timeout_s,
                "driver": {"type": "sim", "start": [x, 0.0], "speed_mps": 1.0},
            }
        },
    }
    path = d / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTOR_")}
    return subprocess.Popen(
        [sys.executable, "-m", "daemon.cli.main", "node", "-c", str(path)],
        cwd=d,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def reauction_phase(
    broker: PrivateBroker, n: int, kills: int, window: float, rng: random.Random
) -> dict[str, Any]:
    realm = "b" + uuid.uuid4().hex[:8]
    fleet = Fleet(_cfg(broker), realm)
    times: list[float] = []
    detail = []
    with tempfile.TemporaryDirectory(prefix="bench-swarm-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            async with connected(fleet.broker, "watch") as bus:
                watcher = Watcher(bus, realm, timing=TIMING)
                await watcher.start()
                progress: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

                async def on_progress(msg: Inbound) -> None:
                    f = topics.SWARM_PROGRESS.parse(msg.topic)
                    if f is not None:
                        p = decode(msg.payload, MissionProgress)
                        progress.put_nowait((f["sender"], p.mission))

                await bus.subscribe(topics.SWARM_PROGRESS.filter(realm=realm), on_progress)
                for i in range(n - 1):
                    await fleet.add(f"r{i:03d}", rng.uniform(100, 1000), rng.uniform(100, 1000))
                await robots_ready(watcher, set(fleet.agents))
                for k in range(kills):
                    victim = f"victim{k}"
                    proc = robot_process(tmp, broker, realm, victim, 0.0)
                    try:
                        await robots_ready(watcher, {victim})
                        mission = f"k{k}"
                        m = MissionAnnounce(
                            mission=mission, target=Point(x=5, y=0), bid_window_s=window
                        )
                        await announce(bus, realm, "bench", m)
                        async with asyncio.timeout(WAIT_S):
                            while (await progress.get()) != (victim, mission):
                                pass
                        w = watcher.get("bench", mission)
                        acks_before = len(w.acked_at.get(0, []))
                        proc.send_signal(signal.SIGKILL)
                        t_kill = asyncio.get_running_loop().time()
                        async with asyncio.timeout(WAIT_S):
                            while len(w.acked_at.get(0, [])) <= acks_before:
                                w.changed.clear()
                                await w.changed.wait()
                        times.append(w.acked_at[0][-1] - t_kill)
                        auction = watcher.auction("bench", mission)
                        if auction is not None:
                            detail.append({"winners": auction.sectors[0].winners})
                    finally:
                        if proc.poll() is None:
                            proc.kill()
                        proc.wait(5)
        finally:
            await fleet.close()
    return {
        "robots": n,
        "kills": kills,
        "bid_window_s": window,
        "kill_to_new_ack": summary(times),
        "overhead_p50_s": round((pct(times, 0.5) or 0) - window - TIMING.settle_s, 4),
        "runs": detail,
    }


def _cfg(broker: PrivateBroker) -> BrokerConfig:
    return build_config({"broker": {"url": broker.url}}).broker


def greedy(robots: list[tuple[float, ...]], missions: list[tuple[float, ...]]) -> float:
    pairs = sorted(
        (math.dist(r, m), i, j) for i, r in enumerate(robots) for j, m in enumerate(missions)
    )
    used_r: set[int] = set()
    used_m: set[int] = set()
    total = 0.0
    for d, i, j in pairs:
        if i not in used_r and j not in used_m:
            used_r.add(i)
            used_m.add(j)
            total += d
    return total


async def quality_phase(
    broker: BrokerConfig, n: int, missions: int, seed: int, kill: int
) -> dict[str, Any]:
    """``mtor sim swarm``'s runs (daemon/swarm/simfleet.py), three ways, --uniform."""
    from daemon.swarm.simfleet import simulate

    out: dict[str, Any] = {"robots": n, "missions": missions, "kill": kill}
    for name, separate, peers in (
        ("together_auctioneer", False, False),
        ("together_peers", False, True),
        ("separate_peers", True, True),
    ):
        realm = "b" + uuid.uuid4().hex[:8]
        try:
            report = await simulate(
                broker, realm, robots=n, missions=missions, seed=seed, uniform=True,
                kill=kill, separate=separate, peers=peers, timeout=30,
            )  # fmt: skip
        except TimeoutError:
            out[name] = {"error": "not allocated within 30 s"}
            continue
        out[name] = score(report)
    return out


def score(report: dict[str, Any]) -> dict[str, Any]:
    """Travel (each first winner's start -> its mission) against the optimum and greedy."""
    starts = {r["id"]: tuple(r["start"]) for r in report["robots"]}
    spots = [tuple(m["location"]) for m in report["missions"]]
    firsts = [m["winners"][0] if m["winners"] else None for m in report["missions"]]
    travel = sum(math.dist(starts[w], spots[k]) for k, w in enumerate(firsts) if w)
    out: dict[str, Any] = {
        "allocation_s": report["allocation_s"],
        "reallocation_s": report.get("reallocation_s"),
        "rounds_max": max((m["rounds"] for m in report["missions"]), default=0),
        "awarded": sum(1 for w in firsts if w),
        "robots_with_several": sum(1 for w in set(firsts) if w and firsts.count(w) > 1),
        "travel_m": round(travel, 1),
        "greedy_travel_m": round(greedy(list(starts.values()), spots), 1),
    }
    try:
        import numpy as np
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        return out
    cost = np.array([[math.dist(r, m) for m in spots] for r in starts.values()])
    rows, cols = linear_sum_assignment(cost)
    optimum = float(cost[rows, cols].sum())
    out["optimum_travel_m"] = round(optimum, 1)
    out["travel_over_optimum"] = round(travel / optimum, 4)
    out["greedy_over_optimum"] = round(out["greedy_travel_m"] / optimum, 4)
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "seed": args.seed}
    phases: dict[str, float] = {}
    t = time.monotonic()

    def lap(name: str) -> None:
        nonlocal t
        phases[name] = round(time.monotonic() - t, 1)
        t = time.monotonic()

    with PrivateBroker() as broker:
        cfg = _cfg(broker)
        out["baseline_rtt"] = await baseline(cfg, "b" + uuid.uuid4().hex[:8])
        lap("baseline")
        out["award"] = [
            await award_phase(cfg, n, args.missions, args.window, rng) for n in args.robots
        ]
        lap("award")
        out["reauction"] = [
            await reauction_phase(broker, n, args.kills, args.window, rng) for n in args.robots
        ]
        lap("reauction")
        if args.quality:
            r, m = (int(v) for v in args.quality.split("x"))
            out["quality"] = await quality_phase(cfg, r, m, args.seed, args.quality_kill)
            lap("quality")
    out["phase_wall_s"] = phases
    return out


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--robots", type=int, nargs="+", default=[10, 50])
    p.add_argument("--missions", type=int, default=10, help="per robot count, one at a time")
    p.add_argument("--window", type=float, default=0.2, help="bid window (s)")
    p.add_argument("--kills", type=int, default=3, help="re-auctions per robot count")
    p.add_argument("--quality", default="50x40", help="RxM at once; '' to skip")
    p.add_argument("--quality-kill", type=int, default=5, help="winners killed after")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    print(json.dumps(asyncio.run(main(args)), indent=2))


if __name__ == "__main__":
    cli()
