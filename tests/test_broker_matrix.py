"""The broker matrix: the bus and a short realm run on MQTT 5 brokers besides Mosquitto.

Every test runs on each broker of :data:`tests.brokers.BROKERS` — Mosquitto (the
reference), rumqttd (iotcore), aedes 2 beta and ejabberd's mod_mqtt — through the
real :class:`daemon.bus.Bus` with the broker's one account.  A broker that is not
installed (``.ci/brokers.sh``) is skipped, or fails when ``MTOR_REQUIRE_BROKERS=1``.

Where a broker deviates from MQTT 5, the test named for the behaviour says what that
broker does instead (``test_<broker>_...``), and where our client then misbehaves the
test is ``xfail(strict=True)`` with the defect in its reason: it turns into a failure
the day the client is fixed, so the marker goes with the fix.  docs/brokers-matrix.md
has the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.bus import Bus
from daemon.client import RealmClient
from daemon.config import Config
from daemon.errors import BusAuthError, BusError, BusPublishError
from daemon.orchestrator.service import Orchestrator
from daemon.runtime import NodeDaemon
from tests.brokers import BROKERS, MatrixBroker, RawSession, probe_connack
from tests.conftest import ROOT, Collector, InProcess, make_config, mtor_env, running_bus

pytestmark = pytest.mark.timeout(60)

# What each broker announces in its CONNACK to our CONNECT (docs/brokers-matrix.md);
# an absent property means the MQTT 5 default (no limit, or "available").
CONNACK: dict[str, dict[str, object]] = {
    "mosquitto": {"Receive Maximum": 20, "Topic Alias Maximum": 10},
    "rumqttd": {"Topic Alias Maximum": 4096},
    "aedes": {"Shared Subscription Available": 0},
    "ejabberd": {
        "Session Expiry Interval": 0,
        "Server Keep Alive": 30,
        "Topic Alias Maximum": 100,
        "Shared Subscription Available": 0,
    },
}
SHARED: dict[str, bool] = {
    name: props.get("Shared Subscription Available", 1) == 1 for name, props in CONNACK.items()
}


def on_brokers(
    *, xfail: dict[str, str] | None = None, only: set[str] | None = None
) -> pytest.MarkDecorator:
    """Parametrize a test over the brokers (``mbroker`` fixture); ``xfail`` maps a
    broker to the client defect that makes the test fail there."""
    xfail = xfail or {}
    params = [
        pytest.param(
            name,
            id=name,
            marks=[pytest.mark.xfail(strict=True, reason=xfail[name])] if name in xfail else [],
        )
        for name in BROKERS
        if only is None or name in only
    ]
    return pytest.mark.parametrize("mbroker", params, indirect=True)


@pytest.fixture(scope="module")
def mbroker(request: pytest.FixtureRequest) -> Iterator[MatrixBroker]:
    """One broker of the matrix, shared by the module's tests (unique realms each)."""
    cls = BROKERS[request.param]
    why = cls.missing()
    if why is not None:
        if os.environ.get("MTOR_REQUIRE_BROKERS") == "1":
            pytest.fail(f"{cls.name} is required (MTOR_REQUIRE_BROKERS=1) but {why}")
        pytest.skip(f"{cls.name} is not installed: {why}")
    with cls() as broker:
        yield broker


def matrix_config(broker: MatrixBroker, realm: str, **extra: Any) -> Config:
    account = {"username": broker.username, "password": broker.password}
    return make_config(broker.url, realm, broker={k: v for k, v in account.items() if v}, **extra)


@pytest.fixture
def cfg(mbroker: MatrixBroker, realm: str) -> Config:
    return matrix_config(mbroker, realm)


def topic(cfg: Config, *rest: str) -> str:
    return "/".join(("mtor", cfg.realm, *rest))


@contextlib.asynccontextmanager
async def two_buses(cfg: Config) -> AsyncIterator[tuple[Bus, Bus]]:
    async with running_bus(cfg) as sub, running_bus(cfg) as pub:
        yield sub, pub


def payloads(c: Collector) -> list[bytes]:
    return [m.payload for m in c.messages]


# ------------------------------------------------------------------ connect


@on_brokers()
def test_connack_properties_as_documented(mbroker: MatrixBroker, record_property: Any) -> None:
    """What the broker announces (raw socket, not our client): the matrix's table."""
    reason, props = probe_connack(
        mbroker.host, mbroker.port, username=mbroker.username, password=mbroker.password
    )
    record_property("connack", json.dumps(props))
    print(f"{mbroker.name} CONNACK: reason 0x{reason:02x} {props}")
    assert reason == 0
    assert props == CONNACK[mbroker.name]


