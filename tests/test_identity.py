"""Identity from the broker, as the orchestrator applies it (issue 13, items 2-4, 7).

The orchestrator runs with an accounts file, so it takes the last level of each
request topic as the MQTT username the broker authenticated.  These tests drive
it on a plain broker by publishing on those topics directly, as each account
could under the generated ACL (tests/test_broker_provision.py checks that the
broker lets each account write only as itself).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from daemon.accounts import Accounts
from daemon.bus import Bus
from daemon.messages import decode
from daemon.orchestrator.service import Orchestrator
from daemon.protocol.admin import AdminReply, AdminRequest
from daemon.protocol.node import Capability, Hardware, NodeInfo, NodeState
from daemon.protocol.state import StateReply, StateSet
from daemon.protocol.task import TaskAssign, TaskSubmit, TaskUpdate, WorkerReport
from tests.conftest import Collector, InProcess, make_config, running_bus

ACCOUNTS = {
    "ann": "user",
    "gus": "guest",
    "ops": "sysop",
    "ha": "homeassistant",
    "kitchen": "node",
    "porch": "node",
    "rogue": "node",
    "orchestrator": "orchestrator",
}


class Env(InProcess):
    def __init__(self, url: str, realm: str, tmp: Path) -> None:
        super().__init__()
        self.url, self.realm, self.tmp = url, realm, tmp
        accounts = Accounts(tmp / "accounts.json", realm)
        for name, role in ACCOUNTS.items():
            accounts.add(name, role)  # type: ignore[arg-type]
        (tmp / "alarm.code").write_text("1234\n")
        self.orch_cfg = {
            "state_dir": str(tmp / "orch"),
            "accounts_file": str(tmp / "accounts.json"),
            "offers": {"porch": ["vision.*"]},
            "alarm_code_file": str(tmp / "alarm.code"),
        }
        self.orch: Orchestrator | None = None

    def t(self, rest: str) -> str:
        return f"mtor/{self.realm}/{rest}"

    async def start(self) -> Orchestrator:
        config = make_config(
            self.url, self.realm, orchestrator=self.orch_cfg, homeassistant={"account": "ha"}
        )
        self.orch = Orchestrator(config)
        self._run(self.orch.run)
        await asyncio.wait_for(self.orch._online.wait(), 10)
        return self.orch


@pytest.fixture
async def env(broker: Any, realm: str, tmp_path: Path) -> AsyncIterator[Env]:
    e = Env(broker.url, realm, tmp_path)
    try:
        yield e
    finally:
        await e.close()


def advert(node_id: str, caps: list[str], boot: str = "b1") -> NodeInfo:
    return NodeInfo(
        node_id=node_id,
        boot_id=boot,
        version="t",
        hostname=node_id,
        hardware=Hardware(arch="x86_64", cpu_count=2, ram_mb=1024),
        capabilities=[Capability(name=c, node="n", max_concurrency=2) for c in caps],
    )


async def announce(bus: Bus, env: Env, node_id: str, caps: list[str]) -> None:
    await bus.publish(
        env.t(f"node/{node_id}/state"), NodeState(state="online", boot_id="b1"), retain=True
    )
    await bus.publish(env.t(f"node/{node_id}/info"), advert(node_id, caps), retain=True)


async def ask(bus: Bus, env: Env, account: str, request_topic: str, msg: Any) -> bytes:
    """Publish ``msg`` on ``request_topic`` as ``account`` would, with a response topic in
    its own reply space; the first answer's payload."""
    got = Collector()
    topic = env.t(f"reply/{account}/{uuid.uuid4().hex[:8]}")
    await bus.subscribe(topic, got)
    await bus.publish(env.t(request_topic), msg, response_topic=topic)
    return (await got.wait_count(1, timeout=10))[0].payload


async def settle(bus: Bus, env: Env) -> None:
    """Round trip through the orchestrator: everything published before is handled."""
    await ask(bus, env, "ops", "orchestrator/admin/ops", AdminRequest(op="peers"))


