"""The bus against a real Mosquitto: dispatch, isolation, reconnect, outbox, auth."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
import uuid
from pathlib import Path

import pytest

from daemon.broker import PrivateBroker
from daemon.bus import Bus, Inbound
from daemon.config import Config
from daemon.errors import BusAuthError
from tests.conftest import Collector, make_config, running_bus


async def test_overlapping_filters_dispatch_once_each(config: Config) -> None:
    base = f"mtor/{config.realm}/o"
    async with running_bus(config) as bus:
        wide, narrow = Collector(), Collector()
        await bus.subscribe(base + "/#", wide)
        await bus.subscribe(base + "/a", narrow)
        await bus.publish(base + "/a", b"1")
        await bus.publish(base + "/b", b"2")
        await wide.wait_count(2, timeout=5)
        await narrow.wait_count(1, timeout=5)
        # A sentinel behind the others proves nothing more is in flight.
        await bus.publish(base + "/a", b"end")
        await narrow.wait_for(lambda m: m.payload == b"end", timeout=5)
        assert [m.payload for m in narrow.messages] == [b"1", b"end"]
        await wide.wait_for(lambda m: m.payload == b"end", timeout=5)
        assert [m.payload for m in wide.messages] == [b"1", b"2", b"end"]


async def test_failing_handler_does_not_stop_dispatch(
    config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    topic = f"mtor/{config.realm}/iso"

    async def broken(_msg: Inbound) -> None:
        raise RuntimeError("boom")

    async with running_bus(config) as bus:
        good = Collector()
        await bus.subscribe(topic, broken)
        await bus.subscribe(topic, good)
        for i in range(3):
            await bus.publish(topic, str(i))
        await good.wait_count(3, timeout=5)
        assert bus.handler_errors == 3
    assert "handler" in caplog.text
    assert "boom" in caplog.text


async def test_properties_roundtrip(config: Config) -> None:
    topic = f"mtor/{config.realm}/props"
    async with running_bus(config) as bus:
        got = Collector()
        await bus.subscribe(topic, got)
        await bus.publish(
            topic,
            b"\x89PNG",
            content_type="image/png",
            response_topic=topic + "/reply",
            correlation_data=b"c1",
            user_properties={"k": "v"},
            expiry=30,
        )
        msg = await got.wait_for(lambda m: True, timeout=5)
    assert msg.payload == b"\x89PNG"
    assert msg.content_type == "image/png"
    assert msg.response_topic == topic + "/reply"
    assert msg.correlation_data == b"c1"
    assert ("k", "v") in msg.user_properties


async def test_flow_control_delivers_everything(broker: PrivateBroker, realm: str) -> None:
    cfg = make_config(broker.url, realm, broker={"max_inflight": 4})
    topic = f"mtor/{realm}/flow"
    async with running_bus(cfg) as bus:
        got = Collector()
        await bus.subscribe(topic, got)
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, len(bus._background))
                await asyncio.sleep(0)

        watcher = asyncio.create_task(watch())
        for i in range(500):
            await bus.publish(topic, str(i), wait=False)
        await got.wait_count(500, timeout=20)
        watcher.cancel()
        assert [int(m.payload) for m in got.messages] == list(range(500))
        assert peak <= 4


async def test_busy_subscriber_loses_nothing_in_a_burst(broker: PrivateBroker, realm: str) -> None:
    """A subscriber whose loop is busy while a burst arrives still gets every QoS 1 message.

    Without a Receive Maximum in CONNECT, Mosquitto sends 20 at a time, queues
    1,000 more and silently drops the rest (seen as workflow runs that never
    reported ``finished`` in ``bench.workflows``).
    """
    cfg = make_config(broker.url, realm)
    topic = f"mtor/{realm}/burst"
    n = 3000

    def publish_burst() -> None:
        async def go() -> None:
            async with running_bus(cfg, "burst-pub") as pub:
                for i in range(n):
                    await pub.publish(topic, str(i), wait=False)
                await pub.flush()  # every message acknowledged by the broker

        asyncio.run(go())

    async with running_bus(cfg) as bus:
        got = Collector()
        await bus.subscribe(topic, got)
        publisher = threading.Thread(target=publish_burst)
        publisher.start()
        publisher.join(timeout=60)  # blocks this loop on purpose: the subscriber is busy
        assert not publisher.is_alive()
        await got.wait_count(n, timeout=20)
        assert [int(m.payload) for m in got.messages] == list(range(n))


async def test_reconnect_resubscribes_once_and_flushes_outbox(own_broker: PrivateBroker) -> None:
    realm = "r" + uuid.uuid4().hex[:8]
    cfg = make_config(own_broker.url, realm)
    topic = f"mtor/{realm}/re"
    bus = Bus(cfg.broker, "test-reconnect")
    got = Collector()
    hooks = 0

    async def hook() -> None:
        nonlocal hooks
        hooks += 1

    bus.on_connect(hook)
    await bus.subscribe(topic, got)
    task = asyncio.create_task(bus.run())
    try:
        await bus.wait_connected(5)
        own_broker.kill()
        async with asyncio.timeout(5):
            while bus.connected:
                await asyncio.sleep(0.01)
        # Published while the broker is down: kept in the outbox.  Waiting for the
        # acknowledgement waits for the broker to come back and take it.
        await bus.publish(topic, b"while-down", wait=False)
        acked = asyncio.create_task(bus.publish(topic, b"acked-after"))
        await asyncio.sleep(0.3)
        assert not acked.done()
        own_broker.start()
        await asyncio.wait_for(acked, 10)
        await bus.wait_connected(10)
        await got.wait_for(lambda m: m.payload == b"acked-after", timeout=5)
        await got.wait_for(lambda m: m.payload == b"while-down", timeout=5)
        async with running_bus(cfg) as other:
            await other.publish(topic, b"after")
        await got.wait_for(lambda m: m.payload == b"after", timeout=5)
        await bus.publish(topic, b"sentinel")
        await got.wait_for(lambda m: m.payload == b"sentinel", timeout=5)
        payloads = [m.payload for m in got.messages]
        assert payloads.count(b"after") == 1  # no duplicate subscription
        assert payloads.count(b"while-down") == 1
        assert bus.connects == 2
        assert hooks == 2
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
def auth_broker(tmp_path: Path) -> PrivateBroker:
    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pw), "node1", "s3cret"], check=True)
    pw.chmod(0o600)
    b = PrivateBroker(extra_config=f"allow_anonymous false\npassword_file {pw}\n")
    # allow_anonymous appears twice; mosquitto takes the last value.
    b.start()
    yield b
    b.cleanup()


async def test_bad_credentials_are_fatal(auth_broker: PrivateBroker) -> None:
    cfg = make_config(auth_broker.url, "auth", broker={"username": "node1"})
    bus = Bus(cfg.broker, "test-auth", password="wrong")
    with pytest.raises(BusAuthError, match="refused"):
        async with asyncio.timeout(10):
            await bus.run()
    good = Bus(cfg.broker, "test-auth-ok", password="s3cret")
    task = asyncio.create_task(good.run())
    try:
        await good.wait_connected(5)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_websocket_transport(tmp_path: Path) -> None:
    from daemon.broker import free_port

    with PrivateBroker(websocket_port=free_port()) as b:
        cfg = make_config(f"ws://127.0.0.1:{b.websocket_port}/", "ws")
        async with running_bus(cfg) as bus:
            got = Collector()
            await bus.subscribe("mtor/ws/t", got)
            await bus.publish("mtor/ws/t", b"over websockets")
            await got.wait_for(lambda m: m.payload == b"over websockets", timeout=5)


async def test_unix_socket_transport(tmp_path: Path) -> None:
    sock = tmp_path / "mqtt.sock"
    with PrivateBroker(extra_config=f"listener 0 {sock}\n") as b:
        assert b.running
        cfg = make_config(f"unix://{sock}", "unix")
        async with running_bus(cfg) as bus:
            got = Collector()
            await bus.subscribe("mtor/unix/t", got)
            await bus.publish("mtor/unix/t", b"over a unix socket")
            await got.wait_for(lambda m: m.payload == b"over a unix socket", timeout=5)


async def test_a_second_handler_of_a_filter_gets_the_retained_state(config: Config) -> None:
    """Two parts of one process subscribe to the same retained topic at different
    times (a worker and a voice node both follow orchestrator/state): the second one
    gets the retained message too, and the first does not get it twice."""
    topic = f"mtor/{config.realm}/retained-state"
    async with running_bus(config) as bus:
        await bus.publish(topic, b"current", retain=True)
        first, second = Collector(), Collector()
        await bus.subscribe(topic, first)
        await first.wait_for(lambda m: m.payload == b"current", timeout=5)
        await bus.subscribe(topic, second)
        await second.wait_for(lambda m: m.payload == b"current" and m.retain, timeout=5)
        await bus.publish(topic, b"next", retain=True)
        await first.wait_for(lambda m: m.payload == b"next", timeout=5)
        await second.wait_for(lambda m: m.payload == b"next", timeout=5)
        assert [m.payload for m in first.messages] == [b"current", b"next"]
        assert [m.payload for m in second.messages] == [b"current", b"next"]
        await bus.publish(topic, b"", retain=True)
