"""A robot in the swarm: it bids for missions, works what it wins, reports.

:class:`RobotAgent` takes the ``peer`` role in peer-run auctions and the
``bidder`` role where an auctioneer runs them (:mod:`daemon.swarm.auction`).  It
prices a mission with :func:`daemon.swarm.cost.bid_costs` from where it will be
free and the work it already holds, queues the sectors it wins and drives its
:class:`Vehicle` through their waypoints one after the other, publishing
:class:`~daemon.protocol.swarm.MissionProgress` and its retained
:class:`~daemon.protocol.swarm.RobotState` — on every change, and every
``heartbeat_s`` while it holds work, which is what peers watch to re-auction
when it stops.

The vehicle is a port (:class:`Vehicle`): the node type's drivers (a kinematic
simulator, MAVLink) implement it; nothing here knows which.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Protocol

from daemon import topics
from daemon.bus import Bus
from daemon.errors import MtorError
from daemon.protocol.swarm import (
    PEERS,
    GeoFix,
    MissionAnnounce,
    MissionProgress,
    MissionRef,
    Point,
    ProgressStatus,
    RobotProfile,
    RobotState,
    RobotStatus,
)
from daemon.swarm.auction import Auction, Bidder, Role, Timing
from daemon.swarm.cost import Situation, bid_costs
from daemon.swarm.geometry import path_length, waypoints
from daemon.swarm.service import AuctionHost

log = logging.getLogger(__name__)

# Progress reports while moving: at most one per this many seconds.
PROGRESS_S: Final = 0.5


class VehicleError(MtorError):
    """The vehicle could not do what it was asked (a fault, an empty battery, a
    refused mission item)."""


@dataclass(frozen=True, slots=True)
class VehicleState:
    pose: Point
    battery_percent: float
    heading_deg: float = 0.0
    speed_mps: float = 0.0
    geo: GeoFix | None = None
    fault: str | None = None  # set while the vehicle cannot take work


class Vehicle(Protocol):
    """What a robot's driver offers the agent."""

    profile: RobotProfile

    def state(self) -> VehicleState: ...

    async def go(self, waypoints: list[Point], progress: Callable[[float], None]) -> None:
        """Visit the waypoints in order; ``progress(metres)`` as it moves.  Raises
        :class:`VehicleError` on a failure; cancellation stops the vehicle."""
        ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class Job:
    auction: Auction
    round: int
    sector: int
    waypoints: list[Point]

    @property
    def ref(self) -> MissionRef:
        return MissionRef(
            issuer=self.auction.issuer, mission=self.auction.mission, sector=self.sector
        )