@on_brokers()
async def test_connect_with_password(cfg: Config) -> None:
    async with running_bus(cfg) as bus:
        assert bus.connected


@on_brokers(only={"mosquitto", "aedes", "ejabberd"})
async def test_wrong_password_is_fatal(mbroker: MatrixBroker, realm: str) -> None:
    """A CONNACK with 0x86/0x87 ends the bus with BusAuthError (no retry loop)."""
    bad = make_config(
        mbroker.url, realm, broker={"username": mbroker.username, "password": "wrong"}
    )
    assert bad.broker.username is not None
    bus = Bus(bad.broker, "matrix-bad", password=bad.broker_password())
    with pytest.raises(BusAuthError):
        await asyncio.wait_for(bus.run(), 10)


@on_brokers(only={"rumqttd"})
def test_rumqttd_closes_without_connack_on_wrong_password(mbroker: MatrixBroker) -> None:
    """rumqttd refuses a wrong password by closing the socket, no CONNACK reason code
    (allowed by MQTT 5, 3.1.4), so a client cannot tell it from a network fault."""
    with pytest.raises(ConnectionError, match="closed the connection"):
        probe_connack(mbroker.host, mbroker.port, username=mbroker.username, password="wrong")


# ---------------------------------------------------------- publish/subscribe


@on_brokers()
@pytest.mark.parametrize("qos", [0, 1, 2])
async def test_publish_subscribe_qos(cfg: Config, qos: int) -> None:
    got = Collector()
    async with two_buses(cfg) as (sub, pub):
        await sub.subscribe(topic(cfg, "q"), got, qos=qos)
        await pub.publish(topic(cfg, "q"), f"at qos {qos}", qos=qos)
        msg = await got.wait_for(lambda m: True, timeout=10)
        assert (msg.payload, msg.qos, msg.retain) == (f"at qos {qos}".encode(), qos, False)


@on_brokers()
async def test_retained_message_reaches_a_late_subscriber(cfg: Config) -> None:
    t = topic(cfg, "retained")
    async with running_bus(cfg) as pub:
        await pub.publish(t, "kept", retain=True)
    got = Collector()
    async with running_bus(cfg) as late:
        await late.subscribe(t, got)
        msg = await got.wait_for(lambda m: True)
        assert (msg.payload, msg.retain) == (b"kept", True)
        await late.publish(t, b"", retain=True)  # cleared


WILL_CHILD = """
import asyncio, json, sys
from daemon.bus import Bus
from daemon.config import build_config

async def main() -> None:
    cfg = build_config(json.loads(sys.argv[1]))
    bus = Bus(cfg.broker, "matrix-will", password=cfg.broker_password(),
              will=(sys.argv[2], b"died"))
    task = asyncio.create_task(bus.run())
    await bus.wait_connected(10)
    print("connected", flush=True)
    await task

asyncio.run(main())
"""


@on_brokers()
async def test_will_is_published_when_the_client_dies(cfg: Config) -> None:
    """A process with a will is SIGKILLed: its socket closes without DISCONNECT."""
    t = topic(cfg, "will")
    got = Collector()
    data = {
        "realm": cfg.realm,
        "nodes": {},
        "broker": {
            "url": cfg.broker.url,
            "username": cfg.broker.username,
            "password": cfg.broker_password(),
        },
    }
    async with running_bus(cfg) as watcher:
        await watcher.subscribe(t, got)
        child = subprocess.Popen(
            [sys.executable, "-c", WILL_CHILD, json.dumps(data), t],
            cwd=ROOT,
            env=mtor_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            assert child.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 20)
            assert line == b"connected\n", line
            child.kill()
            msg = await got.wait_for(lambda m: True)
            assert (msg.payload, msg.retain) == (b"died", False)  # retain flag of a live delivery
        finally:
            child.kill()
            child.communicate(timeout=5)
        await watcher.publish(t, b"", retain=True)  # the will is retained: cleared


@on_brokers()
async def test_wildcard_subscription(cfg: Config) -> None:
    got = Collector()
    async with two_buses(cfg) as (sub, pub):
        await sub.subscribe(topic(cfg, "+", "temp", "#"), got)
        await pub.publish(topic(cfg, "kitchen", "humidity"), "no")  # does not match
        await pub.publish(topic(cfg, "kitchen", "temp", "c"), "yes")
        await pub.publish(topic(cfg, "hall", "temp"), "yes too")  # '#' matches the parent
        await got.wait_count(2)
        assert sorted(payloads(got)) == [b"yes", b"yes too"]


