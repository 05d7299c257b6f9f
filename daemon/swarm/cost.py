"""A robot's bid: what each sector of a mission would cost it, or ``None``.

The cost is in metres: the travel from where the robot will be free (the end of
the work it already holds) to the sector's first waypoint, plus that remaining
work (its load), plus a penalty when the battery left after the mission would
fall below :data:`COMFORT_PERCENT`.  A sector is infeasible (``None``) when the
robot lacks a required sensor, payload or platform, when the battery after it
would fall below the robot's reserve, or when it would finish after the
deadline.  A fully charged robot with nothing to do bids its travel distance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from daemon.protocol.swarm import MissionAnnounce, Point, RobotProfile
from daemon.swarm.geometry import distance, waypoints, work_length

# Below this battery level after a mission a bid grows by BATTERY_WEIGHT metres per
# percent missing: a fresher robot should win a near tie.
COMFORT_PERCENT: Final = 50.0
BATTERY_WEIGHT: Final = 5.0


@dataclass(frozen=True, slots=True)
class Situation:
    """What the robot knows of itself when it bids."""

    profile: RobotProfile
    free_at: Point  # where it will be once the work it holds is done
    battery_percent: float
    load_m: float = 0.0  # distance of the work it already holds
    reserve_percent: float = 20.0
    faulty: bool = False


def capable(profile: RobotProfile, announce: MissionAnnounce) -> bool:
    req = announce.requirements
    if not set(req.sensors) <= set(profile.sensors):
        return False
    if req.payload_kg > profile.payload_kg:
        return False
    return not req.platform or profile.platform in req.platform


def sector_cost(
    situation: Situation, announce: MissionAnnounce, sector: int, now: float
) -> float | None:
    """The bid for one sector, ``None`` when the robot cannot do it."""
    if situation.faulty or not capable(situation.profile, announce):
        return None
    travel = distance(situation.free_at, waypoints(announce, sector)[0])
    work = work_length(announce, sector)
    per_percent = situation.profile.range_m / 100.0
    after = situation.battery_percent - (situation.load_m + travel + work) / per_percent
    if after < situation.reserve_percent:
        return None
    if announce.deadline is not None:
        eta = (situation.load_m + travel + work) / situation.profile.max_speed_mps
        if now + eta + announce.work_s > announce.deadline:
            return None
    penalty = BATTERY_WEIGHT * max(0.0, COMFORT_PERCENT - after)
    return round(situation.load_m + travel + penalty, 6)


def bid_costs(
    situation: Situation, announce: MissionAnnounce, open_sectors: frozenset[int], now: float
) -> list[float | None] | None:
    """One cost per sector (``None`` for sectors not open or infeasible); ``None``
    when no open sector is feasible: then the robot sends no bid."""
    costs = [
        sector_cost(situation, announce, s, now) if s in open_sectors else None
        for s in range(announce.sectors)
    ]
    return costs if any(c is not None for c in costs) else None
