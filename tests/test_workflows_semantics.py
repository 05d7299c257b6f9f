"""Workflow semantics against a real broker: state triggers, debounce, retries, waits, schedules.

Also: ``mtor config validate`` names a bad workflow key by its path, and a
local schedule-triggered workflow keeps running while the broker is down, its
publishes kept in the outbox and delivered when the broker returns.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.broker import PrivateBroker
from daemon.messages import decode, encode
from daemon.protocol.state import StateSet
from daemon.protocol.workflow import WorkflowEvent
from daemon.runtime import NodeDaemon
from daemon.workflows import engine as engine_mod
from tests.conftest import Collector, make_config, running_bus
from tests.test_workflows import Env, event, finished, mtor, request, wait_peers, wf_events


@pytest.fixture
async def env(broker: PrivateBroker, realm: str, tmp_path: Path) -> AsyncIterator[Env]:
    e = Env(broker, realm, tmp_path)
    try:
        yield e
    finally:
        await e.close()


def payloads(out: Collector, suffix: str) -> list[bytes]:
    return [m.payload for m in out.messages if m.topic.endswith(suffix)]


async def until(predicate: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_state_trigger_to_and_from(env: Env) -> None:
    flows = {
        "night": {
            "triggers": [{"type": "state", "key": "mode", "to": "night", "from": ["day"]}],
            "max_concurrent": 5,
            "steps": [
                {"publish": "~/out/mode", "payload": "{{ trigger.old }}->{{ trigger.value }}"}
            ],
        }
    }
    orch = await env.orchestrator(flows)
    counts = orch.workflows.engine.flows["night"].counts
    async with running_bus(env.config()) as bus:
        out, runs = Collector(), Collector()
        await bus.subscribe(f"mtor/{env.realm}/out/#", out)
        await bus.subscribe(f"mtor/{env.realm}/workflow/+/event", runs)
        await orch.state.set("mode", "day")  # None -> day: not to night
        await orch.state.set("mode", "night")  # day -> night: runs
        await orch.state.set("mode", "evening")  # night -> evening: no
        await orch.state.set("mode", "night")  # evening -> night: not from day
        await orch.state.set("mode", "day")
        # A change requested over MQTT, as any client would: day -> night runs again.
        await bus.publish(f"mtor/{env.realm}/state/mode/set/test", encode(StateSet(value="night")))
        await until(lambda: counts["done"] >= 2)
        await runs.wait_count(6)  # started, step, finished twice
        assert payloads(out, "/out/mode") == [b"day->night", b"day->night"]
        assert counts["triggered"] == 2
        assert {e.trigger for e in wf_events(runs) if e.kind == "finished"} == {"state"}


async def test_debounce_runs_once_with_the_last_trigger(env: Env) -> None:
    topic = f"test/{env.realm}/motion"
    flows = {
        "quiet": {
            "triggers": [{"type": "mqtt", "topic": topic}],
            "debounce": 0.3,
            "steps": [{"publish": "~/out/quiet", "payload": "{{ trigger.payload.n }}"}],
        }
    }
    orch = await env.orchestrator(flows)
    counts = orch.workflows.engine.flows["quiet"].counts
    async with running_bus(env.config()) as bus:
        out = Collector()
        await bus.subscribe(f"mtor/{env.realm}/out/#", out)
        for n in range(1, 6):
            await bus.publish(topic, json.dumps({"n": n}))
        await out.wait_for(lambda m: m.topic.endswith("/out/quiet"))
        assert (counts["triggered"], counts["debounced"], counts["started"]) == (5, 4, 1)
        await bus.publish(topic, json.dumps({"n": 6}))  # quiet since: a run of its own
        await out.wait_count(2)
        assert payloads(out, "/out/quiet") == [b"5", b"6"]
        assert counts["started"] == 2


async def test_step_retries_until_success_or_exhausted(env: Env) -> None:
    flows = {
        "flaky": {
            "steps": [
                {
                    "id": "s",
                    "task": "sleep",
                    "input": {"fail": "{{ state.flaky }}"},
                    "retries": 10,
                    "retry_delay": 0.2,
                }
            ]
        },
        "broken": {
            "steps": [
                {
                    "id": "s",
                    "task": "sleep",
                    "input": {"fail": "boom"},
                    "retries": 2,
                    "retry_delay": 0.01,
                }
            ]
        },
        "slow": {
            "steps": [{"id": "s", "task": "sleep", "input": {"seconds": 2}, "timeout": 0.1}],
            "timeout": 10,
        },
    }
    orch = await env.orchestrator(flows)
    await env.worker("w1")
    await wait_peers(orch, "sleep")
    await orch.state.set("flaky", "boom")

    async def failed_tasks() -> int:
        rows = await orch.store.history(100, user="workflows", capability="sleep")
        return sum(r["outcome"] == "failed" for r in rows)

    async with running_bus(env.config()) as bus:
        runs = Collector()
        await bus.subscribe(f"mtor/{env.realm}/workflow/+/event", runs)
        assert (await request(bus, env.realm, op="run", name="flaky")).ok
        async with asyncio.timeout(5):
            while await failed_tasks() < 1:  # the first attempt failed
                await asyncio.sleep(0.02)
        await orch.state.set("flaky", "")  # the next attempt renders fail: "" and succeeds
        m = await runs.wait_for(finished(runs, "flaky"))
        assert decode(m.payload, WorkflowEvent).status == "done"
        (step,) = [e for e in wf_events(runs, "flaky") if e.kind == "step"]
        failures = await failed_tasks()
        assert step.status == "done" and step.attempts == failures + 1 >= 2

        assert (await request(bus, env.realm, op="run", name="broken")).ok
        m = await runs.wait_for(finished(runs, "broken"))
        ev = decode(m.payload, WorkflowEvent)
        assert ev.status == "failed" and ev.error is not None and ev.error.code == "boom"
        (step,) = [e for e in wf_events(runs, "broken") if e.kind == "step"]
        assert step.attempts == 3
        assert await failed_tasks() == failures + 3

        assert (await request(bus, env.realm, op="run", name="slow")).ok
        m = await runs.wait_for(finished(runs, "slow"))
        ev = decode(m.payload, WorkflowEvent)
        assert ev.status == "failed" and ev.error is not None and ev.error.code == "timeout"
        assert ev.step == "s"


async def test_wait_event_match_raw_and_timeout(env: Env) -> None:
    raw_topic = f"test/{env.realm}/ack"
    flows = {
        "door": {
            "steps": [
                {"id": "w", "wait_event": "+/door/contact", "match": {"value": "open"}},
                {"id": "r", "wait_event": raw_topic, "raw": True, "match": {"payload.ok": True}},
                {
                    "publish": "~/out/door",
                    "payload": {
                        "node": "{{ steps.w.output.node }}",
                        "by": "{{ steps.r.output.payload.by }}",
                    },
                },
            ]
        },
        "late": {"steps": [{"id": "w", "wait_event": "+/door/bell", "timeout": 0.2}]},
    }
    orch = await env.orchestrator(flows)
    engine = orch.workflows.engine
    door_filter = f"mtor/{env.realm}/event/+/door/contact"
    async with running_bus(env.config()) as bus:
        out, runs = Collector(), Collector()
        await bus.subscribe(f"mtor/{env.realm}/out/#", out)
        await bus.subscribe(f"mtor/{env.realm}/workflow/+/event", runs)
        assert (await request(bus, env.realm, op="run", name="door")).ok
        await until(lambda: bool(engine._waiters.get(door_filter)))
        await event(bus, env.realm, "back", "door", "contact", value="closed")  # no match
        await event(bus, env.realm, "front", "door", "contact", value="open")
        await until(lambda: bool(engine._waiters.get(raw_topic)))
        await bus.publish(raw_topic, b'{"ok": false, "by": "x"}')  # no match
        await bus.publish(raw_topic, b'{"ok": true, "by": "ann"}')
        msg = await out.wait_for(lambda m: m.topic.endswith("/out/door"))
        assert json.loads(msg.payload) == {"node": "front", "by": "ann"}

        assert (await request(bus, env.realm, op="run", name="late")).ok
        m = await runs.wait_for(finished(runs, "late"))
        ev = decode(m.payload, WorkflowEvent)
        assert (ev.status, ev.step) == ("failed", "w")
        assert ev.error is not None and ev.error.code == "timeout"
        assert all(not w for w in engine._waiters.values())  # no waiter left behind


async def test_schedule_trigger_fires_repeatedly(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_mod, "SCHEDULE_SECOND", 0.05)
    flows = {
        "tick": {
            "triggers": [{"type": "schedule", "every": 2}],  # every 0.1 s here
            "steps": [
                {"publish": "~/out/tick", "payload": "{{ trigger.type }} {{ trigger.every }}"}
            ],
        }
    }
    async with running_bus(env.config()) as bus:
        out = Collector()
        await bus.subscribe(f"mtor/{env.realm}/out/#", out)
        t0 = time.monotonic()
        await env.orchestrator(flows)
        await out.wait_count(3)
        assert time.monotonic() - t0 >= 0.3  # not all at once: one per interval
        assert set(payloads(out, "/out/tick")) == {b"schedule 2.0"}


async def test_config_validate_names_the_bad_workflow_key(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    bad_step = {"parallel": [[{"publish": "~/x", "qos": 7}]]}
    path.write_text(
        yaml.safe_dump(
            {"realm": "x", "workflows": {"porch": {"steps": [{"task": "echo"}, bad_step]}}}
        )
    )
    code, out = await mtor("config", "validate", str(path))
    assert code == 78, out
    assert "workflows.porch.steps[1].parallel[0][0].qos" in out, out
    path.write_text(
        yaml.safe_dump({"realm": "x", "workflows": {"porch": {"steps": [{"task": "echo"}]}}})
    )
    code, out = await mtor("config", "validate", str(path))
    assert code == 0, out


async def test_local_schedule_workflow_keeps_publishes_while_the_broker_is_down(
    own_broker: PrivateBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_mod, "SCHEDULE_SECOND", 0.1)
    realm = "t" + uuid.uuid4().hex[:10]
    flows = {
        "beat": {
            "local": True,
            "triggers": [{"type": "schedule", "every": 1}],
            "steps": [
                {"id": "e", "task": "echo", "input": {"ts": "{{ trigger.ts }}"}},
                # Retained under the run id: seen by whoever subscribes after the broker is back.
                {
                    "publish": "~/out/beat/{{ run.id }}",
                    "payload": "{{ steps.e.output.ts }}",
                    "retain": True,
                },
            ],
        }
    }
    cfg = make_config(
        own_broker.url,
        realm,
        broker={"reconnect": {"initial_delay": 0.05, "max_delay": 0.2}},
        node_id="edge",
        nodes={"ref": {"type": "reference"}},
        workflows=flows,
    )
    daemon = NodeDaemon(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        await asyncio.wait_for(daemon._online.wait(), 10)
        assert daemon.workflows is not None
        engine = daemon.workflows.engine
        counts = engine.flows["beat"].counts
        await until(lambda: counts["done"] >= 1)
        own_broker.kill()
        await until(lambda: not daemon.bus.connected)
        t_down, done_before = time.time(), counts["done"]
        await until(lambda: counts["done"] >= done_before + 3)  # runs go on without a broker
        assert any("/out/beat/" in o.topic for o in daemon.bus._session.queued)
        t_up = time.time()
        offline = {r["run_id"] for r in engine.recent if t_down < r["started"] < t_up}
        assert len(offline) >= 2
        assert all(r["outcome"] == "done" for r in engine.recent)
        own_broker.start()
        await daemon.bus.wait_connected(10)
        async with running_bus(make_config(own_broker.url, realm)) as bus:
            got = Collector()
            prefix = f"mtor/{realm}/out/beat/"
            await bus.subscribe(prefix + "+", got)
            async with asyncio.timeout(10):
                while not offline <= {m.topic.removeprefix(prefix) for m in got.messages}:
                    await asyncio.sleep(0.02)
        for m in got.messages:
            if m.topic.removeprefix(prefix) in offline:
                assert t_down - 0.5 < float(m.payload) < t_up  # made while the broker was away
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
