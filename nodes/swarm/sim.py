"""The ``sim`` driver: :class:`~daemon.swarm.kinematic.KinematicVehicle` with the
node's config (straight lines at ``speed_mps``, battery drain per metre, failure
on command or after ``fail_after_m`` metres)."""

from __future__ import annotations

from daemon.protocol.swarm import RobotProfile
from daemon.swarm.kinematic import Kinematics, KinematicVehicle
from nodes.swarm.config import SimDriverConfig


class SimVehicle(KinematicVehicle):
    def __init__(self, cfg: SimDriverConfig, profile: RobotProfile) -> None:
        super().__init__(
            Kinematics(
                start=cfg.start,
                speed_mps=cfg.speed_mps,
                battery_percent=cfg.battery_percent,
                drain_percent_per_m=cfg.drain_percent_per_m,
                step_s=cfg.step_s,
                time_scale=cfg.time_scale,
                fail_after_m=cfg.fail_after_m,
            ),
            profile,
        )
