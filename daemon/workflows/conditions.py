"""Workflow conditions: field comparisons, time windows, realm state, capabilities.

A condition is a small mapping told apart by its key::

    {field: trigger.attrs.label, op: "==", value: person}
    {between: ["22:00", "06:00"], days: [mon, tue]}      # wraps midnight
    {state: armed, op: in, value: [armed_away, armed_night]}
    {capability: tts}                                    # offered by an online peer
    {any: [...]} / {all: [...]} / {not: {...}}

Field paths are dotted (``trigger.attrs.label``, ``steps.detect.output.count``,
list items by number ``trigger.payload.items.0``) and read the run context.
Evaluation is pure: the caller passes the context, the clock and a capability
check, so it runs the same in the orchestrator, on a node and in tests.
"""

from __future__ import annotations

import datetime as dt
import logging
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

log = logging.getLogger(__name__)

Op = Literal["==", "!=", "<", "<=", ">", ">=", "in", "not_in", "contains", "exists", "missing"]
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
DAYS: Final[tuple[str, ...]] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
HHMM_RE: Final = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")
MISSING: Final = object()

_ORDER: Final[dict[str, Callable[[Any, Any], bool]]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def parse_hhmm(text: str) -> dt.time:
    m = HHMM_RE.match(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a time of day HH:MM")
    return dt.time(int(m[1]), int(m[2]))


class FieldCondition(_Strict):
    """Compare a field of the run context with a value."""

    field: str = Field(min_length=1, description="Dotted path, e.g. trigger.attrs.label.")
    op: Op = Field(default="==", description="Comparison.")
    value: Any = Field(default=None, description="What to compare with (a list for in/not_in).")


class StateCondition(_Strict):
    """Compare a realm state value (``state/<key>``)."""

    state: str = Field(min_length=1, description="Realm state key, e.g. armed.")
    op: Op = Field(default="==")
    value: Any = None


class TimeCondition(_Strict):
    """True between two local times of day (the window may wrap midnight)."""

    between: tuple[str, str] = Field(description='["22:00", "06:00"]: start, end (end excluded).')
    days: list[Day] = Field(default_factory=list, description="Only on these days (start day).")

    @field_validator("between")
    @classmethod
    def _times(cls, v: tuple[str, str]) -> tuple[str, str]:
        for t in v:
            parse_hhmm(t)
        return v


class CapabilityCondition(_Strict):
    """True when some online, healthy peer offers the capability (orchestrator only)."""

    capability: str = Field(min_length=1)


class AnyCondition(_Strict):
    any: list[Condition] = Field(min_length=1)


class AllCondition(_Strict):
    all: list[Condition] = Field(min_length=1)


class NotCondition(_Strict):
    not_: Condition = Field(alias="not")


CONDITION_KEYS: Final = ("field", "state", "between", "capability", "any", "all", "not")


def _condition_kind(v: Any) -> str | None:
    # Tags start with "~" so error paths can drop them (they are not keys of the file).
    if isinstance(v, dict):
        for key in CONDITION_KEYS:
            if key in v:
                return "~" + key
        return None
    kinds: dict[type, str] = {
        FieldCondition: "field",
        StateCondition: "state",
        TimeCondition: "between",
        CapabilityCondition: "capability",
        AnyCondition: "any",
        AllCondition: "all",
        NotCondition: "not",
    }
    kind = kinds.get(type(v))
    return None if kind is None else "~" + kind


Condition = Annotated[
    Annotated[FieldCondition, Tag("~field")]
    | Annotated[StateCondition, Tag("~state")]
    | Annotated[TimeCondition, Tag("~between")]
    | Annotated[CapabilityCondition, Tag("~capability")]
    | Annotated[AnyCondition, Tag("~any")]
    | Annotated[AllCondition, Tag("~all")]
    | Annotated[NotCondition, Tag("~not")],
    Discriminator(
        _condition_kind,
        custom_error_type="condition",
        custom_error_message="a condition needs one of the keys: " + ", ".join(CONDITION_KEYS),
    ),
]
for _m in (AnyCondition, AllCondition, NotCondition):
    _m.model_rebuild()


def resolve(data: Any, path: str) -> Any:
    """The value at a dotted path, or :data:`MISSING`."""
    cur = data
    for part in path.split("."):
        if isinstance(cur, Mapping):
            if part not in cur:
                return MISSING
            cur = cur[part]
        elif isinstance(cur, list) and part.lstrip("-").isdigit():
            i = int(part)
            if not -len(cur) <= i < len(cur):
                return MISSING
            cur = cur[i]
        else:
            return MISSING
    return cur


def compare(left: Any, op: str, right: Any) -> bool:
    """``left <op> right``; a missing field or incomparable types are False (not an error)."""
    if op == "exists":
        return left is not MISSING and left is not None
    if op == "missing":
        return left is MISSING or left is None
    if left is MISSING:
        return op in ("!=", "not_in")
    try:
        if op == "==":
            return bool(left == right)
        if op == "!=":
            return bool(left != right)
        if op == "in":
            return left in right if isinstance(right, list | tuple | str | dict) else False
        if op == "not_in":
            return left not in right if isinstance(right, list | tuple | str | dict) else True
        if op == "contains":
            return right in left if isinstance(left, list | tuple | str | dict) else False
        if isinstance(left, bool) or isinstance(right, bool):
            return False
        return _ORDER[op](left, right)
    except TypeError:
        return False


@dataclass(frozen=True, slots=True)
class Facts:
    """What conditions may look at besides the run context."""

    now: dt.datetime
    state: Mapping[str, Any]
    has_capability: Callable[[str], bool] | None = None


def in_window(now: dt.datetime, start: dt.time, end: dt.time, days: list[str]) -> bool:
    t = now.time().replace(second=0, microsecond=0)
    weekday = now.weekday()
    if start <= end:
        ok = start <= t < end
        start_day = weekday
    else:  # wraps midnight: 22:00-06:00 is in the window at 23:00 and at 05:00
        ok = t >= start or t < end
        start_day = weekday if t >= start else (weekday - 1) % 7
    return ok and (not days or DAYS[start_day] in days)


def evaluate(cond: Any, context: Mapping[str, Any], facts: Facts) -> bool:
    """Evaluate one condition model."""
    if isinstance(cond, FieldCondition):
        return compare(resolve(context, cond.field), cond.op, cond.value)
    if isinstance(cond, StateCondition):
        return compare(facts.state.get(cond.state, MISSING), cond.op, cond.value)
    if isinstance(cond, TimeCondition):
        start, end = (parse_hhmm(t) for t in cond.between)
        return in_window(facts.now, start, end, list(cond.days))
    if isinstance(cond, CapabilityCondition):
        if facts.has_capability is None:
            return False
        return facts.has_capability(cond.capability)
    if isinstance(cond, AnyCondition):
        return any(evaluate(c, context, facts) for c in cond.any)
    if isinstance(cond, AllCondition):
        return all(evaluate(c, context, facts) for c in cond.all)
    if isinstance(cond, NotCondition):
        return not evaluate(cond.not_, context, facts)
    raise TypeError(f"not a condition: {cond!r}")


def all_true(conds: list[Any], context: Mapping[str, Any], facts: Facts) -> bool:
    return all(evaluate(c, context, facts) for c in conds)


def uses_capability(cond: Any) -> bool:
    if isinstance(cond, CapabilityCondition):
        return True
    if isinstance(cond, AnyCondition):
        return any(uses_capability(c) for c in cond.any)
    if isinstance(cond, AllCondition):
        return any(uses_capability(c) for c in cond.all)
    if isinstance(cond, NotCondition):
        return uses_capability(cond.not_)
    return False