class RobotAgent(AuctionHost):
    """One robot (one node id) in the swarm."""

    def __init__(
        self,
        bus: Bus,
        realm: str,
        node_id: str,
        vehicle: Vehicle,
        *,
        heartbeat_s: float = 1.0,
        reserve_percent: float = 20.0,
        timing: Timing | None = None,
        on_state: Callable[[RobotState], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(bus, realm, node_id, timing)
        self.vehicle = vehicle
        self.heartbeat_s = heartbeat_s
        self.reserve_percent = reserve_percent
        self.on_state = on_state
        self.jobs: list[Job] = []
        self.current: Job | None = None
        self.status: RobotStatus = "idle"
        self._wake = asyncio.Event()
        self._going: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Future[None]] = set()
        self._subscribed = False
        self._last_state: tuple[object, ...] | None = None

    # ------------------------------------------------------------ bidding

    def role_for(self, issuer: str, announce: MissionAnnounce) -> Role | None:
        return "peer" if announce.auctioneer == PEERS else "bidder"

    def bidder(self, issuer: str) -> Bidder:
        def price(announce: MissionAnnounce, round_: int) -> list[float | None] | None:
            every = frozenset(range(announce.sectors))
            return bid_costs(self.situation(), announce, every, time.time())

        return price

    def situation(self) -> Situation:
        vs = self.vehicle.state()
        here, load = vs.pose, 0.0
        for job in [j for j in (self.current, *self.jobs) if j is not None]:
            load += path_length(here, job.waypoints)
            here = job.waypoints[-1]
        return Situation(
            profile=self.vehicle.profile,
            free_at=here,
            battery_percent=vs.battery_percent,
            load_m=load,
            reserve_percent=self.reserve_percent,
            faulty=vs.fault is not None or self.status == "fault",
        )

    # ------------------------------------------------------------ work

    async def on_start(self, auction: Auction, round_: int, sector: int) -> None:
        self.jobs.append(Job(auction, round_, sector, waypoints(auction.announce, sector)))
        self._wake.set()
        await self.publish_state()

    async def on_abandon(self, auction: Auction, sector: int, reason: str) -> None:
        log.info("%s drops sector %d of %s: %s", self.me, sector, auction.mission, reason)
        self.jobs = [j for j in self.jobs if not (j.auction is auction and j.sector == sector)]
        cur = self.current
        if cur is not None and cur.auction is auction and cur.sector == sector and self._going:
            self._going.cancel()

    async def run(self) -> None:
        """Work the queue, and heartbeat while there is work; until cancelled."""
        if not self._subscribed:  # once: the bus keeps subscriptions across restarts
            self._subscribed = True
            await self.start()
            self.bus.on_connect(self._republish)
        await self.publish_state(force=True)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._heartbeat(), name=f"swarm-heartbeat:{self.me}")
                while True:
                    while not self.jobs:
                        self._wake.clear()
                        await self._wake.wait()
                    job = self.jobs.pop(0)
                    self.current = job
                    try:
                        await self._work(job)
                    finally:
                        self.current = None
                    await self.publish_state()  # not when stopping: a stopped robot is silent
        finally:
            self.close()

    async def _work(self, job: Job) -> None:
        last = [0.0]
        total = max(path_length(self.vehicle.state().pose, job.waypoints), 1e-9)
        travel = max(path_length(self.vehicle.state().pose, job.waypoints[:1]), 0.0)

        def moved(metres: float) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_S:
                last[0] = now
                status: ProgressStatus = "en_route" if metres < travel else "working"
                self._spawn(self._progress(job, status, min(1.0, metres / total)))

        async def drive() -> None:
            await self.vehicle.go(job.waypoints, moved)
            await self._flush()  # the moves' reports go before "working"
            self.status = "working"
            await self._progress(job, "working", 1.0)
            await self.publish_state()
            if job.auction.announce.work_s:
                await asyncio.sleep(job.auction.announce.work_s)

        self.status = "en_route"
        await self._progress(job, "en_route", 0.0)
        going = self._going = asyncio.create_task(drive())
        try:
            await going
        except VehicleError as exc:
            log.warning(
                "%s failed sector %d of %s: %s", self.me, job.sector, job.auction.mission, exc
            )
            self.status = "fault" if self.vehicle.state().fault else "idle"
            await self._flush()
            await self._progress(job, "failed", 0.0, str(exc))
            return
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me is not None and me.cancelling():
                raise  # the agent is stopping, not the job
            self.status = "idle"  # abandoned or recalled
            return
        finally:
            self._going = None
        self.status = "idle"
        await self._flush()
        await self._progress(job, "done", 1.0)

    async def _progress(
        self, job: Job, status: ProgressStatus, fraction: float, detail: str | None = None
    ) -> None:
        msg = MissionProgress(
            issuer=job.auction.issuer,
            mission=job.auction.mission,
            round=job.round,
            sector=job.sector,
            status=status,
            fraction=round(fraction, 4),
            pose=_mm(self.vehicle.state().pose),
            detail=detail,
        )
        await self._send(topics.SWARM_PROGRESS, msg)

    # ------------------------------------------------------------ state

    def robot_state(self) -> RobotState:
        vs = self.vehicle.state()
        if vs.fault is not None:
            self.status = "fault"
        cur = self.current or (self.jobs[0] if self.jobs else None)
        return RobotState(
            status=self.status,
            pose=_mm(vs.pose),
            geo=vs.geo,
            heading_deg=round(vs.heading_deg % 360, 1) % 360,
            speed_mps=round(vs.speed_mps, 3),
            battery_percent=round(max(0.0, min(100.0, vs.battery_percent)), 2),
            mission=cur.ref if cur is not None else None,
            queued=len(self.jobs),
            profile=self.vehicle.profile,
            heartbeat_s=self.heartbeat_s,
        )

    async def publish_state(self, *, force: bool = False) -> None:
        state = self.robot_state()
        sig = (state.status, state.mission, state.queued, round(state.battery_percent))
        if not force and sig == self._last_state and not self.busy:
            return
        self._last_state = sig
        topic = topics.SWARM_ROBOT.build(realm=self.realm, sender=self.me)
        await self.bus.publish(topic, state, qos=1, retain=True, wait=False)
        if self.on_state is not None:
            await self.on_state(state)

    async def _republish(self) -> None:
        """After a reconnect: peers may have seen our will; say where we are."""
        await self.publish_state(force=True)

    @property
    def busy(self) -> bool:
        return self.current is not None or bool(self.jobs)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            if self.busy:
                await self.publish_state(force=True)

    async def _flush(self) -> None:
        """Let the progress reports already spawned go out first (they keep order)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def recall(self) -> None:
        """Drop every job (each reported failed: recalled); the vehicle stops."""
        for job in list(self.jobs):
            await self._progress(job, "failed", 0.0, "recalled")
        self.jobs.clear()
        if self._going is not None:
            cur = self.current
            self._going.cancel()
            if cur is not None:
                with contextlib.suppress(Exception):
                    await self._progress(cur, "failed", 0.0, "recalled")


def _mm(p: Point) -> Point:
    """A pose to the millimetre: the wire need not carry float noise."""
    return Point(x=round(p.x, 3), y=round(p.y, 3), z=round(p.z, 3))