@on_brokers()
async def test_overlapping_subscriptions_each_get_the_message_once(cfg: Config) -> None:
    """``o/+/x`` and ``o/a/+`` both match ``o/a/x``: each handler gets it once.
    Mosquitto, rumqttd and ejabberd send one copy per matching subscription, each
    with its own identifier; aedes one copy (see the wire test below)."""
    by_level, by_name = Collector(), Collector()
    async with two_buses(cfg) as (sub, pub):
        await sub.subscribe(topic(cfg, "o", "+", "x"), by_level)
        await sub.subscribe(topic(cfg, "o", "a", "+"), by_name)
        await pub.publish(topic(cfg, "o", "a", "x"), "both")
        # Each filter's own message, after 'both' from the same sender: once they are
        # in, so is every copy of 'both'.
        await pub.publish(topic(cfg, "o", "b", "x"), "level only")
        await pub.publish(topic(cfg, "o", "a", "y"), "name only")
        await by_level.wait_for(lambda m: m.payload == b"level only")
        await by_name.wait_for(lambda m: m.payload == b"name only")
        assert payloads(by_level) == [b"both", b"level only"]
        assert payloads(by_name) == [b"both", b"name only"]


@on_brokers(only={name for name, shared in SHARED.items() if shared})
async def test_shared_subscription_delivers_each_message_to_one_member(cfg: Config) -> None:
    """Two members of one share group: each message goes to one of them, once."""
    t = topic(cfg, "jobs")
    members, everyone = Collector(), Collector()
    n = 20
    async with running_bus(cfg) as a, running_bus(cfg) as b, running_bus(cfg) as pub:
        await a.subscribe(f"$share/workers/{t}", members)
        await b.subscribe(f"$share/workers/{t}", members)
        await pub.subscribe(t, everyone)  # a plain subscription beside the group
        for i in range(n):
            await pub.publish(t, str(i))
        await everyone.wait_count(n)
        await members.wait_count(n)
        await pub.publish(t, str(n))  # after the others: a duplicate would be in by now
        await members.wait_count(n + 1)
        assert sorted(payloads(members), key=int) == [str(i).encode() for i in range(n + 1)]


@on_brokers(
    only={name for name, shared in SHARED.items() if not shared},
)
async def test_shared_subscription_refused_locally_when_unavailable(cfg: Config) -> None:
    async with running_bus(cfg) as bus:
        with pytest.raises((BusError, ValueError)):
            await bus.subscribe(f"$share/workers/{topic(cfg, 'jobs')}", Collector())


@on_brokers(
    only={name for name, shared in SHARED.items() if not shared},
)
async def test_refused_shared_subscription_leaves_the_bus_working(cfg: Config) -> None:
    """The broker announced Shared Subscription Available = 0 and refuses a $share
    subscription (aedes: SUBACK 0x9E; ejabberd: DISCONNECT 0x9E): the bus and its
    other subscriptions go on."""
    got = Collector()
    async with two_buses(cfg) as (sub, pub):
        with contextlib.suppress(BusError, ValueError):  # refused locally: as good
            await sub.subscribe(f"$share/workers/{topic(cfg, 'jobs')}", got)
        await sub.subscribe(topic(cfg, "plain"), got)
        await pub.publish(topic(cfg, "plain"), "still here")
        await got.wait_for(lambda m: m.payload == b"still here", timeout=5)
        assert sub.connects == 1


# What each broker sends to one connection with three overlapping subscriptions
# (identifiers 1, 2, 3) for one PUBLISH: the sorted identifiers of each copy.
COPIES: dict[str, list[list[int]]] = {
    "mosquitto": [[1], [2], [3]],
    "rumqttd": [[1], [2], [3]],
    "aedes": [[3]],  # one copy, one identifier (MQTT 5 3.3.4-3/4 want all three)
    "ejabberd": [[1], [2], [3]],
}


@on_brokers()
def test_overlapping_subscriptions_on_the_wire(mbroker: MatrixBroker, realm: str) -> None:
    """The broker's own behaviour, on a raw socket: copies and subscription identifiers."""
    sub = RawSession(mbroker, f"{realm}-sub")
    pub = RawSession(mbroker, f"{realm}-pub")
    try:
        base = f"mtor/{realm}/o"
        assert sub.subscribe(f"{base}/+/x", 1) == [0]
        assert sub.subscribe(f"{base}/a/+", 2) == [0]
        assert sub.subscribe(f"{base}/#", 3) == [0]
        pub.publish(f"{base}/a/x", b"all three")
        pub.publish(f"{base}/end", b"end")  # matches only '#' (3)
        got = sub.publishes_until(b"end")
    finally:
        sub.close()
        pub.close()
    assert got[-1] == (b"end", [3])
    copies = sorted(sorted(ids) for payload, ids in got[:-1])
    assert {payload for payload, _ in got[:-1]} == {b"all three"}
    assert copies == COPIES[mbroker.name]