async def test_offers_follow_the_account_and_config(env: Env) -> None:
    orch = await env.start()
    async with running_bus(orch.config) as bus:
        await announce(bus, env, "kitchen", ["echo", "chat"])
        await announce(bus, env, "ann", ["chat"])  # a person's account: never a peer
        await announce(bus, env, "porch", ["vision.detect", "chat"])  # may offer vision.* only
        await announce(bus, env, "stranger", ["chat"])  # no such account
        await settle(bus, env)
    assert orch.registry.index.get("chat") == {"kitchen"}
    assert orch.registry.index.get("vision.detect") == {"porch"}


async def test_only_the_assigned_node_and_attempt_finish_a_task(env: Env) -> None:
    orch = await env.start()
    async with running_bus(orch.config) as bus:
        assigned = Collector()
        await bus.subscribe(env.t("node/kitchen/task"), assigned)
        await announce(bus, env, "kitchen", ["echo"])
        await announce(bus, env, "rogue", [])
        await settle(bus, env)
        replies = Collector()
        reply = env.t("reply/ann/r1")
        await bus.subscribe(reply, replies)
        await bus.publish(
            env.t("task/submit/ann"),
            TaskSubmit(capability="echo", input=1, progress=True),
            response_topic=reply,
        )
        msg = await assigned.wait_for(lambda m: True)
        job = decode(msg.payload, TaskAssign)
        assert job.user == "ann"
        # Ids are not a counter: nobody guesses the next one.
        assert len(job.task_id) >= 16
        forged = WorkerReport(task_id=job.task_id, attempt=job.attempt, status="done", output=666)
        stale = WorkerReport(task_id=job.task_id, attempt=job.attempt + 1, status="done", output=7)
        await bus.publish(env.t("task/worker/rogue"), forged)  # another node
        await bus.publish(env.t("task/worker/kitchen"), stale)  # not the attempt assigned
        await settle(bus, env)
        assert job.task_id in orch.tasks  # still waiting for the real worker
        real = WorkerReport(task_id=job.task_id, attempt=job.attempt, status="done", output=1)
        await bus.publish(env.t("task/worker/kitchen"), real)
        final = await replies.wait_for(lambda m: decode(m.payload, TaskUpdate).status == "done")
        assert decode(final.payload, TaskUpdate).output == 1
        assert all(decode(m.payload, TaskUpdate).output != 666 for m in replies.messages)


async def test_replies_only_inside_the_requesters_space(env: Env) -> None:
    orch = await env.start()
    async with running_bus(orch.config) as bus:
        await announce(bus, env, "kitchen", ["echo"])
        await settle(bus, env)
        theirs, mine = Collector(), Collector()
        await bus.subscribe(env.t("reply/ops/#"), theirs)
        await bus.subscribe(env.t("node/kitchen/task"), mine)
        # ann asks the orchestrator to write into someone else's topics: nothing is sent.
        for target in ("reply/ops/x", "node/kitchen/task", "state/armed"):
            await bus.publish(
                env.t("task/submit/ann"),
                TaskSubmit(capability="echo", input="x"),
                response_topic=env.t(target),
            )
        await settle(bus, env)
        assert not [m for m in theirs.messages if m.topic == env.t("reply/ops/x")]
        assert not mine.messages  # and no task was queued for them
        assert not orch.tasks


