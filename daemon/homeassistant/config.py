"""The ``homeassistant`` config section (a light module: ``daemon.config`` imports it)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

# A discovery prefix / birth topic: plain topic levels, no wildcards.
_LEVEL_FORBIDDEN = ("+", "#", "\0")


def _plain_topic(value: str, what: str) -> str:
    if not value or value.startswith("/") or value.endswith("/") or "//" in value:
        raise ValueError(f"{what} must be a topic like 'homeassistant' (no empty levels)")
    if any(c in value for c in _LEVEL_FORBIDDEN):
        raise ValueError(f"{what} must not contain '+', '#' or NUL")
    return value


class HomeAssistantConfig(BaseModel):
    """MQTT discovery for Home Assistant (and anything else that reads it)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        default=True, description="Publish discovery configs and accept commands from HA."
    )
    discovery_prefix: str = Field(
        default="homeassistant",
        description="Home Assistant's discovery prefix (its MQTT integration setting).",
    )
    birth_topic: str = Field(
        default="homeassistant/status",
        description="Where Home Assistant announces itself; 'online' here re-announces all.",
    )
    account: str = Field(
        default="homeassistant",
        pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$",
        description="The MQTT username Home Assistant connects with: its alarm panel's "
        "commands go to state/armed/set/<account> (docs/security.md).",
    )
    device_name: str | None = Field(
        default=None, description="Device name shown in Home Assistant (default: the node id)."
    )
    support_url: str | None = Field(
        default=None,
        description="http(s) link Home Assistant shows as the origin's support page.",
    )
    health_entities: bool = Field(
        default=True,
        description="Diagnostic entities for CPU, temperature, load and memory of the daemon.",
    )

    @field_validator("discovery_prefix")
    @classmethod
    def _prefix_ok(cls, v: str) -> str:
        return _plain_topic(v, "discovery_prefix")

    @field_validator("support_url")
    @classmethod
    def _url_ok(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("support_url must start with http:// or https://")
        return v

    @field_validator("birth_topic")
    @classmethod
    def _birth_ok(cls, v: str) -> str:
        return _plain_topic(v, "birth_topic")
