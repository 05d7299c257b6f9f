"""High availability with real processes: two orchestrators on one realm, exactly
one active; kill -9 of the active during a task storm; an old active that comes
back steps down.  Every task ends with exactly one final — none lost, none twice."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.broker import PrivateBroker
from daemon.bus import Inbound
from daemon.client import RealmClient
from daemon.messages import decode
from daemon.protocol.admin import InstanceState, OrchestratorLease, OrchestratorState
from tests.conftest import MtorProcess, make_config, running_bus
from tests.test_reliability import FinalCounter, wait_for_peers, worker, write

pytestmark = pytest.mark.slow


def orchestrator(
    broker: PrivateBroker, realm: str, tmp: Path, name: str, **extra: Any
) -> MtorProcess:
    cfg = write(
        tmp,
        f"orch-{name}",
        {
            "realm": realm,
            "node_id": name,
            "nodes": {},
            "logging": {"level": os.environ.get("HA_LOG", "info")},
            "orchestrator": {
                "instance": name,
                "state_dir": str(tmp / f"state-{name}"),
                "max_attempts": 5,
                "ack_timeout": 2.0,
                "roles": {"user": {"rate_per_s": 0, "max_concurrent": 0}},
                **extra,
            },
        },
    )
    return MtorProcess(["orchestrator", "-c", str(cfg), "-b", broker.url])


class Watch:
    """The lease, the instances' roles and the realm's orchestrator state."""

    def __init__(self) -> None:
        self.lease: OrchestratorLease | None = None
        self.roles: dict[str, str] = {}
        self.online: list[tuple[float, str]] = []  # (when, boot id)

    async def on_lease(self, msg: Inbound) -> None:
        self.lease = decode(msg.payload, OrchestratorLease)

    async def on_instance(self, msg: Inbound) -> None:
        self.roles[msg.topic.split("/")[-2]] = decode(msg.payload, InstanceState).state

    async def on_state(self, msg: Inbound) -> None:
        state = decode(msg.payload, OrchestratorState)
        if state.state == "online":
            self.online.append((time.monotonic(), state.boot_id))

    async def until(self, predicate: Any, timeout: float = 20) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.02)


async def watching(bus: Any, realm: str) -> Watch:
    w = Watch()
    await bus.subscribe(f"mtor/{realm}/orchestrator/lease", w.on_lease)
    await bus.subscribe(f"mtor/{realm}/orchestrator/instance/+/state", w.on_instance)
    await bus.subscribe(f"mtor/{realm}/orchestrator/state", w.on_state)
    return w


async def test_kill9_of_the_active_during_a_storm_loses_nothing(
    broker: PrivateBroker, realm: str, tmp_path: Path, processes: list[MtorProcess]
) -> None:
    orchs = {"a": orchestrator(broker, realm, tmp_path, "a")}
    processes.extend(orchs.values())
    cfg = make_config(broker.url, realm)
    async with running_bus(cfg) as bus, running_bus(cfg) as watcher:
        watch = await watching(watcher, realm)  # its own bus: the client gets retained state
        await watch.until(lambda: watch.roles.get("a") == "active")
        orchs["b"] = orchestrator(broker, realm, tmp_path, "b")
        processes.append(orchs["b"])
        await watch.until(lambda: watch.roles.get("b") == "standby")
        assert watch.lease is not None and watch.lease.holder == "a"  # one active
        for i in range(2):
            processes.append(worker(broker, realm, tmp_path, f"w{i}", 4))
        client = RealmClient(bus, realm, user="storm")
        await client.start()
        counter = FinalCounter()
        await bus.subscribe(client.reply_topic, counter)
        await bus.subscribe(client.direct_topic, counter)
        await wait_for_peers(client, 2)
        handles = [
            await client.submit("sleep", {"seconds": 0.2}, timeout=60, direct=False)
            for _ in range(60)
        ]
        await asyncio.sleep(0.8)  # some done, some running, most queued
        epoch = watch.lease.epoch
        killed = time.monotonic()
        orchs["a"].kill9()
        await watch.until(lambda: watch.lease is not None and watch.lease.holder == "b")
        await watch.until(lambda: any(t > killed for t, _ in watch.online))
        failover = next(t for t, _ in watch.online if t > killed) - killed
        assert watch.lease.epoch > epoch
        results = await asyncio.wait_for(
            asyncio.gather(*(h.result() for h in handles), return_exceptions=True), 90
        )
        await client.call("echo", "sentinel", timeout=10)  # duplicates would be here by now
        await asyncio.sleep(0.5)
    print(f"failover (kill -9 to the standby online): {failover:.2f} s")
    assert all(isinstance(r, dict) and r["node"] in ("w0", "w1") for r in results), results
    assert all(counter.finals[h.task_id] == 1 for h in handles), counter.finals


async def test_an_old_active_that_comes_back_steps_down(
    broker: PrivateBroker, realm: str, tmp_path: Path, processes: list[MtorProcess]
) -> None:
    """The active frozen past the lease timeout: the standby takes over (a higher
    epoch); woken, the old one sees the newer lease and exits 75 (its supervisor
    starts it again, as a standby).  Work goes on, nothing runs twice."""
    quick = {"lease_timeout": 1.5, "lease_renew": 0.5}
    a = orchestrator(broker, realm, tmp_path, "a", **quick)
    processes.append(a)
    cfg = make_config(broker.url, realm)
    async with running_bus(cfg) as bus, running_bus(cfg) as watcher:
        watch = await watching(watcher, realm)  # its own bus: the client gets retained state
        await watch.until(lambda: watch.roles.get("a") == "active")
        b = orchestrator(broker, realm, tmp_path, "b", **quick)
        processes.append(b)
        await watch.until(lambda: watch.roles.get("b") == "standby")
        w0 = worker(broker, realm, tmp_path, "w0", 4)
        processes.append(w0)
        client = RealmClient(bus, realm, user="u")
        await client.start()
        counter = FinalCounter()
        await bus.subscribe(client.reply_topic, counter)
        await wait_for_peers(client, 1)
        os.kill(a.proc.pid, signal.SIGSTOP)
        try:
            await watch.until(lambda: watch.lease is not None and watch.lease.holder == "b")
            handles = [
                await client.submit("sleep", {"seconds": 0.1}, timeout=60, direct=False)
                for _ in range(10)
            ]
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)
        try:
            async with asyncio.timeout(15):
                while a.proc.poll() is None:
                    await asyncio.sleep(0.05)
        except TimeoutError:
            a.proc.kill()
            raise AssertionError(a.output()[-4000:]) from None
        try:
            results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 60)
        except TimeoutError:
            b.proc.kill()
            w0.proc.kill()
            raise AssertionError(b.output()[-3000:] + "\n-----\n" + w0.output()[-3000:]) from None
        await asyncio.sleep(0.5)
    assert a.proc.returncode == 75, a.output()[-2000:]
    assert "stepped down" in a.output()
    assert all(r["node"] == "w0" for r in results)
    assert all(counter.finals[h.task_id] == 1 for h in handles), counter.finals


async def test_one_orchestrator_alone_is_active_at_once(
    broker: PrivateBroker, realm: str, tmp_path: Path, processes: list[MtorProcess]
) -> None:
    """No lease on the broker: the only orchestrator claims it (no waiting out a
    timeout); stopped cleanly, it releases it, and the next one takes it at once."""
    first = orchestrator(broker, realm, tmp_path, "a")
    processes.append(first)
    async with running_bus(make_config(broker.url, realm)) as bus:
        watch = await watching(bus, realm)
        await watch.until(lambda: watch.roles.get("a") == "active")
        epoch = watch.lease.epoch
        rc, out = first.terminate()
        assert rc == 0, out
        print(out[-3000:])
        await watch.until(lambda: watch.lease is not None and watch.lease.state == "released")
        released = time.monotonic()
        processes.append(orchestrator(broker, realm, tmp_path, "b"))
        await watch.until(
            lambda: (
                watch.lease is not None
                and watch.lease.holder == "b"
                and watch.lease.state == "held"
            )
        )
        print(f"released lease taken in {time.monotonic() - released:.2f} s")
        assert watch.lease.epoch > epoch
        assert watch.roles.get("a") != "active"


async def test_a_broker_restart_during_a_storm_loses_nothing(
    tmp_path: Path, realm: str, processes: list[MtorProcess]
) -> None:
    """The broker (its state on disk) stopped and started again while tasks stream:
    the daemons resume their sessions, clients resubmit nothing twice that ran —
    every task has exactly one final."""
    persist = f"persistence true\npersistence_location {tmp_path}/\nmax_queued_messages 100000\n"
    with PrivateBroker(extra_config=persist) as broker:
        orch = orchestrator(broker, realm, tmp_path, "a")
        processes.append(orch)
        for i in range(2):
            processes.append(worker(broker, realm, tmp_path, f"w{i}", 4))
        async with running_bus(make_config(broker.url, realm)) as bus:
            client = RealmClient(bus, realm, user="storm")
            await client.start()
            counter = FinalCounter()
            await bus.subscribe(client.reply_topic, counter)
            await bus.subscribe(client.direct_topic, counter)
            await wait_for_peers(client, 2)
            handles = [
                await client.submit("sleep", {"seconds": 0.1}, timeout=90, direct=False)
                for _ in range(80)
            ]
            await asyncio.sleep(0.5)
            await asyncio.to_thread(broker.stop)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(broker.start)
            try:
                results = await asyncio.wait_for(
                    asyncio.gather(*(h.result() for h in handles), return_exceptions=True), 60
                )
            except TimeoutError:
                orch.proc.kill()
                raise AssertionError(
                    f"{len(client.pending)} pending\n" + orch.output()[-3000:]
                ) from None
            await client.call("echo", "sentinel", timeout=20)
            await asyncio.sleep(0.5)
    bad = [r for r in results if not (isinstance(r, dict) and r["node"] in ("w0", "w1"))]
    assert not bad, bad[:5]
    # Each task ran to one outcome; the client, back on the broker with a clean
    # session, resubmits what it still waits for, and a task that had just finished
    # gets its (same) final once more: on the wire at most twice, never different.
    assert all(1 <= counter.finals[h.task_id] <= 2 for h in handles), counter.finals
    assert set(counter.outcomes) == {"done"}, counter.outcomes