async def test_unknown_accounts_and_retained_requests_are_refused(env: Env) -> None:
    orch = await env.start()
    async with running_bus(orch.config) as bus:
        await announce(bus, env, "kitchen", ["echo"])
        await settle(bus, env)
        got = Collector()
        await bus.subscribe(env.t("reply/+/#"), got)
        await bus.publish(
            env.t("task/submit/nobody"),
            TaskSubmit(capability="echo", input=1),
            response_topic=env.t("reply/nobody/x"),
        )
        m = await got.wait_for(lambda m: m.topic == env.t("reply/nobody/x"))
        update = decode(m.payload, TaskUpdate)
        assert update.status == "failed" and update.error is not None
        assert update.error.code == "unauthorized"
        # A retained submission would be served again at every restart: never served.
        await bus.publish(
            env.t("task/submit/ann"),
            TaskSubmit(capability="echo", input=2),
            response_topic=env.t("reply/ann/y"),
            retain=True,
        )
        await settle(bus, env)
        assert not [m for m in got.messages if m.topic == env.t("reply/ann/y")]
        await bus.publish(env.t("task/submit/ann"), b"", retain=True)  # clear it


async def state_set(
    bus: Bus, env: Env, account: str, value: str, code: str | None = None
) -> StateReply:
    req = StateSet(value=value, by="ops", code=code)  # 'by' is a claim: ignored
    return decode(await ask(bus, env, account, f"state/armed/set/{account}", req), StateReply)


async def test_the_alarm_has_owners_and_a_code(env: Env) -> None:
    orch = await env.start()
    async with running_bus(orch.config) as bus:
        for who in ("gus", "kitchen"):  # a guest, a node: never
            reply = await state_set(bus, env, who, "armed_away")
            assert not reply.ok and reply.error is not None and reply.error.code == "forbidden"
        assert (await state_set(bus, env, "ann", "armed_away")).ok
        assert orch.state.values["armed"].by == "ann"
        refused = await state_set(bus, env, "ha", "disarmed", code="0000")
        assert refused.error is not None and refused.error.code == "bad_code"
        assert (await state_set(bus, env, "ha", "disarmed", code="1234")).ok
        assert orch.state.get("armed") == "disarmed"
        # The panel Home Assistant gets asks for the code and writes under its account.
        configs = Collector()
        await bus.subscribe("homeassistant/alarm_control_panel/#", configs)
        m = await configs.wait_for(lambda m: env.realm in m.topic and bool(m.payload))
        panel = json.loads(m.payload)
        assert panel["code"] == "REMOTE_CODE" and panel["code_disarm_required"] is True
        assert panel["command_topic"] == env.t("state/armed/set/ha")


async def admin(bus: Bus, env: Env, account: str, op: str, **args: Any) -> AdminReply:
    req = AdminRequest(op=op, args=args, token="ignored", user="ops")  # claims: ignored
    return decode(await ask(bus, env, account, f"orchestrator/admin/{account}", req), AdminReply)


async def test_admin_rights_follow_the_account(env: Env) -> None:
    orch = await env.start()
    async with running_bus(orch.config) as bus:
        await announce(bus, env, "kitchen", ["sleep"])
        await settle(bus, env)
        for account in ("ann", "kitchen", "ha"):
            reply = await admin(bus, env, account, "ban", name="gus")
            assert not reply.ok and reply.code == "forbidden", account
        assert not (await admin(bus, env, "gus", "tasks")).ok
        # ann's task list holds only ann's tasks; the sysop account sees all.
        for who in ("ann", "kitchen"):
            await bus.publish(
                env.t(f"task/submit/{who}"),
                TaskSubmit(capability="sleep", input={"seconds": 5}, token="secret-never-kept"),
            )
        async with asyncio.timeout(10):
            while len(orch.tasks) < 2:
                await asyncio.sleep(0.01)
        mine = await admin(bus, env, "ann", "tasks")
        assert mine.ok and {t["user"] for t in mine.result} == {"ann"}
        every = await admin(bus, env, "ops", "tasks")
        assert every.ok and {t["user"] for t in every.result} == {"ann", "kitchen"}
        assert (await admin(bus, env, "ops", "ban", name="gus")).ok
    # Tokens are never journalled, and the databases are the daemon's alone.
    await asyncio.sleep(0.2)  # the journal is flushed every 50 ms
    state_dir = Path(env.orch_cfg["state_dir"])
    for path in state_dir.glob("*"):
        if path.is_file():
            assert b"secret-never-kept" not in path.read_bytes(), path
    history = state_dir / "history.sqlite3"
    assert stat.S_IMODE(os.stat(history).st_mode) & 0o077 == 0


