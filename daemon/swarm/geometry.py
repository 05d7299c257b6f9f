"""Where a mission's sectors are: a point mission is one waypoint, a mission of
several points one per sector; an area (coverage) mission is cut into ``sectors``
vertical strips, each swept by a lawnmower path.

Pure functions of the announce, so every peer computes the same waypoints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

from daemon.protocol.swarm import MissionAnnounce, Point, Points

# Distance between the lanes of a coverage sweep (m): a camera's footprint at a
# drone's usual survey height.  Lanes are capped so a huge area stays bounded.
SWATH_M: Final = 10.0
MAX_LANES: Final = 64


def distance(a: Point, b: Point) -> float:
    return math.dist((a.x, a.y, a.z), (b.x, b.y, b.z))


def path_length(start: Point, waypoints: Sequence[Point]) -> float:
    total, here = 0.0, start
    for wp in waypoints:
        total += distance(here, wp)
        here = wp
    return total


def waypoints(announce: MissionAnnounce, sector: int) -> list[Point]:
    """The points a robot visits for ``sector`` of the mission, in order."""
    area = announce.target
    if isinstance(area, Point):
        return [area]
    if isinstance(area, Points):
        return [area.points[sector]]
    width = (area.x1 - area.x0) / announce.sectors
    x0 = area.x0 + sector * width
    lanes = max(1, min(MAX_LANES, math.ceil(width / SWATH_M)))
    lane_w = width / lanes
    out: list[Point] = []
    for i in range(lanes):
        x = x0 + (i + 0.5) * lane_w
        ys = (area.y0, area.y1) if i % 2 == 0 else (area.y1, area.y0)
        out.extend(Point(x=x, y=y) for y in ys)
    return out


def work_length(announce: MissionAnnounce, sector: int) -> float:
    """The distance covered on site (the sweep), beyond the travel to its start."""
    wps = waypoints(announce, sector)
    return path_length(wps[0], wps[1:])
