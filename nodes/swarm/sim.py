"""The kinematic simulator driver: a point moving in straight lines at constant speed.

Each step (``step_s`` of real time, ``time_scale`` times as much simulated time)
moves the robot towards the next waypoint and drains the battery by
``drain_percent_per_m`` per metre.  It fails on command (:meth:`SimVehicle.fail`,
the node's "Fail" button), after ``fail_after_m`` metres of a mission, or when
the battery is empty.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

from daemon.protocol.swarm import Point, RobotProfile
from daemon.swarm.agent import VehicleError, VehicleState
from nodes.swarm.config import SimDriverConfig


class SimVehicle:
    def __init__(self, cfg: SimDriverConfig, profile: RobotProfile) -> None:
        self.cfg = cfg
        self.profile = profile
        self.pose = Point(x=cfg.start[0], y=cfg.start[1])
        self.battery = cfg.battery_percent
        self.heading = 0.0
        self.speed = 0.0
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
        cfg = self.cfg
        step_m = cfg.speed_mps * cfg.step_s * cfg.time_scale
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
                    self.speed = cfg.speed_mps
                    await asyncio.sleep(cfg.step_s)
                    d = min(step_m, left)
                    if cfg.fail_after_m is not None:
                        d = min(d, max(cfg.fail_after_m - done, 0.0)) or d
                    k = d / left
                    self.pose = Point(
                        x=self.pose.x + dx * k, y=self.pose.y + dy * k, z=self.pose.z + dz * k
                    )
                    self.battery = max(0.0, self.battery - d * cfg.drain_percent_per_m)
                    done += d
                    progress(done)
            self._check(done, arrived=True)
        finally:
            self.speed = 0.0

    def _check(self, done: float, *, arrived: bool = False) -> None:
        if self._fail is not None:
            reason, self._fail = self._fail, None
            raise VehicleError(reason)
        if self.cfg.fail_after_m is not None and done >= self.cfg.fail_after_m and not arrived:
            raise VehicleError(f"simulated failure after {done:.0f} m")
        if self.battery <= 0 and not arrived:
            raise VehicleError("battery empty")

    async def close(self) -> None:
        return None
