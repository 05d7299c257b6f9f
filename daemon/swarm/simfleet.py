"""Many simulated robots in one process on a real broker: ``mtor sim swarm``.

Each robot is a :class:`~daemon.swarm.agent.RobotAgent` with its own MQTT
connection (its node id, its will) and a :class:`~daemon.swarm.kinematic.
KinematicVehicle`.  :func:`simulate` places ``robots`` robots and ``missions``
point missions at random in a 1 km square (seeded), announces every mission at
once (peer-run auctions), waits until each is acknowledged, then optionally
"kills" ``kill`` winners — each publishes the offline state the broker would
send as its will and drops off the bus — and waits until their missions are
acknowledged by others.  The report holds every position, so anyone can
recompute the optimal assignment independently.  By default the missions are
one announce of M points, allocated together (one per robot, near the optimal
assignment); ``separate`` announces each on its own (independent auctions).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from typing import Any, Final

from daemon import topics
from daemon.bus import Bus
from daemon.config import BrokerConfig
from daemon.protocol.node import NodeState
from daemon.protocol.swarm import MissionAnnounce, Point, Points, RobotProfile
from daemon.swarm.agent import RobotAgent
from daemon.swarm.auction import Timing
from daemon.swarm.auctioneer import Auctioneer
from daemon.swarm.kinematic import Kinematics, KinematicVehicle
from daemon.swarm.watch import Watcher, announce

SIDE_M: Final = 1000.0
ISSUER: Final = "sim"
SENSORS: Final = ("camera", "thermal", "lidar")


class SimFleet:
    """The robots and their tasks."""

    def __init__(self, broker: BrokerConfig, realm: str, password: str | None = None) -> None:
        self.broker, self.realm, self.password = broker, realm, password
        self.agents: dict[str, RobotAgent] = {}
        self.tasks: dict[str, list[asyncio.Task[None]]] = {}

    async def add(self, node_id: str, k: Kinematics, profile: RobotProfile, timing: Timing) -> None:
        will_topic = topics.NODE_STATE.build(realm=self.realm, node_id=node_id)
        will = (will_topic, NodeState(state="offline", boot_id="sim", reason="simulated"))
        client_id = f"sim-{node_id}-{uuid.uuid4().hex[:6]}"
        bus = Bus(self.broker, client_id, password=self.password, will=will)
        run = asyncio.create_task(bus.run(), name=f"sim-bus:{node_id}")
        await bus.wait_connected(10)
        agent = RobotAgent(
            bus, self.realm, node_id, KinematicVehicle(k, profile), heartbeat_s=1.0, timing=timing
        )
        self.agents[node_id] = agent
        self.tasks[node_id] = [run, asyncio.create_task(agent.run(), name=f"sim-swarm:{node_id}")]

    async def kill(self, node_ids: list[str]) -> None:
        """What dead robots look like to the others, all at the same moment: silence,
        then each one's will (the broker's, sent by its own connection before it goes)."""
        agents = [self.tasks[n][1] for n in node_ids]
        for t in agents:
            t.cancel()
        await asyncio.gather(*agents, return_exceptions=True)
        offline = NodeState(state="offline", boot_id="sim")
        await asyncio.gather(
            *(
                self.agents[n].bus.publish(
                    topics.NODE_STATE.build(realm=self.realm, node_id=n), offline, retain=True
                )
                for n in node_ids
            )
        )
        for n in node_ids:
            await self._stop(n)

    async def _stop(self, node_id: str) -> None:
        for t in reversed(self.tasks.pop(node_id, [])):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def close(self) -> None:
        for node_id in list(self.tasks):
            await self._stop(node_id)


def _profile(rng: random.Random, uniform: bool) -> tuple[Kinematics, RobotProfile]:
    start = (round(rng.uniform(0, SIDE_M), 1), round(rng.uniform(0, SIDE_M), 1))
    if uniform:
        speed, battery, sensors = 5.0, 100.0, ["camera"]
    else:
        speed = round(rng.uniform(2, 10), 1)
        battery = round(rng.uniform(30, 100), 1)
        sensors = ["camera", *rng.sample(SENSORS[1:], rng.randint(0, 2))]
    k = Kinematics(start=start, speed_mps=speed, battery_percent=battery)
    return k, RobotProfile(
        max_speed_mps=speed, range_m=100 / k.drain_percent_per_m, sensors=sensors
    )


# A place to serve: (mission id, sector) on the wire, its name and location in the report.
Slot = tuple[str, int]


def _acks(watcher: Watcher, slot: Slot) -> list[float]:
    return watcher.get(ISSUER, slot[0]).acked_at.get(slot[1], [])


async def _acked(
    watcher: Watcher, slots: list[Slot], count: dict[Slot, int], timeout: float
) -> None:
    """Until each slot has more acks than ``count`` says (or its mission is over)."""
    async with asyncio.timeout(timeout):
        while True:
            pending = [
                slot
                for slot in slots
                if len(_acks(watcher, slot)) <= count.get(slot, 0)
                and not watcher.get(ISSUER, slot[0]).finished.is_set()
            ]
            if not pending:
                return
            w = watcher.get(ISSUER, pending[0][0])
            w.changed.clear()
            await w.changed.wait()


async def simulate(
    broker: BrokerConfig,
    realm: str,
    *,
    robots: int,
    missions: int,
    seed: int = 1,
    uniform: bool = False,
    kill: int = 0,
    window: float = 0.5,
    timeout: float = 60.0,
    separate: bool = False,
    peers: bool = False,
    password: str | None = None,
) -> dict[str, Any]:
    """Run it and report.  By default the missions go out as one announce of
    ``missions`` points (allocated together, one per robot); ``separate``: one
    announce each (independent auctions).  This process is their auctioneer,
    unless ``peers``: then the robots run the auctions among themselves."""
    rng = random.Random(seed)
    timing = Timing()
    fleet = SimFleet(broker, realm, password)
    bus = Bus(broker, f"sim-watch-{uuid.uuid4().hex[:6]}", password=password)
    run = asyncio.create_task(bus.run())
    report: dict[str, Any] = {
        "realm": realm,
        "seed": seed,
        "uniform": uniform,
        "announced": "separately" if separate else "together",
        "auctioneer": "peers" if peers else ISSUER,
    }
    auctioneer: Auctioneer | None = None
    try:
        await bus.wait_connected(10)
        watcher = Watcher(bus, realm)
        await watcher.start()
        if not peers:
            auctioneer = Auctioneer(bus, realm, ISSUER, timing=timing)
            await auctioneer.start()
        starts: dict[str, list[float]] = {}
        for i in range(robots):
            node_id = f"sim{i:03d}"
            k, profile = _profile(rng, uniform)
            starts[node_id] = [k.start[0], k.start[1]]
            await fleet.add(node_id, k, profile, timing)
        async with asyncio.timeout(timeout):
            while not set(starts) <= set(watcher.robots):
                watcher.robot_seen.clear()
                await watcher.robot_seen.wait()
        spots = [
            [round(rng.uniform(0, SIDE_M), 1), round(rng.uniform(0, SIDE_M), 1)]
            for _ in range(missions)
        ]
        slots, announces = _announces(spots, separate, window, "peers" if peers else ISSUER)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for m in announces:
            await announce(bus, realm, ISSUER, m)
        await _acked(watcher, slots, {}, timeout)
        report["allocation_s"] = round(
            max((_acks(watcher, s)[0] for s in slots if _acks(watcher, s)), default=t0) - t0, 3
        )
        winners = {slot: _holder(watcher, slot) for slot in slots}
        killed: list[str] = []
        if kill:
            candidates = sorted({w for w in winners.values() if w})
            killed = sorted(rng.sample(candidates, min(kill, len(candidates))))
            report["reallocation_s"] = await _kill(fleet, watcher, winners, killed, timeout)
        report["robots"] = [{"id": n, "start": st} for n, st in starts.items()]
        report["missions"] = [
            _mission(watcher, slot, f"m{j:03d}", spots[j]) for j, slot in enumerate(slots)
        ]
        report["killed"] = killed
    finally:
        if auctioneer is not None:
            auctioneer.close()
        await fleet.close()
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
    return report


def _announces(
    spots: list[list[float]], separate: bool, window: float, auctioneer: str
) -> tuple[list[Slot], list[MissionAnnounce]]:
    points = [Point(x=x, y=y) for x, y in spots]
    if separate:
        slots: list[Slot] = [(f"m{j:03d}", 0) for j in range(len(spots))]
        return slots, [
            MissionAnnounce(mission=m, target=p, bid_window_s=window, auctioneer=auctioneer)
            for (m, _), p in zip(slots, points, strict=True)
        ]
    slots = [("batch", j) for j in range(len(spots))]
    if not points:
        return slots, []
    together = MissionAnnounce(
        mission="batch", target=Points(points=points), bid_window_s=window, auctioneer=auctioneer
    )
    return slots, [together]


async def _kill(
    fleet: SimFleet,
    watcher: Watcher,
    winners: dict[Slot, str | None],
    killed: list[str],
    timeout: float,
) -> float:
    """Kill ``killed``; seconds until every slot they held has a new ack."""
    theirs = [slot for slot, w in winners.items() if w in killed]
    count = {slot: len(_acks(watcher, slot)) for slot in theirs}
    t_kill = asyncio.get_running_loop().time()
    await fleet.kill(killed)
    await _acked(watcher, theirs, count, timeout)
    latest = [_acks(watcher, slot)[-1] for slot in theirs if _acks(watcher, slot)]
    return round(max(latest, default=t_kill) - t_kill, 3)


def _holder(watcher: Watcher, slot: Slot) -> str | None:
    auction = watcher.auction(ISSUER, slot[0])
    return auction.sectors[slot[1]].holder if auction is not None else None


def _mission(watcher: Watcher, slot: Slot, name: str, location: list[float]) -> dict[str, Any]:
    auction = watcher.auction(ISSUER, slot[0])
    sec = auction.sectors[slot[1]] if auction is not None else None
    w = watcher.get(ISSUER, slot[0])
    mine = f"sector {slot[1]} "
    return {
        "id": name,
        "location": location,
        "winner": sec.holder if sec is not None else None,
        "cost": sec.cost if sec is not None else None,
        "reauctioned": bool(sec is not None and len(sec.winners) > 1),
        "winners": list(sec.winners) if sec is not None else [],
        "rounds": auction.round if auction is not None else 0,
        "timeline": [
            [round(t - (w.announced_at or t), 3), text]
            for t, text in w.timeline
            if text.startswith(mine) or not text.startswith("sector ")
        ],
    }


def plot(report: dict[str, Any], path: str) -> None:
    """Robots, missions and the assignments (lines from each winner's start)."""
    import importlib

    importlib.import_module("matplotlib").use("Agg")  # an optional package: no stubs needed
    plt = importlib.import_module("matplotlib.pyplot")

    starts = {r["id"]: r["start"] for r in report["robots"]}
    fig, ax = plt.subplots(figsize=(8, 8))
    ax.scatter(*zip(*starts.values(), strict=True), marker="o", label="robots", s=18)
    spots = [m["location"] for m in report["missions"]]
    if spots:
        ax.scatter(*zip(*spots, strict=True), marker="x", label="missions", s=30)
    for m in report["missions"]:
        for i, w in enumerate(m["winners"]):
            if w in starts:
                style = "-" if i == len(m["winners"]) - 1 else ":"
                (x0, y0), (x1, y1) = starts[w], m["location"]
                ax.plot([x0, x1], [y0, y1], style, linewidth=0.8)
    for node_id in report["killed"]:
        ax.scatter(*starts[node_id], marker="s", facecolors="none", edgecolors="red", s=60)
    ax.set_aspect("equal")
    ax.set_title(f"{len(starts)} robots, {len(spots)} missions, killed {len(report['killed'])}")
    ax.legend(loc="upper right")
    fig.savefig(path, dpi=100)
    plt.close(fig)
