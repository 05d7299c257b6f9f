"""The orchestrator with real workers on a real broker (in-process daemons)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from daemon.broker import PrivateBroker
from daemon.bus import Bus
from daemon.client import RealmClient, TaskFailed
from daemon.config import Config
from daemon.messages import decode
from daemon.orchestrator.service import Orchestrator
from daemon.protocol.task import Constraints, TaskUpdate
from daemon.runtime import NodeDaemon
from tests.conftest import (
    Collector,
    InProcess,
    make_config,
    mtor_env,
    running_bus,
    write_config,
)


class Realm(InProcess):
    def __init__(self, broker: PrivateBroker, realm: str, tmp: Path, **orch: Any) -> None:
        self.broker = broker
        self.realm = realm
        self.tmp = tmp
        self.orch_cfg = {"state_dir": str(tmp / "orch"), **orch}
        super().__init__()
        self.orchestrator: Orchestrator | None = None
        self.workers: dict[str, NodeDaemon] = {}

    def config(self, **extra: Any) -> Config:
        return make_config(self.broker.url, self.realm, orchestrator=self.orch_cfg, **extra)

    async def start_orchestrator(self) -> Orchestrator:
        self.orchestrator = Orchestrator(self.config())
        self._run(self.orchestrator.run)
        await asyncio.wait_for(self.orchestrator._online.wait(), 10)
        return self.orchestrator

    async def start_worker(self, node_id: str, **ref: Any) -> NodeDaemon:
        cfg = self.config(node_id=node_id, nodes={"ref": {"type": "reference", **ref}})
        daemon = NodeDaemon(cfg)
        self._run(daemon.run)
        await asyncio.wait_for(daemon._online.wait(), 10)
        self.workers[node_id] = daemon
        return daemon

    async def wait_peers(self, capability: str, n: int) -> None:
        assert self.orchestrator is not None
        async with asyncio.timeout(10):
            while len(self.orchestrator.registry.free.get(capability, ())) < n:
                await asyncio.sleep(0.01)


@pytest.fixture
async def realm_env(broker: PrivateBroker, realm: str, tmp_path: Path) -> AsyncIterator[Realm]:
    env = Realm(broker, realm, tmp_path)
    try:
        yield env
    finally:
        await env.close()


@contextlib.asynccontextmanager
async def client(
    env: Realm, user: str | None = None, token: str | None = None
) -> AsyncIterator[RealmClient]:
    async with running_bus(env.config()) as bus:
        c = RealmClient(bus, env.realm, user=user, token=token)
        await c.start()
        yield c


async def updates_of(handle: Any) -> list[TaskUpdate]:
    out = []
    async with asyncio.timeout(15):
        async for u in handle:
            out.append(u)
    return out


async def test_echo_progress_and_one_final(realm_env: Realm) -> None:
    await realm_env.start_orchestrator()
    await realm_env.start_worker("w1")
    await realm_env.wait_peers("echo", 1)
    async with client(realm_env) as c:
        assert await asyncio.wait_for(c.call("echo", {"x": [1, 2]}), 10) == {"x": [1, 2]}
        h = await c.submit("sleep", {"seconds": 0.3, "steps": 3}, progress=True)
        ups = await updates_of(h)
    statuses = [u.status for u in ups]
    assert statuses[0] == "queued"
    assert statuses[1] == "assigned"
    assert "started" in statuses
    assert [u.output for u in ups if u.status == "partial"] == [
        {"step": 1},
        {"step": 2},
        {"step": 3},
    ]
    assert statuses[-1] == "done" and statuses.count("done") == 1
    assert statuses.index("started") < statuses.index("partial")
    assert [u.seq for u in ups] == sorted(u.seq for u in ups)
    assert ups[-1].output == {"slept": 0.3, "node": "w1"}


async def test_bad_submissions_get_error_replies(realm_env: Realm) -> None:
    orch = await realm_env.start_orchestrator()
    await realm_env.start_worker("w1")
    await realm_env.wait_peers("echo", 1)
    cfg = realm_env.config()
    submit = f"mtor/{realm_env.realm}/task/submit/raw"
    reply = f"mtor/{realm_env.realm}/reply/raw/x"
    async with running_bus(cfg) as bus:
        got = Collector()
        await bus.subscribe(reply, got)
        cases = {
            b"not json": "bad_request",
            b'{"capability": 5}': "bad_request",
            b'{"capability":"echo","priority":"urgent"}': "bad_request",
            b'{"capability":"echo","surprise":true}': "bad_request",
            b'{"capability":"echo","v":7}': "unsupported_version",
            b'{"capability":"no.such"}': "unavailable",
            b'{"capability":"echo","token":"forged"}': "unauthorized",
            b"{" + b'"capability":"echo","input":"' + b"x" * (1 << 21) + b'"}': "too_large",
        }
        for i, payload in enumerate(cases):
            await bus.publish(
                submit, payload, response_topic=reply, correlation_data=str(i).encode()
            )
        await got.wait_count(len(cases), timeout=10)
        codes = {}
        for m in got.messages:
            u = decode(m.payload, TaskUpdate)
            assert u.status == "failed"
            assert u.error is not None
            codes[int(m.correlation_data.decode())] = u.error.code
        assert codes == dict(enumerate(cases.values()))
        # MQTT 3.1.1 style: reply topic and correlation in the payload.
        legacy = json.dumps(
            {"capability": "echo", "input": 7, "reply_to": reply, "correlation": "c-311"}
        ).encode()
        await bus.publish(submit, legacy)
        m = await got.wait_for(lambda m: b"c-311" in m.payload, timeout=10)
        assert decode(m.payload, TaskUpdate).output == 7
    assert orch.bus.connected
    async with client(realm_env) as c:
        assert await asyncio.wait_for(c.call("echo", "still alive"), 10) == "still alive"


async def test_cancel_reaches_worker(realm_env: Realm) -> None:
    await realm_env.start_orchestrator()
    w = await realm_env.start_worker("w1")
    await realm_env.wait_peers("sleep", 1)
    async with client(realm_env, user="ann") as c:
        h = await c.submit("sleep", {"seconds": 30}, progress=True)
        async with asyncio.timeout(10):
            async for u in h:
                if u.status == "started":
                    break
        assert w.worker.active == 1
        await h.cancel()
        with pytest.raises(TaskFailed) as info:
            await asyncio.wait_for(h.result(), 10)
        assert info.value.code == "cancelled"
        async with asyncio.timeout(5):
            while w.worker.active:
                await asyncio.sleep(0.01)


async def test_deadline_fails_fast(realm_env: Realm) -> None:
    await realm_env.start_orchestrator()
    await realm_env.start_worker("w1")
    await realm_env.wait_peers("sleep", 1)
    async with client(realm_env) as c:
        with pytest.raises(TaskFailed) as info:
            await asyncio.wait_for(c.call("sleep", {"seconds": 20}, timeout=0.5), 10)
        assert info.value.code == "timeout"


async def test_idempotent_resubmission_runs_once(realm_env: Realm) -> None:
    orch = await realm_env.start_orchestrator()
    await realm_env.start_worker("w1")
    await realm_env.wait_peers("sleep", 1)
    async with client(realm_env, user="ann") as c:
        h1 = await c.submit("sleep", {"seconds": 0.2}, idempotency_key="k1")
        h2 = await c.submit("sleep", {"seconds": 0.2}, idempotency_key="k1")
        r1, r2 = await asyncio.wait_for(asyncio.gather(h1.result(), h2.result()), 10)
        assert r1 == r2
        h3 = await c.submit("sleep", {"seconds": 0.2}, idempotency_key="k1")
        assert await asyncio.wait_for(h3.result(), 10) == r1
    hist = await orch.store.history(limit=10)
    assert len(hist) == 1


async def test_queue_full_priority_and_fairness(realm_env: Realm) -> None:
    await realm_env.start_orchestrator()
    await realm_env.start_worker("w1", max_concurrency=1)
    await realm_env.wait_peers("sleep", 1)
    realm_env.orchestrator.core.queues.clear()  # type: ignore[union-attr]
    order: list[str] = []
    async with client(realm_env, user="hog") as hog, client(realm_env, user="amy") as amy:
        blocker = await hog.submit("sleep", {"seconds": 0.5})
        await asyncio.sleep(0.1)
        hogs = [await hog.submit("sleep", {"seconds": 0.02}) for _ in range(5)]
        batch = await amy.submit("sleep", {"seconds": 0.02}, priority="batch")
        fair = await amy.submit("sleep", {"seconds": 0.02})
        alarm = await amy.submit("sleep", {"seconds": 0.02}, priority="alarm")

        async def track(name: str, h: Any) -> None:
            await h.result()
            order.append(name)

        await asyncio.wait_for(
            asyncio.gather(
                track("blocker", blocker),
                track("batch", batch),
                track("fair", fair),
                track("alarm", alarm),
                *[track(f"hog{i}", h) for i, h in enumerate(hogs)],
            ),
            20,
        )
    assert order[0] == "blocker"
    assert order[1] == "alarm"
    assert order.index("fair") <= 3  # amy's one task is not stuck behind the hog's five
    assert order[-1] == "batch"


async def test_queue_full_is_refused(realm_env: Realm) -> None:
    realm_env.orch_cfg["queue_size"] = 2
    await realm_env.start_orchestrator()
    await realm_env.start_worker("w1", max_concurrency=1)
    await realm_env.wait_peers("sleep", 1)
    async with client(realm_env) as c:
        first = await c.submit("sleep", {"seconds": 2})
        await asyncio.sleep(0.2)
        queued = [await c.submit("sleep", {"seconds": 0}) for _ in range(2)]
        over = await c.submit("sleep", {"seconds": 0})
        with pytest.raises(TaskFailed) as info:
            await asyncio.wait_for(over.result(), 5)
        assert info.value.code == "queue_full"
        for h in (first, *queued):
            await h.cancel()


async def test_breaker_blacklists_failing_peer_and_sysop_ops(realm_env: Realm) -> None:
    orch = await realm_env.start_orchestrator()
    await realm_env.start_worker("good", max_concurrency=4)
    await realm_env.start_worker("bad", max_concurrency=4, fail_with="internal")
    await realm_env.wait_peers("sleep", 2)
    async with client(realm_env) as c:
        # Failures the submitter chose never count against a peer: its input asking to
        # fail, and its own short deadline.
        good = orch.registry.peers["good"].slots["sleep"]
        pin = Constraints(node="good")
        for _ in range(4):
            with pytest.raises(TaskFailed):
                await asyncio.wait_for(
                    c.call("sleep", {"seconds": 0, "fail": "internal"}, constraints=pin), 10
                )
            with pytest.raises(TaskFailed) as timed_out:
                await asyncio.wait_for(
                    c.call("sleep", {"seconds": 2}, timeout=0.1, constraints=pin), 10
                )
            assert timed_out.value.code == "timeout"
        assert good.breaker.state == "closed" and good.failed == 0
        # 'bad' fails everything it gets (a broken node): the breaker opens after 3.
        bad = orch.registry.peers["bad"].slots["sleep"]
        for _ in range(3):
            await c.submit("sleep", {"seconds": 0}, constraints=Constraints(node="bad"))
        async with asyncio.timeout(10):
            while bad.breaker.state != "open":
                await asyncio.sleep(0.01)
        results = [await asyncio.wait_for(c.call("sleep", {"seconds": 0}), 10) for _ in range(6)]
        assert {r["node"] for r in results} == {"good"}
        token = (Path(realm_env.orch_cfg["state_dir"]) / "sysop.token").read_text().strip()
    async with client(realm_env, token=token) as sysop:
        await sysop.admin("drain", node="good")
        await sysop.admin("unblacklist", node="bad")
        stats = await sysop.admin("stats")
        assert stats["peers"]["good"]["drained"] is True
        await sysop.admin("ban", name="mallory", reason="spam")
        with pytest.raises(Exception, match="not_found"):
            await sysop.admin("drain", node="ghost")
    async with client(realm_env, user="mallory") as m:
        with pytest.raises(TaskFailed) as info:
            await asyncio.wait_for(m.call("echo", 1), 10)
        assert info.value.code == "banned"
    async with client(realm_env, user="bob") as bob:
        with pytest.raises(Exception, match="forbidden"):
            await bob.admin("users")


async def test_worker_loss_requeues_to_another_peer(realm_env: Realm) -> None:
    await realm_env.start_orchestrator()
    await realm_env.start_worker("w1")
    await realm_env.wait_peers("sleep", 1)
    async with client(realm_env) as c:
        # Longer than the grace a peer that went offline gets (LOST_GRACE: a broker
        # shutting down sends every will); not direct, so w1's own final (it still
        # runs: its will is faked) is not the one that counts.
        h = await c.submit("sleep", {"seconds": 3.0}, progress=True, direct=False)
        async with asyncio.timeout(10):
            async for u in h:
                if u.status == "started":
                    break
        w2 = await realm_env.start_worker("w2")
        await realm_env.wait_peers("sleep", 2)
        # w1 vanishes without a goodbye: its will (offline) arrives from the broker.
        w1 = realm_env.workers["w1"]
        offline_will = Bus(realm_env.config().broker, "test-will")
        del offline_will
        from daemon.protocol.node import NodeState

        await c.bus.publish(
            f"mtor/{realm_env.realm}/node/w1/state",
            NodeState(state="offline", boot_id=w1.boot_id),
            retain=True,
        )
        result = await asyncio.wait_for(h.result(), 15)
        assert result["node"] == "w2"
        assert w2.worker.active == 0


async def test_task_ids_are_scoped_to_their_user(realm_env: Realm) -> None:
    await realm_env.start_orchestrator()
    await realm_env.start_worker("w1")
    await realm_env.wait_peers("echo", 1)
    async with client(realm_env, user="alice") as alice, client(realm_env, user="bob") as bob:
        assert await asyncio.wait_for(alice.call("echo", "secret", task_id="t-1"), 10) == "secret"
        with pytest.raises(TaskFailed) as info:
            await asyncio.wait_for(bob.call("echo", "x", task_id="t-1"), 10)
        assert info.value.code == "conflict"
        # alice asking again gets her cached result, not a second run
        assert await asyncio.wait_for(alice.call("echo", "other", task_id="t-1"), 10) == "secret"


async def test_admin_bad_arguments_get_a_reply(realm_env: Realm) -> None:
    await realm_env.start_orchestrator()
    token = (Path(realm_env.orch_cfg["state_dir"]) / "sysop.token").read_text().strip()
    async with client(realm_env, token=token) as sysop:
        with pytest.raises(Exception, match="bad_request"):
            await sysop.admin("history", limit="lots")
        assert await sysop.admin("history", limit=5) == []


async def test_node_tasks_carry_the_daemon_token(
    broker: PrivateBroker, realm: str, tmp_path: Path
) -> None:
    """Where require_token is on, a node's own tasks (NodeContext.realm_client: camera
    detections, voice chat) get through with daemon.token_file and are refused without."""
    env = Realm(broker, realm, tmp_path, require_token=True)
    try:
        orch = await env.start_orchestrator()
        token = await orch.users.add("w1", "device")
        worker = await env.start_worker("w1")
        await env.wait_peers("echo", 1)
        ctx = worker.ctx
        without = ctx.realm_client()
        await without.start()
        with pytest.raises(TaskFailed) as refused:
            await asyncio.wait_for(without.call("echo", 1, timeout=5), 10)
        assert refused.value.code == "unauthorized"
        (tmp_path / "token").write_text(token + "\n")
        daemon_cfg = ctx.config.daemon.model_copy(update={"token_file": tmp_path / "token"})
        ctx.config = ctx.config.model_copy(update={"daemon": daemon_cfg})
        with_token = ctx.realm_client()
        await with_token.start()
        assert await asyncio.wait_for(with_token.call("echo", 2, timeout=5), 10) == 2
        history = await orch.store.history(limit=5)
        assert history[0]["user"] == "w1"
    finally:
        await env.close()


async def test_a_task_sent_while_the_realm_starts_waits_for_its_peer(realm_env: Realm) -> None:
    await realm_env.start_orchestrator()  # no node daemon yet: the realm is starting
    async with client(realm_env, user="early") as c:
        handle = await c.submit("echo", {"early": True}, progress=True, timeout=30)
        updates = aiter(handle)
        first = await asyncio.wait_for(anext(updates), 5)
        assert (first.status, first.waiting) == ("queued", "the realm is starting")
        await realm_env.start_worker("w1")
        assert await asyncio.wait_for(handle.result(), 10) == {"early": True}
        # once a peer is online with every node running, what nobody offers fails at once
        with pytest.raises(TaskFailed) as failed:
            await asyncio.wait_for(c.call("no.such", None), 5)
        assert failed.value.code == "unavailable"


async def test_cli_views_print_tables_and_json(realm_env: Realm, tmp_path: Path) -> None:
    await realm_env.start_orchestrator()
    await realm_env.start_worker("w1")
    await realm_env.wait_peers("echo", 1)
    async with client(realm_env, user="cli") as c:
        for i in range(3):
            await c.call("echo", i)
    path = write_config(
        tmp_path,
        {"realm": realm_env.realm, "broker": {"url": realm_env.broker.url},
         "orchestrator": {"state_dir": str(tmp_path / "orch")}},
    )  # fmt: skip

    async def mtor(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "daemon.cli.main", *args, "--config", str(path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=mtor_env(),
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, out.decode()
        return out.decode()

    history = (await mtor("history", "--limit", "5")).splitlines()
    assert history[0].split() == [
        "WHEN", "TASK", "CAPABILITY", "USER", "NODE", "OUTCOME", "QUEUE", "RUN", "TOTAL"
    ]  # fmt: skip
    assert len(history) == 4 and all(" echo " in r and " done " in r for r in history[1:])
    assert json.loads(await mtor("history", "--json"))[0]["capability"] == "echo"
    stats = await mtor("stats")
    assert "1 peer(s) online, 3 done" in stats
    assert any(r.split()[:5] == ["echo", "0", "0", "3", "0"] for r in stats.splitlines())
    assert any(r.startswith("w1 ") and " online " in r for r in stats.splitlines())
    assert json.loads(await mtor("stats", "--json"))["completed"] == {"echo": 3}
    assert (await mtor("tasks")).strip() == "no active tasks"
    status = (await mtor("status")).splitlines()
    assert status[0].split()[:8] == [
        "NODE",
        "STATE",
        "LOAD",
        "CPU%",
        "MEM%",
        "TEMP",
        "TASKS",
        "RESTARTS",
    ]
    assert status[1].split()[:2] == ["w1", "online"]
    token = (tmp_path / "orch" / "sysop.token").read_text().strip()
    async with client(realm_env, token=token) as sysop:
        await sysop.admin("drain", node="w1")
    (row,) = json.loads(await mtor("status", "--json"))
    assert (row["node_id"], row["drained"], row["blacklisted"], row["restarts"]) == (
        "w1",
        True,
        False,
        0,
    )
    assert (await mtor("status")).splitlines()[1].split()[:2] == ["w1", "online,drained"]
