"""Hostile input never takes a process down (issue 13): the edge checks, and the
attacks that used to crash or wedge the orchestrator, against a real Mosquitto.

The realm tests reproduce what was seen in the field: a lone surrogate in a
retained capability advert (the stats snapshot could not be encoded, ~10 s
after every start), a report whose error code SQLite cannot store, a U+0000 in
a payload ``reply_to`` (Mosquitto closed the orchestrator's connection and the
bus replayed the publish on every reconnect) and deeply nested JSON (a
RecursionError traceback per message).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from daemon import topics
from daemon.broker import PrivateBroker
from daemon.bus import Bus, Inbound
from daemon.client import RealmClient
from daemon.config import Config
from daemon.errors import BusPublishError, MessageError
from daemon.messages import decode, decode_any, encode, load_json
from daemon.mqtt import ConnectParams, PublishRejected, codec, connect
from daemon.mqtt.connection import MAX_STRIKES
from daemon.orchestrator.service import Orchestrator
from daemon.orchestrator.store import HISTORY_COLUMNS, Store
from daemon.protocol.common import ErrorReply
from daemon.protocol.node import Capability, Hardware, NodeInfo, NodeState
from daemon.protocol.task import TaskAssign, TaskSubmit, TaskUpdate
from daemon.runtime import NodeDaemon
from daemon.textcheck import MAX_NESTING, json_too_deep, valid_topic_name
from tests.conftest import Collector, InProcess, make_config, running_bus

# ===================================================================== the checks


@pytest.mark.parametrize(
    ("topic", "ok"),
    [
        ("mtor/home/reply/alice/tasks", True),
        ("a", True),
        ("/", True),
        ("mtor/home/reply/é/ü", True),
        ("x" * 65_535, True),
        ("", False),
        ("a/\0b", False),
        ("a/+/b", False),
        ("a/#", False),
        ("a+b", False),
        ("a/\ud800", False),
        ("x" * 65_536, False),
        ("é" * 32_768, False),  # 65,536 bytes in UTF-8
    ],
)
def test_topic_names(topic: str, ok: bool) -> None:
    assert valid_topic_name(topic) is ok


def test_nesting_scan() -> None:
    def nested(n: int) -> bytes:
        return b'{"a":' * n + b"1" + b"}" * n

    assert not json_too_deep(nested(MAX_NESTING))
    assert json_too_deep(nested(MAX_NESTING + 1))
    assert json_too_deep(b"[" * 100_000)  # not even valid JSON: still flagged
    # Brackets inside strings do not count, escaped quotes and backslashes included.
    assert not json_too_deep(json.dumps({"s": "[" * 1000, "t": '\\"[[[' * 100}).encode())
    assert not json_too_deep(json.dumps(["\\", "[" * 500, '"', "{" * 500]).encode())
    # ... but a string ending in a backslash does not hide what follows it.
    assert json_too_deep(b'["\\\\",' + b"[" * 40 + b"]" * 41)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"state":"online","boot_id":"\\ud800"}',  # a lone high surrogate, escaped
        b'{"state":"online","boot_id":"\\uDC00x"}',  # a lone low one
        b'{"state":"online","boot_id":"\\ud800\\u0041"}',  # a high one not followed by a low
        b'{"state":"online","boot_id":"\xed\xa0\x80"}',  # an encoded surrogate
        b'{"state":"online","boot_id":"\xff"}',  # not UTF-8 at all
        b'{"state":"online","boot_id":"b","\\ud800":1}',  # in a key
        '{"state":"online","boot_id":"\ud800"}',  # a str that holds one
    ],
)
def test_no_surrogate_gets_into_a_model(payload: bytes | str) -> None:
    with pytest.raises(MessageError, match=r"UTF-8|surrogate|not valid JSON"):
        decode(payload, NodeState)
    # The fast path (our own header first) refuses it just the same.
    if isinstance(payload, bytes):
        with pytest.raises(MessageError):
            decode(b'{"type":"node.state","v":1,' + payload[1:], NodeState)
        with pytest.raises(MessageError):
            decode_any(b'{"type":"node.state","v":1,' + payload[1:])


def test_surrogate_pairs_and_nul_are_text() -> None:
    msg = decode(b'{"state":"online","boot_id":"b","reason":"\\ud83d\\ude00 \\u0000"}', NodeState)
    assert msg.reason == "\U0001f600 \0"


@pytest.mark.parametrize("fast", [False, True])
def test_deep_nesting_is_refused_before_any_recursion(fast: bool) -> None:
    head = b'{"type":"task.submit","v":1,' if fast else b"{"
    for depth in (MAX_NESTING + 1, 5_000, 500_000):
        payload = head + b'"capability":"echo","input":' + b"[" * depth + b"]" * depth + b"}"
        with pytest.raises(MessageError) as info:
            decode(payload, TaskSubmit)
        assert info.value.code == "too_deep"
    ok = head + b'"capability":"echo","input":' + b"[" * 30 + b"]" * 30 + b"}"
    assert decode(ok, TaskSubmit).capability == "echo"
    with pytest.raises(MessageError) as info:
        load_json(b"[" * 1_000_000)
    assert info.value.code == "too_deep"


def test_unencodable_message_is_a_message_error() -> None:
    msg = NodeState.model_construct(state="online", boot_id="\ud800")
    with pytest.raises(MessageError) as info:
        encode(msg)
    assert info.value.code == "unencodable"


def _info(**cap: Any) -> dict[str, Any]:
    hardware = {"arch": "x86_64", "cpu_count": 1, "ram_mb": 1}
    capability = {"name": "echo", "node": "ref", **cap}
    return {
        "node_id": "n1",
        "boot_id": "b1",
        "version": "1",
        "hostname": "h",
        "hardware": hardware,
        "capabilities": [capability],
    }


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "Echo"},
        {"name": "echo/x"},
        {"name": "x" * 65},
        {"node": "a b"},
        {"backend": "../etc"},
        {"model": "a\nb"},
        {"languages": ["en"] * 513},
        {"attrs": {str(i): i for i in range(65)}},
        {"max_concurrency": 1 << 17},
    ],
)
def test_node_info_names_are_bounded(bad: dict[str, Any]) -> None:
    decode(json.dumps(_info()).encode(), NodeInfo)  # the good one
    with pytest.raises(MessageError, match=r"capabilities\.0"):
        decode(json.dumps(_info(**bad)).encode(), NodeInfo)


def test_error_reply_fields_are_bounded() -> None:
    with pytest.raises(MessageError, match="code"):
        decode(b'{"code":"Bad Code","message":"m"}', ErrorReply)
    with pytest.raises(MessageError, match="message"):
        decode(json.dumps({"code": "bad_request", "message": "m" * 5000}).encode(), ErrorReply)


def test_incoming_publish_with_a_bad_topic_is_its_own_error() -> None:
    def publish(topic: bytes, qos: int, props: bytes = b"\x00") -> tuple[int, bytes]:
        raw = codec.encode_publish(topic, b"x", qos=qos, retain=False, packet_id=7, props=props)
        ((first, body),), _ = codec.split_packets(raw)
        return first, body

    for topic in (b"a/\xed\xa0\x80", b"a/\xff", b"a/\x00"):
        with pytest.raises(codec.InvalidPublish) as info:
            codec.decode_publish(*publish(topic, 1))
        assert (info.value.qos, info.value.packet_id) == (1, 7)
    bad_response_topic = codec.encode_properties({codec.RESPONSE_TOPIC: "r"}).replace(b"r", b"\xff")
    with pytest.raises(codec.InvalidPublish):
        codec.decode_publish(*publish(b"a/b", 2, bad_response_topic))
    assert codec.decode_publish(*publish(b"a/b", 1)).topic == "a/b"


def test_store_skips_rows_sqlite_cannot_take(tmp_path: Path) -> None:
    async def main() -> tuple[list[str], list[str], list[Any]]:
        store = Store(tmp_path / "h.db", 1, 1000)
        await store.open()
        good = dict.fromkeys(HISTORY_COLUMNS) | {"task_id": "a", "submitted": time.time()}
        store.record(good)
        store.record(good | {"task_id": "b", "error_code": "\ud800"})
        store.record(good | {"task_id": "c", "attempts": 1 << 70})
        store.record(good | {"task_id": "d"})
        run = {"run_id": "r", "workflow": "w", "where_": "o", "trigger": None}
        run |= {"started": time.time(), "duration_ms": 1.0, "outcome": "done"}
        run |= {"error_code": None, "error": None, "steps": "[]"}
        store.record_run(run | {"run_id": "r\ud800"})
        store.record_run(run)
        store.journal_add("x", 1.0, lambda: {"unserialisable": object()})
        writer = asyncio.create_task(store.run())
        try:
            history = [r["task_id"] for r in await store.history()]
            runs = [r["run_id"] for r in await store.workflow_runs()]
            active = await store.load_active()
            assert not writer.done()
        finally:
            writer.cancel()
            await store.close()
        return history, runs, active

    history, runs, active = asyncio.run(main())
    assert sorted(history) == ["a", "d"]
    assert runs == ["r"]
    assert active == []


# ====================================================== the connection and the bus


@contextlib.asynccontextmanager
async def stand_in(
    serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    """A TCP server on a free port running ``serve`` per connection."""
    handlers: set[asyncio.Task[Any]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await serve(reader, writer)
        finally:
            handlers.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


async def read_packets(reader: asyncio.StreamReader) -> AsyncIterator[tuple[int, bytes]]:
    """The packets a client sends, until it closes the connection."""
    buf = b""
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            buf += data
            packets, used = codec.split_packets(buf)
            buf = buf[used:]
            for packet in packets:
                yield packet


async def test_a_publish_with_a_bad_topic_from_the_broker_is_dropped_not_fatal() -> None:
    acks: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async for first, body in read_packets(reader):
            kind = first >> 4
            if kind == codec.CONNECT:
                writer.write(b"\x20\x03\x00\x00\x00")
                for topic in (b"bad/\xed\xa0\x80", b"bad/\x00", b"good"):
                    writer.write(
                        codec.encode_publish(
                            topic, b"p", qos=1, retain=False, packet_id=len(topic), props=b"\x00"
                        )
                    )
            elif kind == codec.PUBACK:
                acks.append(body)

    async with stand_in(serve) as port:
        conn = await connect(ConnectParams("127.0.0.1", port, "stand-in"))
        async with asyncio.timeout(5):
            await conn.wait_message()
            assert [m.topic for m in conn.inbox] == ["good"]
            while len(acks) < 3:
                await asyncio.sleep(0.01)
        assert not conn.closed
        # The bad ones are acknowledged with 0x90 (topic name invalid), the good one with 0.
        assert sorted(acks) == [b"\x00\x04", b"\x00\x05\x90", b"\x00\x07\x90"]
        await conn.close()


def _publish_packet(topic: bytes, size: int, packet_id: int) -> bytes:
    return codec.encode_publish(
        topic, b"p" * size, qos=1, retain=False, packet_id=packet_id, props=b"\x00"
    )


async def test_a_flood_of_large_messages_is_bounded_in_bytes() -> None:
    """Past the byte bound, large arrivals are dropped (acknowledged), small ones kept."""
    acks: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async for first, body in read_packets(reader):
            if first >> 4 == codec.CONNECT:
                writer.write(b"\x20\x03\x00\x00\x00")
                for i in range(10):
                    writer.write(_publish_packet(b"large", 100_000, i + 1))
                for i in range(5):
                    writer.write(_publish_packet(b"small", 100, i + 11))
            elif first >> 4 == codec.PUBACK:
                acks.append(body)

    async with stand_in(serve) as port:
        params = ConnectParams("127.0.0.1", port, "bytes", max_queued_incoming_bytes=250_000)
        conn = await connect(params)
        await until(lambda: len(acks) == 15)  # every one acknowledged, kept or not
        assert [m.topic for m in conn.inbox] == ["large"] * 3 + ["small"] * 5
        assert not conn.closed
        await conn.close()


async def test_reading_resumes_when_dispatch_waits_for_an_acknowledgement() -> None:
    """Paused reading (too many messages waiting) must not deadlock an owner that waits
    for the broker's PUBACK, which comes behind what the broker queued for it."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async for first, body in read_packets(reader):
            if first >> 4 == codec.CONNECT:
                writer.write(b"\x20\x03\x00\x00\x00")
                for i in range(5):
                    writer.write(_publish_packet(b"early", 10, i + 1))
            elif first >> 4 == codec.PUBLISH:
                request = codec.decode_publish(first, body)
                for i in range(50):  # the acknowledgement comes behind a backlog
                    writer.write(_publish_packet(b"later", 60_000, i + 100))
                writer.write(codec.encode_ack(codec.PUBACK, request.packet_id))

    async with stand_in(serve) as port:
        conn = await connect(ConnectParams("127.0.0.1", port, "stall", max_queued_incoming=2))
        await until(lambda: conn._paused)
        acked = conn.publish("request", b"x", 1, ack=True)
        assert acked is not None
        assert await asyncio.wait_for(acked, 5) == 0  # nobody took anything meanwhile
        await conn.close()


