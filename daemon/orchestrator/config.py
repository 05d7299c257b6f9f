"""Configuration of the orchestrator (the ``orchestrator:`` section)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RoleLimits(_Strict):
    """Per-user limits of one role (0 = unlimited)."""

    max_concurrent: int = Field(default=8, ge=0, description="Tasks queued+running per user.")
    rate_per_s: float = Field(default=50.0, ge=0, description="Sustained submissions per second.")
    burst: int = Field(default=100, ge=1, description="Submissions allowed in a burst.")


def _default_roles() -> dict[str, RoleLimits]:
    return {
        "sysop": RoleLimits(max_concurrent=0, rate_per_s=0, burst=1),
        "user": RoleLimits(),
        "node": RoleLimits(max_concurrent=32, rate_per_s=200, burst=400),
        "guest": RoleLimits(max_concurrent=2, rate_per_s=2, burst=5),
        "orchestrator": RoleLimits(max_concurrent=0, rate_per_s=0, burst=1),
    }


class RequestLimits(_Strict):
    """Per-identity rate of requests on the admin, workflow and state topics."""

    rate_per_s: float = Field(default=5.0, ge=0, description="Sustained requests per second.")
    burst: int = Field(default=20, ge=1, description="Requests allowed in a burst.")


def _default_state_roles() -> dict[str, list[str]]:
    # Who may change a realm state key ("*": every key not listed).  Guests never; nodes
    # (local workflows) may set other keys but not the alarm.
    return {
        "armed": ["orchestrator", "sysop", "user", "homeassistant"],
        "*": ["orchestrator", "sysop", "user", "homeassistant", "node"],
    }


class BreakerConfig(_Strict):
    """Automatic blacklisting of a peer's capability after repeated failures."""

    failure_threshold: int = Field(default=3, ge=1, description="Consecutive failures to trip.")
    cooldown: float = Field(default=5.0, gt=0, description="First blacklist period (s).")
    max_cooldown: float = Field(default=300.0, gt=0, description="Cool-down cap (s).")
    probation_successes: int = Field(
        default=2, ge=1, description="Successes on probation (half-open) before trusted again."
    )


def _default_state_values() -> dict[str, list[str | int | float | bool]]:
    return {"armed": ["disarmed", "armed_home", "armed_away", "armed_night"]}


class OrchestratorConfig(_Strict):
    """Task queues, assignment, health, history and users."""

    queue_size: int = Field(default=1000, ge=1, description="Queued tasks per capability.")
    default_timeout: float = Field(default=300.0, gt=0, description="Task timeout if unset (s).")
    max_attempts: int = Field(default=3, ge=1, description="Assignments per task at most.")
    ack_timeout: float = Field(
        default=3.0, gt=0, description="A worker must acknowledge an assignment within this (s)."
    )
    capability_wait: float = Field(
        default=60.0,
        ge=0,
        description=(
            "A task for a capability no peer offers yet waits this long while the realm is "
            "starting or a node is still starting (loading its model), instead of failing at "
            "once (s; 0: fail at once)."
        ),
    )
    stale_after: float = Field(
        default=95.0, gt=0, description="A peer silent this long is treated as gone (s)."
    )
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    roles: dict[str, RoleLimits] = Field(default_factory=_default_roles)
    require_token: bool = Field(
        default=False,
        description="Refuse submissions without a valid API token (recommended off-localhost).",
    )
    anonymous_role: Literal["user", "guest", "node"] = Field(
        default="user", description="Role of a named user without token (never sysop)."
    )
    state_dir: Path = Field(default=Path("state"), description="History DB, users DB, tokens.")
    history_retention_days: float = Field(default=30.0, gt=0)
    history_max_rows: int = Field(default=1_000_000, ge=1000)
    stats_interval: float = Field(default=10.0, gt=0, description="Seconds between stats.")
    prometheus_port: int | None = Field(
        default=None, ge=1, le=65535, description="Serve /metrics on this port (off if unset)."
    )
    prometheus_host: str = Field(default="127.0.0.1")
    instance: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="This orchestrator's name among several on one realm (high "
        "availability; default: the node id). Each needs its own.",
    )
    lease_renew: float = Field(
        default=1.0, gt=0, le=30, description="How often the active renews its lease (s)."
    )
    lease_timeout: float = Field(
        default=3.0,
        gt=0,
        le=120,
        description="A lease not renewed this long is taken over by a standby (s); an active "
        "that dies is noticed at once (its will).",
    )
    dedupe_size: int = Field(
        default=10_000, ge=100, description="Finished tasks remembered for idempotent resubmits."
    )
    direct_replies: bool = Field(
        default=True,
        description="Let the assigned worker send 'done' straight to a submitter that asks "
        "for it with a reply key (TaskSubmit.direct, reply_key) on reply/<account>/<x>/direct: "
        "one hop less. The submitter drops a direct final without its key.",
    )
    accounts_file: Path | None = Field(
        default=None,
        description="The broker's accounts.json (mtor broker init): identities are then the "
        "MQTT usernames the broker authenticated, with the roles written there. Unset: a "
        "request topic's name is only a claim (an unconfigured broker).",
    )
    offers: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Which capabilities a node account may offer (glob patterns), by account; "
        "accounts not listed may offer any. Person accounts never offer any.",
    )
    requests: RequestLimits = Field(default_factory=RequestLimits)
    state_roles: dict[str, list[str]] = Field(
        default_factory=_default_state_roles,
        description="Roles that may change each realm state key ('*': the others).",
    )

    @field_validator("alarm_code", mode="before")
    @classmethod
    def _code_text(cls, v: object) -> object:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v  # YAML: 1234

    alarm_code: SecretStr | None = Field(
        default=None,
        description="Code needed to disarm (state armed -> disarmed); Home Assistant's panel "
        "then asks for it. Prefer alarm_code_file.",
    )
    alarm_code_file: Path | None = Field(default=None, description="File holding the alarm code.")
    forget_after: float = Field(
        default=3600.0,
        gt=0,
        description="A peer gone (offline or silent) this long is forgotten (s).",
    )

    state_values: dict[str, list[str | int | float | bool]] = Field(
        default_factory=_default_state_values,
        description="Realm state keys whose values are restricted, with their allowed values.",
    )
    state_strict: bool = Field(
        default=False, description="Refuse realm state keys not listed in state_values."
    )
