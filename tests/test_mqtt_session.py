"""The bus's session and outbox against a real Mosquitto: nothing lost across an
outage, byte bounds, Message Expiry aged, persistent sessions, duplicate client ids."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.broker import PrivateBroker
from daemon.bus import Bus
from daemon.config import Config, default_node_id
from daemon.mqtt import ConnectParams, codec, connect
from daemon.mqtt.connection import WRITE_BUFFER_LIMIT
from tests.cable import Cable
from tests.conftest import Collector, make_config, running_bus


@contextlib.asynccontextmanager
async def bus_running(bus: Bus) -> AsyncIterator[Bus]:
    task = asyncio.create_task(bus.run())
    try:
        await bus.wait_connected(5)
        yield bus
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_stream_loses_nothing_in_an_outage(broker: PrivateBroker) -> None:
    """Defect 7: a 700 msg/s QoS 1 stream across a 1 s outage of the publisher's
    connection: every message arrives (the old 1,000-message outbox lost ~2 %)."""
    realm = "s" + uuid.uuid4().hex[:8]
    topic = f"mtor/{realm}/stream"
    sent = 2100
    cable = Cable(broker.port)
    async with cable:
        publisher = Bus(make_config(cable.url, realm).broker, f"pub-{realm}")
        async with bus_running(publisher), running_bus(make_config(broker.url, realm)) as sub:
            got = Collector()
            await sub.subscribe(topic, got)
            start = time.monotonic()
            pulled = 0.0
            for i in range(sent):
                publisher.post(topic, str(i))
                if i == 700:
                    cable.pull()
                    pulled = time.monotonic()
                elif not cable.plugged and time.monotonic() - pulled >= 1.0:
                    cable.plug()
                await asyncio.sleep(max(0.0, start + (i + 1) / 700 - time.monotonic()))
            await publisher.wait_connected(10)
            await publisher.flush()
            async with asyncio.timeout(20):
                while len({m.payload for m in got.messages}) < sent:
                    await asyncio.sleep(0.05)
            assert publisher.connects >= 2
    received = {int(m.payload) for m in got.messages}
    assert received == set(range(sent))
    assert publisher.dropped == 0


async def test_qos0_to_a_frozen_broker_is_bounded(
    config: Config, own_broker: PrivateBroker
) -> None:
    """QoS 0 to a broker that stopped reading: at most WRITE_BUFFER_LIMIT bytes wait in
    the transport, the rest is dropped and counted (it was hundreds of MB)."""
    cfg = make_config(own_broker.url, config.realm)
    async with running_bus(cfg) as bus:
        assert own_broker.pid is not None
        os.kill(own_broker.pid, signal.SIGSTOP)
        try:
            payload = b"x" * 64 * 1024
            for _ in range(1000):  # 64 MiB
                bus.post(f"mtor/{cfg.realm}/q0", payload, qos=0)
                await asyncio.sleep(0)
            conn = bus._conn
            assert conn is not None and conn._write_transport is not None
            unsent = conn._write_transport.get_write_buffer_size()
            assert unsent <= WRITE_BUFFER_LIMIT + 2 * len(payload)
            assert bus.dropped > 0
        finally:
            os.kill(own_broker.pid, signal.SIGCONT)


async def test_message_expiry_counts_the_time_in_the_outbox(own_broker: PrivateBroker) -> None:
    """A publish that waited offline is sent with what is left of its expiry, and one
    whose expiry passed is not sent at all (counted)."""
    realm = "e" + uuid.uuid4().hex[:8]
    cfg = make_config(own_broker.url, realm)
    topic = f"mtor/{realm}/exp"
    watcher = await connect(ConnectParams("127.0.0.1", own_broker.port, f"w-{realm}"))
    bus = Bus(cfg.broker, f"exp-{realm}")
    async with bus_running(bus):
        own_broker.kill()
        async with asyncio.timeout(5):
            while bus.connected:
                await asyncio.sleep(0.01)
        await bus.publish(topic, b"short", expiry=1, wait=False)
        await bus.publish(topic, b"long", expiry=30, wait=False)
        await asyncio.sleep(2.1)
        own_broker.start()
        watcher = await connect(ConnectParams("127.0.0.1", own_broker.port, f"w-{realm}"))
        await watcher.subscribe(topic, codec.subscribe_options(1))
        await bus.wait_connected(10)
        await bus.flush()
        async with asyncio.timeout(5):
            await watcher.wait_message()
        message = watcher.take()
        assert message.payload == b"long"
        assert message.properties[codec.MESSAGE_EXPIRY] <= 28
        assert bus.dropped == 1  # the short one expired unsent
    await watcher.close()


async def test_a_persistent_session_gets_what_was_sent_while_away(
    own_broker: PrivateBroker,
) -> None:
    """A daemon's bus (session_expiry > 0) that loses the broker connection for a while
    gets every QoS 1 and 2 message sent to it meanwhile, QoS 2 once."""
    realm = "p" + uuid.uuid4().hex[:8]
    cfg = make_config(own_broker.url, realm)
    node = Bus(cfg.broker, f"node-{realm}", session_expiry=60)
    got = Collector()
    await node.subscribe(f"mtor/{realm}/to-node/#", got, qos=2)
    async with bus_running(node), running_bus(cfg) as sender:
        await sender.publish(f"mtor/{realm}/to-node/1", b"before", qos=1)
        await got.wait_for(lambda m: m.payload == b"before", timeout=5)
        conn = node._conn
        assert conn is not None
        conn._fail("test: the network went away")  # no DISCONNECT: like a cable pulled
        for i in range(20):
            await sender.publish(f"mtor/{realm}/to-node/{i % 2 + 1}", f"away {i}", qos=i % 2 + 1)
        await node.wait_connected(10)
        assert node._conn is not None and node._conn.session_present
        await got.wait_count(21, timeout=10)
        await sender.publish(f"mtor/{realm}/to-node/1", b"end")
        await got.wait_for(lambda m: m.payload == b"end", timeout=5)
    payloads = [m.payload.decode() for m in got.messages]
    for i in range(20):
        assert payloads.count(f"away {i}") >= 1
        if i % 2:  # QoS 2: exactly once
            assert payloads.count(f"away {i}") == 1


async def test_two_processes_with_one_client_id_back_off_and_say_so(
    config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    """Two daemons with one node id: Mosquitto closes the older connection without a
    word each time the other connects.  They back off (a few connections each in
    seconds, not five a second forever) and the log says what is going on."""
    client_id = f"mtor-node-{config.realm}"
    hint = "is a second daemon running with node id 'x'?"
    first = Bus(config.broker, client_id, duplicate_hint=hint)
    second = Bus(config.broker, client_id, duplicate_hint=hint)
    caplog.set_level(logging.ERROR, logger="daemon.bus")
    async with bus_running(first):
        task = asyncio.create_task(second.run())
        try:
            await asyncio.sleep(6)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    # Without backoff it was ~30 connections each in 6 s.
    assert first.connects + second.connects <= 16
    said = [r.getMessage() for r in caplog.records if "another process" in r.getMessage()]
    assert said and client_id in said[0] and hint in said[0]


def test_a_distribution_host_name_gets_the_machine_id(tmp_path: Path) -> None:
    machine_id = tmp_path / "machine-id"
    machine_id.write_text("1f2e3d4c5b6a79881f2e3d4c5b6a7988\n")
    assert default_node_id("raspberrypi", machine_id) == "raspberrypi-1f2e3d4c"
    assert default_node_id("ubuntu.local", machine_id) == "ubuntu-1f2e3d4c"
    assert default_node_id("kitchen-pi", machine_id) == "kitchen-pi"
    assert default_node_id("raspberrypi", tmp_path / "missing") == "raspberrypi"


async def test_a_broker_without_retain_gets_a_will_it_can_take() -> None:
    """A broker without retained messages refuses a retained will (CONNACK 0x9A): the
    next CONNECT carries the will unretained, and the bus connects."""
    connects: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(65536)
        flags = data[data.index(b"MQTT\x05") + 5]
        connects.append(flags)
        if flags & 0x20:  # Will Retain
            writer.write(b"\x20\x03\x00\x9a\x00")
        else:  # success, and Retain Available = 0 said
            writer.write(b"\x20\x05\x00\x00\x02\x25\x00")
        await writer.drain()
        with contextlib.suppress(OSError):
            await reader.read(65536)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        cfg = make_config(f"mqtt://127.0.0.1:{port}", "w")
        bus = Bus(cfg.broker, "will", will=("mtor/w/node/x/state", b"offline"))
        async with bus_running(bus):
            assert [bool(f & 0x04) for f in connects] == [True, True]  # a will both times
            assert [bool(f & 0x20) for f in connects] == [True, False]
    finally:
        server.close()