async def test_bus_refuses_what_is_not_a_topic_name(config: Config, realm: str) -> None:
    async with running_bus(config) as bus:
        got = Collector()
        await bus.subscribe(f"mtor/{realm}/#", got)
        bad = [
            "",
            f"mtor/{realm}/a\0b",
            f"mtor/{realm}/+",
            f"mtor/{realm}/#",
            "\ud800",
            "x" * 70_000,
        ]
        for topic in bad:
            with pytest.raises(BusPublishError, match="not a valid MQTT topic name"):
                await bus.publish(topic, b"x")
            bus.post(topic, b"x")
        with pytest.raises(BusPublishError, match="response topic"):
            await bus.publish(f"mtor/{realm}/ok", b"x", response_topic="r/\0")
        with pytest.raises(BusPublishError, match="surrogate"):
            await bus.publish(f"mtor/{realm}/ok", "\ud800")
        with pytest.raises(BusPublishError, match=r"unencodable|cannot publish"):
            await bus.publish(
                f"mtor/{realm}/ok", NodeState.model_construct(state="online", boot_id="\ud800")
            )
        assert bus.refused == len(bad)
        bus.post(f"mtor/{realm}/ok", b"after", response_topic=f"mtor/{realm}/r")
        await got.wait_for(lambda m: m.payload == b"after", timeout=5)
        assert bus.connects == 1 and not got.messages[:-1]