async def test_odd_account_levels_are_refused_without_a_traceback(env: Env) -> None:
    orch = await env.start()
    odd = "x" * 200  # a legal topic level, but no account an ACL could hold
    async with running_bus(orch.config) as bus:
        got = Collector()
        topic = env.t(f"reply/{odd}/r")
        await bus.subscribe(topic, got)
        await bus.publish(
            env.t(f"state/armed/set/{odd}"), StateSet(value="armed_away"), response_topic=topic
        )
        await bus.publish(
            env.t(f"task/submit/{odd}"), TaskSubmit(capability="echo"), response_topic=topic
        )
        replies = await got.wait_count(2, timeout=10)
    codes = set()
    for m in replies:
        if b'"state.reply"' in m.payload:
            err = decode(m.payload, StateReply).error
        else:
            err = decode(m.payload, TaskUpdate).error
        assert err is not None
        codes.add(err.code)
    assert codes == {"bad_request"}
    assert orch.bus.handler_errors == 0
    assert orch.state.get("armed") is None


async def test_remembered_finals_are_bounded_in_bytes(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from daemon.orchestrator import finals

    monkeypatch.setattr(finals, "FINISHED_MAX_BYTES", 250_000)
    orch = await env.start()
    async with running_bus(orch.config) as bus:
        assigned = Collector()
        await bus.subscribe(env.t("node/kitchen/task"), assigned)
        await announce(bus, env, "kitchen", ["echo"])
        await settle(bus, env)
        big = "x" * 100_000
        for i in range(5):
            await bus.publish(env.t("task/submit/ann"), TaskSubmit(capability="echo", input=i))
            msg = await assigned.wait_for(lambda m, i=i: decode(m.payload, TaskAssign).input == i)
            job = decode(msg.payload, TaskAssign)
            done = WorkerReport(task_id=job.task_id, attempt=job.attempt, status="done", output=big)
            await bus.publish(env.t("task/worker/kitchen"), done)
        async with asyncio.timeout(10):
            while orch.tasks:
                await asyncio.sleep(0.01)
    assert len(orch.core.finals) == 2  # 5 x 100 kB against a 250 kB budget
    assert orch.core.finals.bytes <= 250_000


async def test_direct_finals_count_only_with_the_submitters_reply_key(env: Env) -> None:
    from daemon.client import RealmClient

    orch = await env.start()
    async with running_bus(orch.config) as bus:
        assigned = Collector()
        await bus.subscribe(env.t("node/kitchen/task"), assigned)
        await announce(bus, env, "kitchen", ["echo"])
        await settle(bus, env)
        client = RealmClient(bus, env.realm, account="ann")
        await client.start()
        handle = await client.submit("echo", 1)  # direct: the worker may answer itself
        job = decode((await assigned.wait_for(lambda m: True)).payload, TaskAssign)
        # Only the assigned worker learns where and with which key.
        assert job.reply is not None and job.reply.topic == client.direct_topic
        assert job.reply.key == handle.submit.reply_key
        corr = job.task_id.encode()
        forged = TaskUpdate(task_id=job.task_id, status="done", output=666, seq=1, key="x" * 32)
        await bus.publish(client.direct_topic, forged, correlation_data=corr)
        unkeyed = TaskUpdate(task_id=job.task_id, status="done", output=667, seq=1)
        await bus.publish(client.direct_topic, unkeyed, correlation_data=corr)
        async with asyncio.timeout(10):
            while client.forged < 2:
                await asyncio.sleep(0.01)
        assert handle.final is None and not handle._final.done()
        genuine = TaskUpdate(task_id=job.task_id, status="done", output=1, seq=1, key=job.reply.key)
        await bus.publish(client.direct_topic, genuine, correlation_data=corr)
        assert await asyncio.wait_for(handle.result(), 10) == 1