# ---------------------------------------------------------------- resilience


@on_brokers()
async def test_reconnects_and_resubscribes_after_a_broker_restart(
    mbroker: MatrixBroker, cfg: Config
) -> None:
    got = Collector()
    async with two_buses(cfg) as (sub, pub):
        await sub.subscribe(topic(cfg, "after"), got)
        mbroker.restart()
        async with asyncio.timeout(20):  # until the subscriber is back and subscribed
            i = 0
            while not got.messages:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pub.publish(topic(cfg, "after"), str(i)), 1)
                i += 1
                await asyncio.sleep(0.1)
        assert sub.connects >= 2
        assert pub.connects >= 2


@on_brokers()
async def test_large_payload(cfg: Config) -> None:
    """A 1 MB message (rumqttd is configured for 2 MiB; its default is 20 KiB)."""
    big = os.urandom(1_000_000)
    got = Collector()
    async with two_buses(cfg) as (sub, pub):
        await sub.subscribe(topic(cfg, "big"), got)
        await pub.publish(topic(cfg, "big"), big)
        msg = await got.wait_for(lambda m: True, timeout=20)
        assert msg.payload == big


# rumqttd closes the connection (no DISCONNECT 0x95) on a payload over its configured
# max_payload_size, which its CONNACK does not announce as a Maximum Packet Size.
OVER_RUMQTTD_LIMIT = 3_000_000


@on_brokers(
    only={"rumqttd"},
)
async def test_rumqttd_oversized_publish_does_not_take_the_next_one_down(cfg: Config) -> None:
    """The oversized publish is replayed on reconnect at most MAX_STRIKES times, then
    dropped; the publish behind it arrives."""
    got = Collector()
    async with two_buses(cfg) as (sub, pub):
        await sub.subscribe(topic(cfg, "big", "#"), got)
        await pub.publish(topic(cfg, "big", "poison"), os.urandom(OVER_RUMQTTD_LIMIT), wait=False)
        await pub.publish(topic(cfg, "big", "after"), "after")
        await got.wait_for(lambda m: m.payload == b"after", timeout=10)
        assert payloads(got) == [b"after"]
        assert pub.dropped == 1


@on_brokers(
    only={"rumqttd"},
)
async def test_rumqttd_oversized_publish_tells_the_waiting_caller(cfg: Config) -> None:
    async with running_bus(cfg) as pub:
        with pytest.raises(BusPublishError):
            await asyncio.wait_for(
                pub.publish(topic(cfg, "big"), os.urandom(OVER_RUMQTTD_LIMIT)), 20
            )


# ------------------------------------------------------------------ a realm


@on_brokers()
async def test_realm_runs_an_echo_task(mbroker: MatrixBroker, realm: str, tmp_path: Path) -> None:
    """Orchestrator, a node daemon with the reference (echo) node and a client, every
    one with the broker's one account: an open realm, no per-role ACL (only Mosquitto
    gets the realm's generated ACL, elsewhere)."""
    roles = InProcess()

    def config(**extra: Any) -> Config:
        return matrix_config(
            mbroker, realm, orchestrator={"state_dir": str(tmp_path / "orch")}, **extra
        )

    try:
        orchestrator = Orchestrator(config())
        roles._run(orchestrator.run)
        await asyncio.wait_for(orchestrator._online.wait(), 15)
        node = NodeDaemon(config(node_id="w1", nodes={"ref": {"type": "reference"}}))
        roles._run(node.run)
        await asyncio.wait_for(node._online.wait(), 15)
        async with asyncio.timeout(15):  # the orchestrator has read the node's advert
            while "w1" not in orchestrator.registry.index.get("echo", set()):
                await asyncio.sleep(0.02)
        async with running_bus(config()) as bus:
            client = RealmClient(bus, realm)
            await client.start()
            answer = await asyncio.wait_for(
                client.call("echo", {"broker": mbroker.name, "n": [1, 2]}), 20
            )
        assert answer == {"broker": mbroker.name, "n": [1, 2]}
    finally:
        await roles.close()