async def test_a_publish_the_broker_disconnects_on_is_dropped_not_replayed(
    config: Config, realm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What happened with a U+0000 in a reply topic: Mosquitto closes the connection
    (DISCONNECT 0x81) on the publish.  It must not come back on the next connection."""
    async with running_bus(config) as bus:
        got = Collector()
        await bus.subscribe(f"mtor/{realm}/#", got)
        conn = bus._conn
        assert conn is not None
        # Past the bus's and the connection's own checks on purpose: stands for anything
        # only the broker refuses.
        monkeypatch.setattr(conn, "_check_sendable", lambda *_: None)
        rejected = conn.publish(f"mtor/{realm}/a\0b", b"poison", 1, ack=True)
        conn.publish(f"mtor/{realm}/a\0c", b"poison 2", 1)  # fire and forget
        conn.publish(f"mtor/{realm}/after", b"behind it", 1)
        assert rejected is not None
        with pytest.raises(PublishRejected, match="malformed"):
            await asyncio.wait_for(rejected, 5)
        await bus.wait_connected(5)
        # The second poison and the good one behind it go out again on the new connection:
        # the broker refuses the poison once more, and that one is dropped too.
        await got.wait_for(lambda m: m.payload == b"behind it", timeout=10)
        await bus.publish(f"mtor/{realm}/marker", b"marker")
        await got.wait_for(lambda m: m.payload == b"marker", timeout=5)
        assert bus.connects <= 3
        connects = bus.connects
        await bus.publish(f"mtor/{realm}/marker", b"marker 2")
        await got.wait_for(lambda m: m.payload == b"marker 2", timeout=5)
        assert bus.connects == connects
        assert not [m for m in got.messages if m.payload.startswith(b"poison")]


async def test_a_publish_a_silent_broker_keeps_closing_on_gets_dropped(
    config: Config,
) -> None:
    """A broker that closes on a publish without saying why: after MAX_STRIKES closes
    with it as the oldest unacknowledged publish, it is dropped; the rest is delivered."""
    connections = 0
    delivered: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        async for first, body in read_packets(reader):
            kind = first >> 4
            if kind == codec.CONNECT:
                writer.write(b"\x20\x03\x00\x00\x00")
            elif kind == codec.PUBLISH:
                message = codec.decode_publish(first, body)
                if message.topic == "poison":
                    writer.close()
                    return
                delivered.append(message.topic)
                writer.write(codec.encode_ack(codec.PUBACK, message.packet_id))
            elif kind == codec.PINGREQ:
                writer.write(b"\xd0\x00")

    async with stand_in(serve) as port:
        cfg = make_config(
            f"mqtt://127.0.0.1:{port}", "x", broker={"reconnect": {"initial_delay": 0.01}}
        )
        bus = Bus(cfg.broker, "strikes")
        task = asyncio.create_task(bus.run())
        try:
            await bus.wait_connected(5)
            bus.post("poison", b"x")
            bus.post("after", b"y")
            async with asyncio.timeout(10):
                while "after" not in delivered or not bus.connected:
                    await asyncio.sleep(0.01)
            await bus.publish("marker", b"z")
            assert connections == MAX_STRIKES + 1
            assert bus.dropped == 1
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_the_brokers_limits_are_honoured_and_refusals_reported(
    tmp_path: Path, realm: str
) -> None:
    acl = tmp_path / "acl"
    acl.write_text(f"topic readwrite mtor/{realm}/ok/#\n")
    with PrivateBroker(extra_config=f"acl_file {acl}\nmax_packet_size 2048\n") as broker:
        async with running_bus(make_config(broker.url, realm)) as bus:
            got = Collector()
            await bus.subscribe(f"mtor/{realm}/ok/#", got)
            with pytest.raises(BusPublishError, match="Maximum Packet Size 2048"):
                await bus.publish(f"mtor/{realm}/ok/big", b"x" * 3000)
            bus.post(f"mtor/{realm}/ok/big", b"x" * 3000)  # refused here, never sent
            with pytest.raises(BusPublishError, match="not authorized"):
                await bus.publish(f"mtor/{realm}/denied", b"x")
            bus.post(f"mtor/{realm}/denied", b"x")
            await bus.publish(f"mtor/{realm}/ok/small", b"y" * 1000)
            await got.wait_for(lambda m: m.topic.endswith("small"), timeout=5)
            assert bus.connects == 1
            assert [m.topic for m in got.messages] == [f"mtor/{realm}/ok/small"]


# ========================================================== attacks on a real realm


class HostileRealm(InProcess):
    """An in-process orchestrator (stats every 0.1 s) and echo worker on a real broker."""

    def __init__(self, broker: PrivateBroker, realm: str, tmp: Path) -> None:
        super().__init__()
        self.broker = broker
        self.realm = realm
        self.orch_cfg = {"state_dir": str(tmp / "orch"), "stats_interval": 0.1}
        self.orchestrator: Orchestrator | None = None
        self._orch: tuple[asyncio.Event, asyncio.Task[None]] | None = None

    def config(self, **extra: Any) -> Config:
        return make_config(self.broker.url, self.realm, orchestrator=self.orch_cfg, **extra)

    async def start_orchestrator(self) -> Orchestrator:
        self.orchestrator = orch = Orchestrator(self.config())
        self._run(orch.run)
        self._orch = self.tasks[-1]
        await asyncio.wait_for(orch._online.wait(), 10)
        return orch

    async def stop_orchestrator(self) -> None:
        assert self._orch is not None
        self.alive()
        self.tasks.remove(self._orch)
        stop, task = self._orch
        stop.set()
        await asyncio.wait_for(task, 10)

    async def start_worker(self) -> NodeDaemon:
        cfg = self.config(node_id="w1", nodes={"ref": {"type": "reference"}})
        daemon = NodeDaemon(cfg)
        self._run(daemon.run)
        await asyncio.wait_for(daemon._online.wait(), 10)
        return daemon

    def alive(self) -> None:
        assert self._orch is not None
        task = self._orch[1]
        if task.done():
            raise AssertionError(f"the orchestrator ended: {task!r}")

    async def stats_published(self, bus: Bus, n: int = 2) -> None:
        """Until the orchestrator published ``n`` fresh stats snapshots (each one encoded)."""
        got = Collector()
        topic = topics.ORCH_STATS.build(realm=self.realm)
        await bus.subscribe(topic, got)
        try:
            await got.wait_for(lambda m: not m.retain, timeout=5)
            await got.wait_count(len([m for m in got.messages if m.retain]) + n, timeout=5)
        finally:
            await bus.unsubscribe(topic)

    async def processed(self, bus: Bus, orch: Orchestrator) -> None:
        """Until ``orch`` has dispatched what ``bus`` published to node/+/info so far:
        a valid advert published after it (same connection, same filter: in order)."""
        probe = f"probe{time.monotonic_ns()}"
        info = _hostile_info(probe, b"probe")
        await bus.publish(topics.NODE_INFO.build(realm=self.realm, node_id=probe), info)
        await until(lambda: probe in orch.registry.peers)


@pytest.fixture
async def hostile(broker: PrivateBroker, realm: str, tmp_path: Path) -> AsyncIterator[HostileRealm]:
    env = HostileRealm(broker, realm, tmp_path)
    try:
        yield env
    finally:
        await env.close()


@contextlib.asynccontextmanager
async def realm_client(env: HostileRealm) -> AsyncIterator[RealmClient]:
    async with running_bus(env.config()) as bus:
        client = RealmClient(bus, env.realm)
        await client.start()
        yield client


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def _hostile_info(node_id: str, name: bytes) -> bytes:
    """A node.info of ``node_id`` whose one capability is named ``name`` (raw JSON bytes)."""
    info = NodeInfo(
        node_id=node_id,
        boot_id="b1",
        version="1",
        hostname="h",
        hardware=Hardware(arch="x", cpu_count=1, ram_mb=1),
        capabilities=[Capability(name="placeholder", node="ref")],
    )
    return encode(info).replace(b"placeholder", name)


EVIL_NAMES = {"evil1": b"\\ud800", "evil2": b"\xed\xa0\x80", "evil3": b"ok\\udfff"}


async def test_surrogate_in_a_retained_capability_advert(hostile: HostileRealm) -> None:
    """It crashed the orchestrator's stats snapshot, again after every start (retained)."""
    await hostile.start_worker()
    async with realm_client(hostile) as client:
        bus = client.bus
        try:
            for node_id, name in EVIL_NAMES.items():
                topic = topics.NODE_INFO.build(realm=hostile.realm, node_id=node_id)
                await bus.publish(topic, _hostile_info(node_id, name), retain=True)
            for _start in range(2):  # the second start gets them as retained messages
                orch = await hostile.start_orchestrator()
                for node_id, name in EVIL_NAMES.items():  # and live, before a probe
                    topic = topics.NODE_INFO.build(realm=hostile.realm, node_id=node_id)
                    await bus.publish(topic, _hostile_info(node_id, name))
                await hostile.processed(bus, orch)
                assert not set(EVIL_NAMES) & set(orch.registry.peers)
                await hostile.stats_published(bus)
                assert await asyncio.wait_for(client.call("echo", "still here"), 10) == "still here"
                encode(orch.snapshot())
                await hostile.stop_orchestrator()
        finally:
            for node_id in EVIL_NAMES:
                topic = topics.NODE_INFO.build(realm=hostile.realm, node_id=node_id)
                await bus.publish(topic, b"", retain=True)


async def test_unstorable_error_code_in_a_worker_report(hostile: HostileRealm) -> None:
    """A report whose error code is a lone surrogate: it once went into the history row
    and the SQLite writer died of it, with the orchestrator's TaskGroup."""
    orch = await hostile.start_orchestrator()
    await hostile.start_worker()
    async with realm_client(hostile) as client:
        bus = client.bus
        fake = "fake1"
        assigned: list[TaskAssign] = []

        async def on_task(msg: Inbound) -> None:
            assign = decode(msg.payload, TaskAssign)
            assigned.append(assign)
            report = (
                b'{"type":"task.report","v":1,"task_id":"%s","attempt":%d,"status":"failed",'
                b'"error":{"code":"\\ud800","message":"\xed\xa0\x80"}}'
            ) % (assign.task_id.encode(), assign.attempt)
            await bus.publish(topics.TASK_WORKER.build(realm=hostile.realm, node_id=fake), report)

        await bus.subscribe(topics.NODE_TASK.build(realm=hostile.realm, node_id=fake), on_task)
        await bus.publish(
            topics.NODE_STATE.build(realm=hostile.realm, node_id=fake),
            NodeState(state="online", boot_id="b1"),
        )
        await bus.publish(
            topics.NODE_INFO.build(realm=hostile.realm, node_id=fake),
            _hostile_info(fake, b"hostile.fail"),
        )
        await until(lambda: bool(orch.registry.free.get("hostile.fail")))
        # No reply topic: the orchestrator's reply is not what fails, the history row is.
        await bus.publish(
            client.submit_topic, b'{"capability":"hostile.fail","input":1,"timeout":1}'
        )
        await until(lambda: bool(assigned))
        task_id = assigned[0].task_id
        await until(lambda: task_id not in orch.tasks, timeout=10)
        rows = await asyncio.wait_for(orch.store.history(), 5)
        await hostile.stats_published(bus)
        hostile.alive()
        row = next(r for r in rows if r["task_id"] == task_id)
        assert row["outcome"] == "failed" and row["error_code"].isascii()
        assert await asyncio.wait_for(client.call("echo", 1), 10) == 1


async def test_nul_in_a_payload_reply_to(hostile: HostileRealm) -> None:
    """The reply topic is no topic name: Mosquitto closed the orchestrator's connection
    on it, and the publish came back first on every reconnect."""
    orch = await hostile.start_orchestrator()
    await hostile.start_worker()
    async with realm_client(hostile) as client:
        assert await asyncio.wait_for(client.call("echo", 0), 10) == 0
        for reply_to in (client.reply_topic + "\0x", client.reply_topic + "/+", "\0"):
            payload = json.dumps({"capability": "echo", "input": 1, "reply_to": reply_to})
            await client.bus.publish(client.submit_topic, payload)
        # Refused at admission (topics.valid_reply_topic checks MQTT topic-name rules):
        # nothing is answered, nothing reaches the bus's own last-line check.
        assert await asyncio.wait_for(client.call("echo", 2), 10) == 2  # after those
        assert not [t for t in orch.tasks.values() if t.submit.input == 1]
        await hostile.stats_published(client.bus)
        assert orch.bus.connects == 1
        hostile.alive()


async def test_deep_nesting_gets_an_error_reply_not_a_traceback(hostile: HostileRealm) -> None:
    orch = await hostile.start_orchestrator()
    worker = await hostile.start_worker()
    async with realm_client(hostile) as client:
        bus = client.bus
        got = Collector()
        reply = client.reply_topic.rsplit("/", 1)[0] + "/deep"
        await bus.subscribe(reply, got)
        deep = b"[" * 100_000 + b"]" * 100_000
        await bus.publish(
            client.submit_topic,
            b'{"capability":"echo","input":' + deep + b"}",
            response_topic=reply,
            correlation_data=b"c1",
        )
        answer = await got.wait_for(lambda m: m.correlation_data == b"c1", timeout=5)
        update = decode(answer.payload, TaskUpdate)
        assert update.status == "failed" and update.error is not None
        assert update.error.code == "too_deep"
        # The same at a worker, a node's retained advert and health.
        await bus.publish(topics.NODE_TASK.build(realm=hostile.realm, node_id="w1"), deep)
        for pattern in (topics.NODE_INFO, topics.NODE_HEALTH, topics.NODE_STATE):
            await bus.publish(pattern.build(realm=hostile.realm, node_id="deep"), deep)
        await hostile.processed(bus, orch)
        assert await asyncio.wait_for(client.call("echo", 3), 10) == 3
        assert orch.bus.handler_errors == 0
        assert worker.bus.handler_errors == 0
