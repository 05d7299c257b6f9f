"""A kinematic vehicle: a point moving in straight lines at constant speed.

Each step (``step_s`` of real time, ``time_scale`` times as much simulated time)
moves it towards the next waypoint and drains the battery by
``drain_percent_per_m`` per metre.  It fails on command (:meth:`fail`), after
``fail_after_m`` metres of a mission, or when the battery is empty.  The swarm
node's ``sim`` driver and ``mtor sim swarm`` drive it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass

from daemon.protocol.swarm import Point, RobotProfile
from daemon.swarm.agent import VehicleError, VehicleState


@dataclass(frozen=True, slots=True)
class Kinematics:
    start: tuple[float, float] = (0.0, 0.0)
    speed_mps: float = 5.0
    battery_percent: float = 100.0
    drain_percent_per_m: float = 0.01
    step_s: float = 0.1
    time_scale: float = 1.0
    fail_after_m: float | None = None


class KinematicVehicle:
    def __init__(self, k: Kinematics, profile: RobotProfile) -> None:
        self.k = k
        self.profile = profile
        self.pose = Point(x=k.start[0], y=k.start[1])
        self.battery = k.battery_percent
        self.heading = 0.0
        self.speed = 0.0
        self.travelled = 0.0  # metres, over its whole life
        self._fail: str | None = None

    def state(self) -> VehicleState:
        return VehicleState(
            pose=self.pose,
            battery_percent=self.battery,
            heading_deg=self.heading,
            speed_mps=self.speed,
        )

    def fail(self, reason: str = "failure on command") -> None:
        """Make the mission in progress (or the next one) fail."""
        self._fail = reason

    async def go(self, waypoints: list[Point], progress: Callable[[float], None]) -> None:
        k = self.k
        step_m = k.speed_mps * k.step_s * k.time_scale
        done = 0.0
        try:
            for wp in waypoints:
                while True:
                    dx, dy, dz = wp.x - self.pose.x, wp.y - self.pose.y, wp.z - self.pose.z
                    left = math.sqrt(dx * dx + dy * dy + dz * dz)
                    if left < 1e-6:
                        break
                    self._check(done)
                    self.heading = math.degrees(math.atan2(dx, dy)) % 360
                    self.speed = k.speed_mps
                    await asyncio.sleep(k.step_s)
                    d = min(step_m, left)
                    if k.fail_after_m is not None and k.fail_after_m > done:
                        d = min(d, k.fail_after_m - done)
                    f = d / left
                    self.pose = Point(
                        x=self.pose.x + dx * f, y=self.pose.y + dy * f, z=self.pose.z + dz * f
                    )
                    self.battery = max(0.0, self.battery - d * k.drain_percent_per_m)
                    done += d
                    self.travelled += d
                    progress(done)
            self._check(done, arrived=True)
        finally:
            self.speed = 0.0

    def _check(self, done: float, *, arrived: bool = False) -> None:
        if self._fail is not None:
            reason, self._fail = self._fail, None
            raise VehicleError(reason)
        if self.k.fail_after_m is not None and done >= self.k.fail_after_m and not arrived:
            raise VehicleError(f"simulated failure after {done:.0f} m")
        if self.battery <= 0 and not arrived:
            raise VehicleError("battery empty")

    async def close(self) -> None:
        return None
