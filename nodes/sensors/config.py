"""Configuration of the sensors node."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from nodes.base import NodeConfigBase

BuiltinName = Literal["cpu_temperature", "load", "memory", "disk", "uptime"]
ALL_BUILTINS: tuple[BuiltinName, ...] = ("cpu_temperature", "load", "memory", "disk", "uptime")
DEFAULT_DEADBANDS: dict[BuiltinName, float] = {
    "cpu_temperature": 0.5,
    "load": 0.05,
    "memory": 1.0,
    "disk": 0.5,
    "uptime": 3600.0,
}


class SensorSpec(BaseModel):
    """One sensor read by a command or from a file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9_][a-z0-9_.-]*$", description="Event name (topic level).")
    command: str | None = Field(
        default=None,
        description="Shell command whose output is a number or JSON (see json_field).",
    )
    file: str | None = Field(default=None, description="File to read, e.g. a sysfs value.")
    regex: str | None = Field(
        default=None,
        description="Regex applied to the output; group 1 (or the match) is the value.",
    )
    json_field: str | None = Field(
        default=None, description="Dotted path into JSON output, e.g. 'sensor.temp'."
    )
    scale: float = Field(default=1.0, description="Value is multiplied by this ...")
    offset: float = Field(default=0.0, description="... then this is added.")
    unit: str | None = None
    device_class: str | None = Field(
        default=None, description="Home Assistant device class, e.g. temperature."
    )
    interval: float | None = Field(
        default=None, gt=0, description="Seconds between reads (default: the node's interval)."
    )
    deadband: float = Field(
        default=0.0, ge=0, description="Publish only when the value moves more than this."
    )
    timeout: float = Field(default=10.0, gt=0, description="Command timeout in seconds.")

    @model_validator(mode="after")
    def _one_source(self) -> SensorSpec:
        if (self.command is None) == (self.file is None):
            raise ValueError("set exactly one of 'command' or 'file'")
        return self

    @field_validator("regex")
    @classmethod
    def _regex_compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"invalid regex: {exc}") from exc
        return v


class SensorsConfig(NodeConfigBase):
    """Host metrics plus any command or file sensors."""

    type: Literal["sensors"] = "sensors"
    interval: float = Field(default=10.0, gt=0, description="Seconds between reads.")
    min_interval: float = Field(
        default=5.0, ge=0, description="At most one event per sensor per this many seconds."
    )
    heartbeat: float = Field(
        default=300.0,
        gt=0,
        description="Publish an unchanged value again after this many seconds.",
    )
    builtin: list[BuiltinName] = Field(
        default_factory=lambda: list(ALL_BUILTINS),
        description="Host metrics to publish.",
    )
    disk_paths: list[str] = Field(default_factory=lambda: ["/"], description="Mounts for 'disk'.")
    deadbands: dict[BuiltinName, float] = Field(
        default_factory=lambda: dict(DEFAULT_DEADBANDS),
        description="Deadband per builtin metric.",
    )
    sensors: list[SensorSpec] = Field(default_factory=list, description="Command / file sensors.")
