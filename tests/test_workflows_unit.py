"""Workflow definitions, templates, conditions and schedules as pure functions."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.config import build_config
from daemon.errors import ConfigError
from daemon.workflows.conditions import Facts, evaluate, in_window
from daemon.workflows.engine import next_fire
from daemon.workflows.loader import parse_mapping
from daemon.workflows.model import ScheduleTrigger, WorkflowConfig
from daemon.workflows.templating import TemplateError, compile_template, compile_value

ROOT = Path(__file__).resolve().parent.parent
CTX: dict[str, Any] = {
    "trigger": {"value": 31.5, "attrs": {"label": "person", "items": [1, 2]}},
    "steps": {"d": {"output": {"text": "a man"}}},
    "state": {"armed": "armed_away"},
    "input": None,
    "now": {"hour": 23},
    "run": {"id": "r1"},
    "workflow": "w",
}

ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ lipsum }}",
    "{{ self }}",
    "{{ self._TemplateReference__context }}",
    "{{ namespace }}",
    "{{ range(10**9) | list }}",
    "{{ range(10) }}",
    "{{ trigger.__class__ }}",
    "{{ trigger['__class__'] }}",
    "{{ trigger.attrs.label.upper() }}",
    "{{ trigger | attr('__class__') }}",
    "{{ 'a' * 10**9 }}",
    "{{ 2 ** (10**9) }}",
    "{{ '%0999999999d' % 1 }}",
    "{{ trigger.attrs.label | replace('', 'x' * 60000) }}",
    "{{ trigger.attrs.label | center(10**9) }}",
    "{% for a in trigger %}{% for b in trigger %}{% endfor %}{% endfor %}",
    "{% set x = 1 %}{{ x }}",
    "{% macro m() %}{% endmacro %}",
    "{% include 'x.j2' %}",
    "{% import 'x.j2' as x %}",
    "{{ config }}",
    "{{ request }}",
]


@pytest.mark.parametrize("source", ESCAPES)
def test_template_escapes_fail(source: str) -> None:
    with pytest.raises(TemplateError):
        compile_template(source).render(CTX)


def test_huge_output_is_refused() -> None:
    big = {**CTX, "trigger": {"items": ["x" * 1000] * 200}}
    tpl = compile_template("{% for i in trigger['items'] %}{{ i }}{% endfor %}")
    with pytest.raises(TemplateError, match="longer than"):
        tpl.render(big)


def test_templates_render_data() -> None:
    assert compile_template("{{ trigger.value + 1 }}").render(CTX) == 32.5
    assert compile_template("{{ trigger.attrs }}").render(CTX) == CTX["trigger"]["attrs"]
    text = "Saw a {{ trigger.attrs.label | upper }}: {{ steps.d.output.text }}"
    assert compile_template(text).render(CTX) == "Saw a PERSON: a man"
    assert compile_template("{{ trigger.nope | default('-') }}").render(CTX) == "-"
    assert compile_template("{{ trigger.attrs['items'] | join(',') }}").render(CTX) == "1,2"
    with pytest.raises(TemplateError, match="nope"):
        compile_template("{{ trigger.nope }}").render(CTX)
    value = compile_value({"a": ["{{ state.armed }}", 3], "b": "plain"})
    assert value.render(CTX) == {"a": ["armed_away", 3], "b": "plain"}


def _errors(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        build_config({"workflows": data})
    return str(info.value)


def test_malformed_definitions_name_the_key_path() -> None:
    text = _errors({"w": {"steps": [{"task": "echo", "input": {"t": "{{ ''.__class__ }}"}}]}})
    assert "workflows.w.steps[0]" in text and "input.t" in text and "__class__" in text
    text = _errors({"w": {"steps": [{"publish": "x", "task": "echo"}]}})
    assert "workflows.w.steps[0]: a step needs exactly one of the keys" in text
    text = _errors({"w": {"steps": [{"if": {"field": "a", "op": "~"}, "then": []}]}})
    assert "workflows.w.steps[0].if[0].op" in text
    text = _errors({"w": {"steps": [{"parallel": [[{"delay": -1}]]}]}})
    assert "workflows.w.steps[0].parallel[0][0].delay" in text
    text = _errors({"w": {"triggers": [{"type": "cron"}], "steps": [{"delay": 1}]}})
    assert "workflows.w.triggers[0]" in text
    text = _errors({"w": {"triggers": [{"type": "schedule", "at": ["25:00"]}], "steps": []}})
    assert "workflows.w.triggers[0].schedule.at" in text or "at" in text
    text = _errors({"w": {"steps": [{"task": "echo", "colour": "red"}]}})
    assert "workflows.w.steps[0].colour: unknown key" in text
    text = _errors({"w": {"steps": [{"id": "x", "delay": 1}, {"id": "x", "delay": 1}]}})
    assert "step id 'x' already used" in text
    text = _errors({"w": {"local": True, "steps": [{"set_state": "armed", "value": "x"}]}})
    assert "not allowed in a local workflow" in text
    text = _errors(
        {"w": {"local": True, "conditions": [{"capability": "tts"}], "steps": [{"delay": 0}]}}
    )
    assert "capability conditions need the orchestrator" in text
    text = _errors({"bad name!": {"steps": [{"delay": 0}]}})
    assert "bad name!" in text
    text = _errors({"w": {"steps": [{"publish": "{{ trigger.x", "payload": 1}]}})
    assert "syntax error" in text


def test_conditions() -> None:
    night = dt.datetime(2026, 1, 5, 23, 30)  # a Monday
    facts = Facts(now=night, state={"armed": "armed_away"}, has_capability=lambda c: c == "tts")
    w = WorkflowConfig.model_validate(
        {
            "conditions": [
                {"field": "trigger.value", "op": ">", "value": 30},
                {"field": "trigger.attrs.label", "op": "in", "value": ["person", "car"]},
                {"field": "trigger.attrs.items", "op": "contains", "value": 2},
                {"field": "trigger.attrs.missing", "op": "missing"},
                {"between": ["22:00", "06:00"], "days": ["mon"]},
                {"state": "armed", "op": "!=", "value": "disarmed"},
                {"capability": "tts"},
                {"not": {"capability": "vision.detect"}},
                {
                    "any": [
                        {"field": "trigger.value", "op": "<", "value": 0},
                        {"state": "armed", "value": "armed_away"},
                    ]
                },
            ],
            "steps": [{"delay": 0}],
        }
    )
    for cond in w.conditions:
        assert evaluate(cond, CTX, facts), cond
    assert not evaluate(w.conditions[0], {"trigger": {"value": "hot"}}, facts)  # incomparable
    mon, tue = dt.datetime(2026, 1, 5), dt.datetime(2026, 1, 6)
    assert in_window(tue.replace(hour=5), dt.time(22), dt.time(6), ["mon"])  # Monday's night
    assert not in_window(mon.replace(hour=5), dt.time(22), dt.time(6), ["mon"])
    assert not in_window(mon.replace(hour=12), dt.time(22), dt.time(6), [])
    assert in_window(mon.replace(hour=12), dt.time(9), dt.time(17), [])


def test_schedule_next_fire() -> None:
    now = dt.datetime(2026, 1, 5, 22, 0, 30).astimezone()  # Monday
    at = ScheduleTrigger.model_validate({"type": "schedule", "at": ["22:00", "06:30"]})
    assert next_fire(at, now) == pytest.approx(8 * 3600 + 29 * 60 + 30)
    sat = ScheduleTrigger.model_validate({"type": "schedule", "at": ["08:00"], "days": ["sat"]})
    assert next_fire(sat, now) == pytest.approx((4 * 24 + 10) * 3600 - 30)
    every = ScheduleTrigger.model_validate({"type": "schedule", "every": 30})
    assert next_fire(every, now) == 30


def test_every_example_in_the_docs_validates() -> None:
    text = (ROOT / "docs" / "workflows.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)
    found = 0
    for block in blocks:
        data = yaml.safe_load(block)
        if isinstance(data, dict) and "workflows" in data:
            parse_mapping(data["workflows"], "docs/workflows.md")
            found += len(data["workflows"])
    assert found >= 3
