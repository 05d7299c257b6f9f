"""The swarm protocol: robots' state, missions and their contract-net auction.

Every swarm topic is ``swarm/<kind>/<sender>``, the sender being the MQTT
identity of the account that wrote it (the generated ACL lets an account write
only its own), so a bid, a claim or a progress report is *from* the node id in
its topic — never from a name in the payload (docs/protocol.md, Swarm).

* ``swarm/robot/<node>``   :class:`RobotState`, retained; the robot's heartbeat.
* ``swarm/mission/<issuer>`` :class:`MissionAnnounce`: a mission, keyed by (issuer, id).
* ``swarm/bid/<node>``     :class:`Bid`: one cost per sector, ``null`` where infeasible.
* ``swarm/call/<auctioneer>`` :class:`MissionCall`: an auctioneer opens a new round.
* ``swarm/award/<sender>`` :class:`Award`: a sector's winner (the winner itself in a
  peer-run auction, the mission's auctioneer otherwise).
* ``swarm/ack/<node>``     :class:`MissionAck`: the winner takes the sector on.
* ``swarm/progress/<node>`` :class:`MissionProgress`: en route, working, done, failed.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import Field, model_validator

from daemon.messages import Message, Part, now
from daemon.protocol.common import Label, Name, Text

# A coordinate in metres of the realm's local frame (x east, y north, z up).  Bounded
# and finite: a NaN cost or position would make every peer's comparison differ.
Coord = Annotated[float, Field(ge=-1e7, le=1e7, allow_inf_nan=False)]
Cost = Annotated[float, Field(ge=0, le=1e12, allow_inf_nan=False)]
Round = Annotated[int, Field(ge=1, le=1 << 20)]
Sector = Annotated[int, Field(ge=0, lt=256)]
MAX_SECTORS: Final = 256
# "peers": the robots run the auction among themselves; otherwise the account that
# runs it (the orchestrator, or `mtor mission --auctioneer self`).
PEERS: Final = "peers"

RobotStatus = Literal["idle", "en_route", "working", "returning", "fault"]
ProgressStatus = Literal["en_route", "working", "done", "failed"]
Platform = Literal["ground", "air", "water"]


class Point(Part):
    x: Coord
    y: Coord
    z: Coord = 0.0


class Area(Part):
    """An axis-aligned rectangle (x0, y0) to (x1, y1) of the local frame."""

    x0: Coord
    y0: Coord
    x1: Coord
    y1: Coord

    @model_validator(mode="after")
    def _ordered(self) -> Area:
        if self.x1 <= self.x0 or self.y1 <= self.y0:
            raise ValueError("an area needs x1 > x0 and y1 > y0")
        return self


class Points(Part):
    """Several places, one sector each: missions allocated together."""

    points: list[Point] = Field(min_length=1, max_length=MAX_SECTORS)


class GeoFix(Part):
    """A GNSS position (MAVLink vehicles), beside the local-frame pose."""

    lat: Annotated[float, Field(ge=-90, le=90)]
    lon: Annotated[float, Field(ge=-180, le=180)]
    alt: Annotated[float, Field(ge=-1e5, le=1e6)] = 0.0


class RobotProfile(Part):
    """What a robot carries and can do (its capability advert, also in node/<id>/info)."""

    platform: Platform = "ground"
    sensors: list[Name] = Field(default_factory=list, max_length=64)
    payload_kg: float = Field(default=0.0, ge=0, le=1e5)
    max_speed_mps: float = Field(gt=0, le=1e4)
    range_m: float = Field(gt=0, le=1e9, description="Distance on a full battery.")
    driver: Name = "sim"


class MissionRef(Part):
    issuer: Name
    mission: Name
    sector: Sector = 0


class RobotState(Message):
    """``swarm/robot/<node>``, retained, QoS 1: published on every change and every
    ``heartbeat_s`` while the robot holds a mission (peers re-auction when it stops)."""

    TYPE = "swarm.robot"

    status: RobotStatus
    pose: Point
    geo: GeoFix | None = None
    heading_deg: float = Field(default=0.0, ge=0, lt=360)
    speed_mps: float = Field(default=0.0, ge=0, le=1e4)
    battery_percent: float = Field(ge=0, le=100)
    mission: MissionRef | None = None
    queued: int = Field(default=0, ge=0, le=1 << 16)
    profile: RobotProfile
    heartbeat_s: float = Field(gt=0, le=3600)
    ts: float = Field(default_factory=now)


class Requirements(Part):
    sensors: list[Name] = Field(default_factory=list, max_length=64)
    payload_kg: float = Field(default=0.0, ge=0, le=1e5)
    platform: list[Platform] = Field(default_factory=list, max_length=3)


class MissionAnnounce(Message):
    """``swarm/mission/<issuer>``, QoS 1: a mission to allocate.  ``target`` is a
    point (one sector), several points (one sector each, allocated together) or
    an area to cover, cut into ``sectors`` strips."""

    TYPE = "swarm.mission"

    mission: Name
    target: Point | Points | Area
    task: Name = "inspect"
    sectors: int = Field(default=1, ge=1, le=MAX_SECTORS)
    work_s: float = Field(default=0.0, ge=0, le=86400, description="Time spent on site.")
    requirements: Requirements = Field(default_factory=Requirements)
    deadline: float | None = Field(default=None, description="Epoch seconds: done by then.")
    bid_window_s: float = Field(default=0.5, gt=0, le=60)
    auctioneer: Name = PEERS
    note: Label | None = None
    ts: float = Field(default_factory=now)

    @model_validator(mode="after")
    def _sectors(self) -> MissionAnnounce:
        if isinstance(self.target, Point) and self.sectors != 1:
            raise ValueError("a point mission has one sector")
        if isinstance(self.target, Points):
            n = len(self.target.points)
            if self.sectors not in (1, n):
                raise ValueError(f"{n} points are {n} sectors, not {self.sectors}")
            self.sectors = n
        return self


class Bid(Message):
    """``swarm/bid/<node>``, QoS 1: the sender's cost of each sector (``null``: it
    cannot do that one).  A robot that can do none sends no bid."""

    TYPE = "swarm.bid"

    issuer: Name
    mission: Name
    round: Round = 1
    costs: list[Cost | None] = Field(max_length=MAX_SECTORS)
    ts: float = Field(default_factory=now)


class MissionCall(Message):
    """``swarm/call/<auctioneer>``: the mission's auctioneer opens round ``round``
    (after a winner dropped out or failed); robots bid again."""

    TYPE = "swarm.call"

    issuer: Name
    mission: Name
    round: Round
    reason: Text | None = None


class Award(Message):
    """``swarm/award/<sender>``, QoS 1: ``winner`` takes ``sector`` of the mission."""

    TYPE = "swarm.award"

    issuer: Name
    mission: Name
    round: Round
    sector: Sector = 0
    winner: Name
    cost: Cost


class MissionAck(Message):
    """``swarm/ack/<node>``, QoS 1: the winner has taken the sector on."""

    TYPE = "swarm.ack"

    issuer: Name
    mission: Name
    round: Round
    sector: Sector = 0


class MissionProgress(Message):
    """``swarm/progress/<node>``, QoS 1: the sector's state; done and failed are final
    (a failure makes the auction go on without this robot)."""

    TYPE = "swarm.progress"

    issuer: Name
    mission: Name
    round: Round
    sector: Sector = 0
    status: ProgressStatus
    fraction: float = Field(default=0.0, ge=0, le=1)
    pose: Point | None = None
    detail: Text | None = None
    ts: float = Field(default_factory=now)
