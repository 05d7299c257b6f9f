"""Configuration of the sensors node.

Event names (``event/<node_id>/sensor/<name>``) and units of the builtins:

==================  ========================================  =====
name                value                                     unit
==================  ========================================  =====
``cpu_temperature`` hottest thermal zone                      °C
``load``            1-minute load average (attrs load5/15)    —
``memory``          memory in use (attrs used_mb, total_mb)   %
``disk_<mount>``    space in use per ``disk_paths`` entry     %
``uptime``          time since the host booted                s
==================  ========================================  =====

``disk_<mount>`` is derived from the path: ``/`` → ``disk_root``,
``/mnt/data`` → ``disk_mnt_data`` (see :func:`disk_sensor_name`).
"""

from __future__ import annotations

import re
from typing import Any, Literal

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
SENSOR_NAME_RE = r"^[a-z0-9_][a-z0-9_.-]*$"


def disk_sensor_name(path: str) -> str:
    """The event name of a disk path: ``/`` → ``disk_root``, ``/var/lib`` → ``disk_var_lib``."""
    slug = re.sub(r"[^a-z0-9_.-]+", "_", path.strip("/").lower()).strip("_")
    return f"disk_{slug or 'root'}"


class SensorSpec(BaseModel):
    """One sensor read by a command or from a file.

    The output goes through, in order: ``json_field`` (if set, the output is
    JSON and this dotted path picks the value; list indexes are numbers),
    ``regex`` (if set, group 1 — or the whole match — is the value), a number
    parse (JSON ``true``/``false`` count as 1/0), then ``scale`` and ``offset``.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=SENSOR_NAME_RE, description="Event name (topic level).")
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
        default=None, description="Dotted path into JSON output, e.g. 'sensor.temp' or 'list.0'."
    )
    scale: float = Field(default=1.0, description="Value is multiplied by this ...")
    offset: float = Field(default=0.0, description="... then this is added.")
    precision: int | None = Field(
        default=None, ge=0, le=12, description="Round the value to this many decimals."
    )
    unit: str | None = Field(default=None, description="Unit sent with the value, e.g. °C.")
    device_class: str | None = Field(
        default=None, description="Home Assistant device class, e.g. temperature."
    )
    state_class: Literal["measurement", "total", "total_increasing"] | None = Field(
        default="measurement",
        description="Home Assistant state class (null: not a measurement, no statistics).",
    )
    interval: float | None = Field(
        default=None, gt=0, description="Seconds between reads (default: the node's interval)."
    )
    deadband: float = Field(
        default=0.0, ge=0, description="Publish only when the value moves more than this."
    )
    timeout: float = Field(
        default=10.0, gt=0, description="Seconds a command run or a file read may take."
    )

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

    @field_validator("json_field")
    @classmethod
    def _json_path(cls, v: str | None) -> str | None:
        if v is not None and (not v or any(not part for part in v.split("."))):
            raise ValueError("json_field must be a dotted path like 'a.b.0', with no empty parts")
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
        description="Host metrics to publish (missing ones, e.g. no thermal zone, are skipped).",
    )
    disk_paths: list[str] = Field(default_factory=lambda: ["/"], description="Mounts for 'disk'.")
    deadbands: dict[BuiltinName, float] = Field(
        default_factory=lambda: dict(DEFAULT_DEADBANDS),
        description="Deadband per builtin metric (unlisted ones keep their default).",
    )
    sensors: list[SensorSpec] = Field(default_factory=list, description="Command / file sensors.")

    @field_validator("deadbands", mode="before")
    @classmethod
    def _deadband_defaults(cls, v: Any) -> Any:
        # Setting one deadband must not reset the others to zero.
        if isinstance(v, dict):
            return {**DEFAULT_DEADBANDS, **v}
        return v

    @field_validator("deadbands")
    @classmethod
    def _deadbands_positive(cls, v: dict[BuiltinName, float]) -> dict[BuiltinName, float]:
        for key, value in v.items():
            if value < 0:
                raise ValueError(f"deadband of {key} must be >= 0")
        return v

    @field_validator("disk_paths")
    @classmethod
    def _absolute_paths(cls, v: list[str]) -> list[str]:
        for path in v:
            if not path.startswith("/"):
                raise ValueError(f"disk path {path!r} must be absolute")
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> SensorsConfig:
        seen: set[str] = set()
        for name in self.sensor_names():
            if name in seen:
                raise ValueError(
                    f"two sensors would publish as {name!r}: rename one "
                    "(builtins: cpu_temperature, load, memory, disk_<mount>, uptime)"
                )
            seen.add(name)
        return self

    def sensor_names(self) -> list[str]:
        """Every event name this node may publish, builtins first."""
        names: list[str] = []
        for builtin in dict.fromkeys(self.builtin):
            if builtin == "disk":
                names.extend(disk_sensor_name(p) for p in dict.fromkeys(self.disk_paths))
            else:
                names.append(builtin)
        names.extend(s.name for s in self.sensors)
        return names
