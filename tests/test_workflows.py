"""Workflows end to end: a real broker, a real orchestrator and reference workers in process."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.broker import PrivateBroker
from daemon.bus import Bus
from daemon.config import Config
from daemon.messages import decode, encode
from daemon.orchestrator.service import Orchestrator
from daemon.protocol.node import Event
from daemon.protocol.workflow import WorkflowEvent, WorkflowReply, WorkflowRequest
from daemon.runtime import NodeDaemon
from tests.conftest import Collector, InProcess, make_config, mtor_env, running_bus

ALERT: dict[str, Any] = {
    "triggers": [{"type": "event", "topic": "+/vision/object", "match": {"attrs.label": "person"}}],
    "conditions": [{"state": "armed", "value": "armed_away"}],
    "steps": [
        {
            "parallel": [
                [{"id": "a", "task": "echo", "input": {"who": "{{ trigger.attrs.label }}"}}],
                [{"id": "b", "task": "sleep", "input": {"seconds": 0.05}}],
            ]
        },
        {
            "publish": "~/out/alert",
            "payload": {
                "who": "{{ steps.a.output.who }}",
                "slept": "{{ steps.b.output.slept }}",
                "cam": "{{ trigger.node }}",
            },
        },
        {"set_state": "last_alert", "value": "{{ trigger.node }}"},
    ],
}
FAILS: dict[str, Any] = {
    "triggers": [{"type": "manual"}],
    "steps": [
        {"id": "s1", "task": "sleep", "input": {"fail": "boom"}},
        {"publish": "~/out/never"},
    ],
}
CONTINUES: dict[str, Any] = {
    "steps": [
        {"id": "s1", "task": "sleep", "input": {"fail": "boom"}, "continue_on_error": True},
        {"publish": "~/out/cont", "payload": "{{ steps.s1.error.code }}"},
    ],
}


class Env(InProcess):
    def __init__(self, broker: PrivateBroker, realm: str, tmp: Path) -> None:
        self.broker = broker
        self.realm = realm
        self.tmp = tmp
        super().__init__()

    def config(self, workflows: dict[str, Any] | None = None, **extra: Any) -> Config:
        return make_config(
            self.broker.url,
            self.realm,
            orchestrator={"state_dir": str(self.tmp / "orch")},
            workflows=workflows or {},
            **extra,
        )

    async def orchestrator(self, workflows: dict[str, Any]) -> Orchestrator:
        orch = Orchestrator(self.config(workflows))
        self._run(orch.run)
        await asyncio.wait_for(orch._online.wait(), 10)
        return orch

    async def worker(
        self, node_id: str, workflows: dict[str, Any] | None = None, **ref: Any
    ) -> NodeDaemon:
        cfg = self.config(workflows, node_id=node_id, nodes={"ref": {"type": "reference", **ref}})
        daemon = NodeDaemon(cfg)
        self._run(daemon.run)
        await asyncio.wait_for(daemon._online.wait(), 10)
        return daemon


@pytest.fixture
async def env(broker: PrivateBroker, realm: str, tmp_path: Path) -> AsyncIterator[Env]:
    e = Env(broker, realm, tmp_path)
    try:
        yield e
    finally:
        await e.close()


async def wait_peers(orch: Orchestrator, capability: str) -> None:
    async with asyncio.timeout(10):
        while not orch.registry.capable_online(capability):
            await asyncio.sleep(0.01)


async def event(bus: Bus, realm: str, node: str, domain: str, name: str, **kw: Any) -> None:
    await bus.publish(f"mtor/{realm}/event/{node}/{domain}/{name}", Event(**kw))


def wf_events(got: Collector, name: str | None = None) -> list[WorkflowEvent]:
    out = [decode(m.payload, WorkflowEvent) for m in got.messages]
    return [e for e in out if name is None or e.workflow == name]


async def request(bus: Bus, realm: str, account: str = "test", **fields: Any) -> WorkflowReply:
    reply_topic = f"mtor/{realm}/reply/{account}/{uuid.uuid4().hex[:6]}/wf"
    got = Collector()
    await bus.subscribe(reply_topic, got)
    await bus.publish(
        f"mtor/{realm}/workflows/request/{account}",
        encode(WorkflowRequest(**fields)),
        response_topic=reply_topic,
        correlation_data=b"1",
    )
    msg = await got.wait_for(lambda m: True, timeout=5)
    return decode(msg.payload, WorkflowReply)


def finished(got: Collector, name: str) -> Any:
    return lambda m: (
        (e := decode(m.payload, WorkflowEvent)).workflow == name and e.kind == "finished"
    )


async def test_event_condition_parallel_tasks_publish_and_history(env: Env) -> None:
    orch = await env.orchestrator({"alert": ALERT, "fails": FAILS, "cont": CONTINUES})
    await env.worker("w1")
    await wait_peers(orch, "sleep")
    r = env.realm
    async with running_bus(env.config()) as bus:
        out, runs = Collector(), Collector()
        await bus.subscribe(f"mtor/{r}/out/#", out)
        await bus.subscribe(f"mtor/{r}/workflow/+/event", runs)

        # Disarmed: the condition is false, nothing runs.
        await orch.state.set("armed", "disarmed")
        await event(bus, r, "porch", "vision", "object", attrs={"label": "person"})
        flow = orch.workflows.engine.flows["alert"]
        async with asyncio.timeout(5):
            while flow.counts["conditions_false"] < 1:
                await asyncio.sleep(0.01)

        await orch.state.set("armed", "armed_away")
        await event(bus, r, "porch", "vision", "object", attrs={"label": "cat"})  # no match
        await event(bus, r, "porch", "vision", "object", attrs={"label": "person"})
        msg = await out.wait_for(lambda m: m.topic.endswith("/out/alert"))
        assert json.loads(msg.payload) == {"who": "person", "slept": 0.05, "cam": "porch"}
        done = await runs.wait_for(finished(runs, "alert"))
        ev = decode(done.payload, WorkflowEvent)
        assert ev.status == "done" and ev.trigger == "event"
        assert orch.state.get("last_alert") == "porch"
        assert flow.counts["triggered"] == 2  # the cat never matched the trigger
        kinds = [(e.kind, e.step) for e in wf_events(runs, "alert")]
        assert kinds[0] == ("started", None)
        assert {("step", "a"), ("step", "b")} <= set(kinds)
        assert kinds[-1][0] == "finished"

        # A failing step fails the run with its error; continue_on_error goes on.
        reply = await request(bus, r, op="run", name="fails")
        assert reply.ok
        run_id = reply.result["run_id"]
        m = await runs.wait_for(finished(runs, "fails"))
        ev = decode(m.payload, WorkflowEvent)
        assert (ev.run_id, ev.status, ev.step) == (run_id, "failed", "s1")
        assert ev.error is not None and ev.error.code == "boom"
        reply = await request(bus, r, op="run", name="cont", input={"x": 1})
        assert reply.ok
        m = await out.wait_for(lambda m: m.topic.endswith("/out/cont"))
        assert m.payload == b"boom"
        m = await runs.wait_for(finished(runs, "cont"))
        assert decode(m.payload, WorkflowEvent).status == "done"
        assert not any(m.topic.endswith("/out/never") for m in out.messages)

        unknown = await request(bus, r, op="run", name="nope")
        assert not unknown.ok and unknown.code == "not_found"

        hist = await request(bus, r, op="history", limit=10)
        assert hist.ok
        by_name = {row["workflow"]: row for row in hist.result}
        assert by_name["alert"]["outcome"] == "done"
        assert [s["id"] for s in by_name["alert"]["steps"]][-1] == "steps[2]"
        assert {s["id"] for s in by_name["alert"]["steps"]} >= {"a", "b"}
        assert by_name["fails"]["outcome"] == "failed"
        assert by_name["fails"]["error_code"] == "boom"
        assert by_name["cont"]["outcome"] == "done"


async def test_concurrency_limit_and_cooldown(env: Env) -> None:
    flows = {
        "slow": {
            "triggers": [{"type": "mqtt", "topic": f"test/{env.realm}/slow"}],
            "max_concurrent": 1,
            "steps": [{"task": "sleep", "input": {"seconds": 0.5}}],
        },
        "queued": {
            "triggers": [{"type": "mqtt", "topic": f"test/{env.realm}/queued"}],
            "max_concurrent": 1,
            "overflow": "queue",
            "queue_size": 1,
            "steps": [{"task": "sleep", "input": {"seconds": 0.3}}],
        },
        "cool": {
            "triggers": [
                {"type": "mqtt", "topic": f"test/{env.realm}/cool", "match": {"payload.go": True}}
            ],
            "cooldown": 60,
            "steps": [{"publish": "~/out/cool", "payload": "{{ trigger.payload.n }}"}],
        },
    }
    orch = await env.orchestrator(flows)
    await env.worker("w1")
    await wait_peers(orch, "sleep")
    engine = orch.workflows.engine
    async with running_bus(env.config()) as bus:
        runs, out = Collector(), Collector()
        await bus.subscribe(f"mtor/{env.realm}/workflow/+/event", runs)
        await bus.subscribe(f"mtor/{env.realm}/out/#", out)
        for _ in range(3):
            await bus.publish(f"test/{env.realm}/slow", b"{}")
            await bus.publish(f"test/{env.realm}/queued", b"{}")
        await runs.wait_for(finished(runs, "slow"))
        async with asyncio.timeout(5):
            while engine.flows["queued"].counts["done"] < 2:
                await asyncio.sleep(0.02)
        slow = engine.flows["slow"].counts
        assert (slow["started"], slow["max_concurrent"]) == (1, 2)
        queued = engine.flows["queued"].counts
        assert (queued["started"], queued["queued"], queued["queue_full"]) == (2, 1, 1)
        skipped = [e for e in wf_events(runs, "slow") if e.kind == "skipped"]
        assert [e.reason for e in skipped] == ["max_concurrent", "max_concurrent"]

        await bus.publish(f"test/{env.realm}/cool", b'{"go": false, "n": 0}')  # no match
        for n in (1, 2, 3):
            await bus.publish(f"test/{env.realm}/cool", json.dumps({"go": True, "n": n}))
        async with asyncio.timeout(5):
            while engine.flows["cool"].counts["cooldown"] < 2:
                await asyncio.sleep(0.02)
        await runs.wait_for(finished(runs, "cool"))
        assert [m.payload for m in out.messages if m.topic.endswith("/out/cool")] == [b"1"]
        assert engine.flows["cool"].counts["started"] == 1


async def test_local_workflow_runs_without_the_orchestrator(env: Env) -> None:
    local = {
        "hot": {
            "local": True,
            "triggers": [{"type": "event", "topic": "+/sensor/temp"}],
            "conditions": [{"field": "trigger.value", "op": ">", "value": 30}],
            "steps": [
                {"id": "e", "task": "echo", "input": {"t": "{{ trigger.value }}"}},
                {"publish": "~/out/hot", "payload": {"t": "{{ steps.e.output.t }}"}},
            ],
        },
    }
    # No orchestrator at all: the node daemon runs its local workflow by itself.
    daemon = await env.worker("w1", workflows=local)
    assert daemon.workflows is not None
    async with running_bus(env.config()) as bus:
        out = Collector()
        await bus.subscribe(f"mtor/{env.realm}/out/#", out)
        await event(bus, env.realm, "w1", "sensor", "temp", value=20)
        await event(bus, env.realm, "w1", "sensor", "temp", value=35)
        msg = await out.wait_for(lambda m: m.topic.endswith("/out/hot"))
        assert json.loads(msg.payload) == {"t": 35}
        assert len(out.messages) == 1
        # A manual run comes from the orchestrator (which checks who asked): as it
        # hands one on, the node runs it with the run id it was given.
        runs = Collector()
        await bus.subscribe(f"mtor/{env.realm}/workflow/hot/event", runs)
        handed = WorkflowRequest(op="run", name="hot", run_id="r-by-orch", user="ann")
        await bus.publish(f"mtor/{env.realm}/workflows/request/orchestrator", encode(handed))
        ev = await runs.wait_for(lambda m: b"r-by-orch" in m.payload, timeout=10)
        assert decode(ev.payload, WorkflowEvent).where == "w1"


async def test_local_runs_land_in_the_orchestrator_history(env: Env) -> None:
    local = {
        "tick": {
            "local": True,
            "steps": [
                {"id": "e", "task": "echo", "input": 1},
                {"id": "boom", "task": "sleep", "input": {"fail": "boom"}},
            ],
        }
    }
    await env.orchestrator({})
    await env.worker("w1", workflows=local)
    async with running_bus(env.config()) as bus:
        runs = Collector()
        await bus.subscribe(f"mtor/{env.realm}/workflow/tick/event", runs)
        started = await request(bus, env.realm, op="run", name="tick")  # handed on to w1
        assert started.ok, started
        await runs.wait_for(finished(runs, "tick"), timeout=10)
        async with asyncio.timeout(10):
            while not (history := await request(bus, env.realm, op="history", name="tick")).result:
                await asyncio.sleep(0.05)
    (row,) = history.result
    assert row["run_id"] == started.result["run_id"]
    assert (row["where"], row["outcome"], row["error_code"]) == ("w1", "failed", "boom")
    steps = row["steps"] if isinstance(row["steps"], list) else json.loads(row["steps"])
    assert [(s["id"], s["status"]) for s in steps] == [("e", "done"), ("boom", "failed")]
    assert row["duration_ms"] > 0


async def mtor(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "daemon.cli.main",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=mtor_env(),
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode()


async def test_cli_validate_run_wait_and_history(env: Env, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"w": {"steps": [{"task": "echo", "input": "{{ lipsum }}"}]}}))
    code, out = await mtor("workflows", "validate", str(bad))
    assert code == 78 and "w.steps[0]" in out and "lipsum" in out, out
    orch = await env.orchestrator({"cont": CONTINUES})
    await env.worker("w1")
    await wait_peers(orch, "sleep")
    realm = ["--broker", env.broker.url, "--realm", env.realm]
    code, out = await mtor(*realm, "workflows", "run", "cont", "--wait")
    assert code == 0 and "done in" in out, out
    code, out = await mtor(*realm, "workflows", "history", "cont", "--json")
    assert code == 0, out
    assert json.loads(out)[0]["outcome"] == "done"


async def test_requests_are_identified_like_submissions(
    broker: PrivateBroker, realm: str, tmp_path: Path, env: Env
) -> None:
    """With require_token, a run without a token is refused; a guest may list but not
    start; a user with a token starts it; a banned user is refused."""
    config = make_config(
        broker.url,
        realm,
        orchestrator={"state_dir": str(tmp_path / "orch"), "require_token": True},
        workflows={"hello": {"steps": [{"publish": "~/out/hello", "payload": "hi"}]}},
    )
    orch = Orchestrator(config)
    env._run(orch.run)
    await asyncio.wait_for(orch._online.wait(), 10)
    guest = await orch.users.add("visitor", "guest")
    user = await orch.users.add("alice", "user")
    async with running_bus(config) as bus:
        refused = await request(bus, realm, op="run", name="hello")
        assert (refused.ok, refused.code) == (False, "unauthorized"), refused
        listed = await request(bus, realm, op="list", token=guest)
        assert listed.ok, listed
        forbidden = await request(bus, realm, op="run", name="hello", token=guest)
        assert (forbidden.ok, forbidden.code) == (False, "forbidden"), forbidden
        started = await request(bus, realm, op="run", name="hello", token=user)
        assert started.ok and started.result["workflow"] == "hello", started
        await orch.users.set_ban("alice", True, "testing")
        banned = await request(bus, realm, op="run", name="hello", token=user)
        assert (banned.ok, banned.code) == (False, "banned"), banned
