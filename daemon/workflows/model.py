"""Workflow definitions: triggers, steps and limits, validated with pydantic.

A workflow is written in ``config.yaml`` under ``workflows:`` or in a YAML
file of ``workflows_dir`` (a mapping of name → definition).  Every template
inside it is compiled while it is validated, so a bad one is reported with its
key path by ``mtor config validate`` / ``mtor workflows validate``.
See docs/workflows.md for the reference and worked examples.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    field_validator,
    model_validator,
)

from daemon.topics import validate_filter
from daemon.workflows.conditions import Condition, Day, parse_hhmm, uses_capability

WORKFLOW_NAME_RE: Final = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"
STEP_ID_RE: Final = r"^[a-z_][a-z0-9_]{0,63}$"
CAPABILITY_RE: Final = r"^[a-z][a-z0-9_.-]{0,63}$"
STATE_KEY_RE: Final = r"^[a-z][a-z0-9_]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _compile(value: Any, path: str) -> Any:
    from daemon.workflows.templating import TemplateError, compile_value

    try:
        return compile_value(value, path)
    except TemplateError as exc:
        raise ValueError(str(exc)) from exc


def _check_filter(v: str) -> str:
    try:
        validate_filter(v)
    except ValueError as exc:
        raise ValueError(str(exc)) from exc
    return v


# ================================================================= triggers


class EventTrigger(_Strict):
    """A realm event: ``event/<node>/<domain>/<name>`` matching ``topic``."""

    type: Literal["event"]
    topic: str = Field(
        default="#", description="Filter below event/, e.g. +/vision/object or porch_cam/#."
    )
    match: dict[str, Any] = Field(
        default_factory=dict,
        description="Field path → value (a list means any of them), e.g. attrs.label: person.",
    )
    _v = field_validator("topic")(classmethod(lambda cls, v: _check_filter(v)))


class MqttTrigger(_Strict):
    """Any MQTT topic (zigbee2mqtt, Home Assistant, ...); JSON payloads are parsed."""

    type: Literal["mqtt"]
    topic: str = Field(description="A full MQTT filter, e.g. zigbee2mqtt/+.")
    match: dict[str, Any] = Field(default_factory=dict, description="payload.<field>: value.")
    _v = field_validator("topic")(classmethod(lambda cls, v: _check_filter(v)))


class ScheduleTrigger(_Strict):
    """Every N seconds, or at local times of day."""

    type: Literal["schedule"]
    every: float | None = Field(default=None, ge=1, le=31 * 86400, description="Interval (s).")
    at: list[str] = Field(default_factory=list, description='Times of day, e.g. ["22:30"].')
    days: list[Day] = Field(default_factory=list, description="Only on these days (for at).")

    @field_validator("at")
    @classmethod
    def _times(cls, v: list[str]) -> list[str]:
        for t in v:
            parse_hhmm(t)
        return v

    @model_validator(mode="after")
    def _one(self) -> ScheduleTrigger:
        if (self.every is None) == (not self.at):
            raise ValueError("a schedule needs exactly one of 'every' or 'at'")
        return self


class ManualTrigger(_Strict):
    """Started by hand (``mtor workflows run``) or by a program over MQTT."""

    type: Literal["manual"]


class StateTrigger(_Strict):
    """A realm state key changed (optionally to / from given values)."""

    type: Literal["state"]
    key: str = Field(pattern=STATE_KEY_RE)
    to: list[Any] = Field(default_factory=list, description="Only changes to these values.")
    from_: list[Any] = Field(default_factory=list, alias="from", description="Only from these.")

    @field_validator("to", "from_", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return v if isinstance(v, list) else [v]


Trigger = Annotated[
    EventTrigger | MqttTrigger | ScheduleTrigger | ManualTrigger | StateTrigger,
    Field(discriminator="type"),
]


# =================================================================== steps


class _Step(_Strict):
    id: str | None = Field(
        default=None, pattern=STEP_ID_RE, description="Name of the result: steps.<id>."
    )
    timeout: float | None = Field(default=None, gt=0, le=86400, description="Per attempt (s).")
    retries: int = Field(default=0, ge=0, le=10, description="Extra attempts after a failure.")
    retry_delay: float = Field(default=0.5, ge=0, le=3600, description="Between attempts (s).")
    continue_on_error: bool = Field(default=False, description="A failure does not fail the run.")


class TaskStep(_Step):
    """Submit a task to a capability; its output is ``steps.<id>.output``."""

    task: str = Field(pattern=CAPABILITY_RE, description="Capability, e.g. chat, tts, echo.")
    input: Any = Field(default=None, description="Task input (templates allowed).")
    priority: Literal["alarm", "interactive", "batch"] = "interactive"
    node: str | None = Field(default=None, description="Pin to this node id.")
    _input: Any = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _templates(self) -> TaskStep:
        self._input = _compile(self.input, "input")
        return self


class PublishStep(_Step):
    """Publish to an MQTT topic (templates allowed in topic and payload)."""

    publish: str = Field(min_length=1, description="Topic; '~/' at the start means mtor/<realm>/.")
    payload: Any = Field(default=None, description="A string is sent as is, else as JSON.")
    retain: bool = False
    qos: int = Field(default=1, ge=0, le=2)
    _topic: Any = PrivateAttr(default=None)
    _payload: Any = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _templates(self) -> PublishStep:
        self._topic = _compile(self.publish, "publish")
        self._payload = _compile(self.payload, "payload")
        if self._topic.static and ("+" in self.publish or "#" in self.publish):
            raise ValueError("publish topic may not contain wildcards")
        return self


class WaitEventStep(_Step):
    """Wait for an event (or, with ``raw``, any MQTT message); result: the trigger data."""

    wait_event: str = Field(description="Filter below event/ (or a full filter with raw).")
    raw: bool = Field(default=False, description="wait_event is a full MQTT filter.")
    match: dict[str, Any] = Field(default_factory=dict)
    timeout: float | None = Field(default=60.0, gt=0, le=86400)
    _v = field_validator("wait_event")(classmethod(lambda cls, v: _check_filter(v)))


class IfStep(_Step):
    """Run ``then`` when every condition holds, else ``else``."""

    if_: list[Condition] = Field(alias="if", min_length=1)
    then: list[Step] = Field(default_factory=list)
    else_: list[Step] = Field(default_factory=list, alias="else")

    @field_validator("if_", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return v if isinstance(v, list) else [v]


class ParallelStep(_Step):
    """Run branches (lists of steps) at the same time; waits for all of them."""

    parallel: list[list[Step]] = Field(min_length=1)


class SetStateStep(_Step):
    """Set a realm state key (validated like any ``state/<key>/set``)."""

    set_state: str = Field(pattern=STATE_KEY_RE)
    value: Any = None
    _value: Any = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _templates(self) -> SetStateStep:
        self._value = _compile(self.value, "value")
        return self


class DelayStep(_Step):
    """Wait a number of seconds."""

    delay: float = Field(ge=0, le=86400)


STEP_KEYS: Final = ("task", "publish", "wait_event", "if", "parallel", "set_state", "delay")
_STEP_TYPES: Final[dict[type, str]] = {}


def _step_kind(v: Any) -> str | None:
    # Tags start with "~" so error paths can drop them (they are not keys of the file).
    if isinstance(v, dict):
        found = [k for k in STEP_KEYS if k in v]
        return "~" + found[0] if len(found) == 1 else None
    kind = _STEP_TYPES.get(type(v))
    return None if kind is None else "~" + kind


Step = Annotated[
    Annotated[TaskStep, Tag("~task")]
    | Annotated[PublishStep, Tag("~publish")]
    | Annotated[WaitEventStep, Tag("~wait_event")]
    | Annotated[IfStep, Tag("~if")]
    | Annotated[ParallelStep, Tag("~parallel")]
    | Annotated[SetStateStep, Tag("~set_state")]
    | Annotated[DelayStep, Tag("~delay")],
    Discriminator(
        _step_kind,
        custom_error_type="step",
        custom_error_message="a step needs exactly one of the keys: " + ", ".join(STEP_KEYS),
    ),
]
_STEP_TYPES.update(
    {
        TaskStep: "task",
        PublishStep: "publish",
        WaitEventStep: "wait_event",
        IfStep: "if",
        ParallelStep: "parallel",
        SetStateStep: "set_state",
        DelayStep: "delay",
    }
)
for _m in (IfStep, ParallelStep):
    _m.model_rebuild()


def step_kind(step: Any) -> str:
    return _STEP_TYPES[type(step)]


def walk_steps(steps: list[Any], path: str = "steps") -> list[tuple[str, Any]]:
    """Every step with its key path, depth first."""
    out: list[tuple[str, Any]] = []
    for i, step in enumerate(steps):
        here = f"{path}[{i}]"
        out.append((here, step))
        if isinstance(step, IfStep):
            out += walk_steps(step.then, f"{here}.then")
            out += walk_steps(step.else_, f"{here}.else")
        elif isinstance(step, ParallelStep):
            for b, branch in enumerate(step.parallel):
                out += walk_steps(branch, f"{here}.parallel[{b}]")
    return out


# ================================================================ workflow


class WorkflowConfig(_Strict):
    """One workflow: when it starts, what must hold, what it does, and its limits."""

    description: str = Field(default="", description="What it is for.")
    enabled: bool = Field(default=True)
    local: bool = Field(
        default=False,
        description="Run on the node daemon (local steps only) instead of the orchestrator.",
    )
    triggers: list[Trigger] = Field(
        default_factory=list, description="What starts it (it can always be started by hand)."
    )
    conditions: list[Condition] = Field(
        default_factory=list, description="All must hold when triggered, else the run is skipped."
    )
    steps: list[Step] = Field(min_length=1, description="What it does, in order.")
    max_concurrent: int = Field(default=1, ge=1, le=1000, description="Runs at once.")
    overflow: Literal["drop", "queue"] = Field(
        default="drop", description="A trigger beyond max_concurrent: dropped or queued."
    )
    queue_size: int = Field(default=10, ge=1, le=10_000, description="Queued triggers at most.")
    cooldown: float = Field(
        default=0.0, ge=0, description="Triggers ignored this long after a start (s)."
    )
    debounce: float = Field(
        default=0.0, ge=0, description="Start only after triggers were quiet this long (s)."
    )
    timeout: float = Field(default=600.0, gt=0, le=7 * 86400, description="Whole run (s).")

    @model_validator(mode="after")
    def _consistent(self) -> WorkflowConfig:
        seen: dict[str, str] = {}
        for path, step in walk_steps(self.steps):
            if step.id is not None:
                if step.id in seen:
                    raise ValueError(f"{path}: step id {step.id!r} already used at {seen[step.id]}")
                seen[step.id] = path
        if self.local:
            for path, step in walk_steps(self.steps):
                if isinstance(step, SetStateStep):
                    raise ValueError(  # noqa: TRY004 - pydantic reports ValueError with the path
                        f"{path}: set_state needs the orchestrator (it owns realm state); "
                        "not allowed in a local workflow"
                    )
                if isinstance(step, TaskStep) and step.node is not None:
                    raise ValueError(
                        f"{path}: a local workflow runs tasks on its own node; drop 'node'"
                    )
                if isinstance(step, IfStep) and any(uses_capability(c) for c in step.if_):
                    raise ValueError(f"{path}: capability conditions need the orchestrator")
            if any(uses_capability(c) for c in self.conditions):
                raise ValueError(
                    "conditions: capability conditions need the orchestrator's registry; "
                    "not allowed in a local workflow"
                )
        return self


def check_name(name: str) -> str:
    if not re.match(WORKFLOW_NAME_RE, name):
        raise ValueError(f"workflow name {name!r} must match {WORKFLOW_NAME_RE}")
    return name
