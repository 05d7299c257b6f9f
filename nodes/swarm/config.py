"""Configuration of the swarm node and its drivers (a discriminated union on ``type``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from daemon.protocol.swarm import Platform
from nodes.base import NodeConfigBase


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SimDriverConfig(_Strict):
    """A kinematic simulator: straight lines at constant speed, battery drain per metre."""

    type: Literal["sim"] = "sim"
    start: tuple[float, float] = Field(default=(0.0, 0.0), description="Start (x, y), metres.")
    speed_mps: float = Field(default=5.0, gt=0, le=1000, description="Cruise speed.")
    battery_percent: float = Field(default=100.0, ge=0, le=100, description="Charge at start.")
    drain_percent_per_m: float = Field(
        default=0.01, gt=0, le=100, description="Battery used per metre (0.01: 10 km range)."
    )
    step_s: float = Field(default=0.1, gt=0, le=10, description="Simulation step (s).")
    time_scale: float = Field(
        default=1.0, gt=0, le=10000, description="Simulated seconds per real second."
    )
    fail_after_m: float | None = Field(
        default=None, gt=0, description="Fail each mission after this many metres (tests)."
    )


class MavlinkDriverConfig(_Strict):
    """A MAVLink vehicle (ArduPilot, PX4) through pymavlink."""

    type: Literal["mavlink"] = "mavlink"
    url: str = Field(
        default="udpin:0.0.0.0:14550",
        description="pymavlink connection string (udpin:, udpout:, tcp:, /dev/ttyACM0, ...).",
    )
    source_system: int = Field(default=254, ge=1, le=255, description="Our MAVLink system id.")
    home: tuple[float, float, float] | None = Field(
        default=None,
        description="(lat, lon, alt) of the local frame's origin; default: the first fix.",
    )
    altitude_m: float = Field(default=10.0, ge=0, le=10000, description="Mission altitude.")
    arrive_m: float = Field(default=2.0, gt=0, le=1000, description="Acceptance radius.")
    speed_mps: float = Field(default=5.0, gt=0, le=1000, description="Advertised max speed.")
    range_m: float = Field(default=5000.0, gt=0, description="Distance on a full battery.")
    connect_timeout_s: float = Field(default=10.0, gt=0, le=600)
    reply_timeout_s: float = Field(default=3.0, gt=0, le=60, description="Mission handshake.")


DriverConfig = Annotated[SimDriverConfig | MavlinkDriverConfig, Field(discriminator="type")]


class SwarmConfig(NodeConfigBase):
    """One robot: its driver, what it carries, and its auction clocks."""

    type: Literal["swarm"] = "swarm"
    driver: DriverConfig = Field(default_factory=SimDriverConfig)
    platform: Platform = Field(default="ground", description="ground, air or water.")
    sensors: list[str] = Field(default_factory=list, description="What it carries (camera, ...).")
    payload_kg: float = Field(default=0.0, ge=0, description="Payload it can carry.")
    reserve_percent: float = Field(
        default=20.0, ge=0, le=100, description="Never bid below this battery after a mission."
    )
    heartbeat_s: float = Field(
        default=1.0, gt=0, le=60, description="State heartbeat while it holds work."
    )
    settle_s: float = Field(default=0.15, gt=0, le=10, description="Claim settle time.")
    award_timeout_s: float = Field(default=1.0, gt=0, le=60, description="Claim / ack timeout.")
