"""The project's MQTT 5 client (daemon/mqtt): wire format, and behaviour against
a real Mosquitto and its own command-line clients."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import subprocess
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from daemon import bus as bus_module
from daemon.broker import PrivateBroker, free_port
from daemon.bus import Bus, Inbound
from daemon.config import Config
from daemon.mqtt import ConnectionLost, ConnectParams, codec, connect
from tests.conftest import Collector, make_config, running_bus

# ------------------------------------------------------------------ wire format


@pytest.mark.parametrize("n", [0, 1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, 268_435_455])
def test_varint_round_trip(n: int) -> None:
    raw = codec.varint(n)
    assert len(raw) == 1 + (n >= 128) + (n >= 16_384) + (n >= 2_097_152)
    assert codec.read_varint(raw + b"tail", 0) == (n, len(raw))


def test_varint_limits() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        codec.varint(268_435_456)
    with pytest.raises(codec.ProtocolError, match="longer than four"):
        codec.read_varint(b"\xff\xff\xff\xff\x01", 0)
    with pytest.raises(codec.ProtocolError, match="runs past"):
        codec.read_varint(b"\x80", 0)


PUBLISH_VALUES: dict[str, Any] = {
    "PayloadFormatIndicator": 1,
    "MessageExpiryInterval": 3600,
    "ContentType": "application/json",
    "ResponseTopic": "mtor/r/reply/é",
    "CorrelationData": b"\x00\x01corr",
    "UserProperty": [("k", "v"), ("k", "w"), ("ü", "")],
    "SubscriptionIdentifier": [7, 300_000],
}
IDS = {
    "PayloadFormatIndicator": codec.PAYLOAD_FORMAT,
    "MessageExpiryInterval": codec.MESSAGE_EXPIRY,
    "ContentType": codec.CONTENT_TYPE,
    "ResponseTopic": codec.RESPONSE_TOPIC,
    "CorrelationData": codec.CORRELATION_DATA,
    "UserProperty": codec.USER_PROPERTY,
    "SubscriptionIdentifier": codec.SUBSCRIPTION_ID,
}


def test_properties_agree_with_paho_both_ways() -> None:
    """paho is an independent implementation of the same standard."""
    ours = {IDS[name]: value for name, value in PUBLISH_VALUES.items()}
    wire = codec.encode_properties(ours)
    theirs, used = PahoProperties(PacketTypes.PUBLISH).unpack(wire)
    assert used == len(wire)
    for name, value in PUBLISH_VALUES.items():
        assert getattr(theirs, name) == value, name

    paho = PahoProperties(PacketTypes.PUBLISH)
    for name, value in PUBLISH_VALUES.items():
        setattr(paho, name, value)
    decoded, end = codec.read_properties(paho.pack() + b"payload", 0)
    assert end == len(paho.pack())
    assert decoded == ours


def test_malformed_properties_are_refused() -> None:
    with pytest.raises(codec.ProtocolError, match="unknown property"):
        codec.read_properties(b"\x02\x7f\x00", 0)
    with pytest.raises(codec.ProtocolError, match="twice"):
        codec.read_properties(b"\x04\x01\x01\x01\x01", 0)
    with pytest.raises(codec.ProtocolError, match="past"):
        codec.read_properties(b"\x05\x03\x00\x09ab", 0)


def test_split_packets_at_every_cut() -> None:
    props = codec.publish_properties(content_type="text/plain", correlation_data=b"c")
    big = bytes(range(256)) * 600  # a three-byte remaining length
    stream = b"".join(
        [
            codec.encode_publish(b"a/b", b"hello", qos=1, retain=True, packet_id=9, props=props),
            codec.encode_ack(codec.PUBACK, 300),
            codec.encode_publish(b"big", big, qos=0, retain=False, packet_id=0, props=b"\x00"),
            codec.PINGREQ_PACKET,
        ]
    )
    whole, used = codec.split_packets(stream)
    assert used == len(stream)
    assert [first >> 4 for first, _ in whole] == [3, 4, 3, 12]
    message = codec.decode_publish(*whole[0])
    assert (message.topic, message.payload, message.qos, message.retain) == (
        "a/b",
        b"hello",
        1,
        True,
    )
    assert message.packet_id == 9
    assert message.properties == {codec.CONTENT_TYPE: "text/plain", codec.CORRELATION_DATA: b"c"}
    assert codec.decode_publish(*whole[2]).payload == big
    for cut in [*range(12), *range(len(stream) - 5, len(stream))]:
        first, used = codec.split_packets(stream[:cut])
        second, rest = codec.split_packets(stream[used:])
        assert first + second == whole, cut
        assert used + rest == len(stream)


# --------------------------------------------------------- against Mosquitto


@contextlib.asynccontextmanager
async def bus_on(url: str, realm: str) -> AsyncIterator[Bus]:
    async with running_bus(make_config(url, realm)) as bus:
        yield bus


async def test_interop_with_mosquitto_clients(config: Config) -> None:
    """mosquitto_pub/_sub (libmosquitto) read what we write and write what we read."""
    topic = f"mtor/{config.realm}/interop"
    async with running_bus(config) as bus:
        got = Collector()
        await bus.subscribe(topic + "/in", got, qos=2)
        host, port = config.broker.endpoint.host, str(config.broker.endpoint.port)
        sub = subprocess.Popen(
            ["mosquitto_sub", "-V", "5", "-h", host, "-p", port, "-t", topic + "/out", "-C", "1",
             "-q", "2", "-F", "%q|%C|%R|%D|%P|%p", "-W", "10"],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        await asyncio.sleep(0.5)  # mosquitto_sub says nothing when it has subscribed
        await bus.publish(
            topic + "/out",
            b"from-us",
            qos=2,
            content_type="text/plain",
            response_topic=topic + "/reply",
            correlation_data=b"cd",
            user_properties={"who": "mtor"},
        )
        out, _ = await asyncio.to_thread(sub.communicate, timeout=15)
        assert out.decode().strip() == f"2|text/plain|{topic}/reply|cd|who:mtor|from-us"

        pub = await asyncio.create_subprocess_exec(
            *["mosquitto_pub", "-V", "5", "-h", host, "-p", port, "-t", topic + "/in", "-q", "1",
              "-m", "from-them", "-D", "publish", "content-type", "application/x",
              "-D", "publish", "user-property", "k", "v",
              "-D", "publish", "correlation-data", "c9"],
        )  # fmt: skip
        assert await asyncio.wait_for(pub.wait(), 10) == 0
        msg = await got.wait_for(lambda m: True, timeout=5)
        assert (msg.payload, msg.content_type, msg.correlation_data) == (
            b"from-them",
            "application/x",
            b"c9",
        )
        assert msg.user_properties == (("k", "v"),)


async def test_qos2_exactly_once(config: Config) -> None:
    topic = f"mtor/{config.realm}/q2"
    async with running_bus(config) as bus:
        got = Collector()
        await bus.subscribe(topic, got, qos=2)
        for i in range(25):
            await bus.publish(topic, str(i), qos=2)  # each acknowledged before the next
        for i in range(25, 50):
            bus.post(topic, str(i), qos=2)  # pipelined through the in-flight window
        await bus.flush()
        await got.wait_count(50, timeout=10)
        await bus.publish(topic, b"end", qos=2)
        await got.wait_for(lambda m: m.payload == b"end", timeout=5)
    assert [m.payload for m in got.messages] == [str(i).encode() for i in range(50)] + [b"end"]
    assert {m.qos for m in got.messages} == {2}


@pytest.mark.parametrize("transport", ["tcp", "websockets"])
async def test_large_payloads_cross_many_reads(transport: str, realm: str) -> None:
    ws_port = free_port()
    with PrivateBroker(websocket_port=ws_port) as b:
        url = b.url if transport == "tcp" else f"ws://127.0.0.1:{ws_port}/"
        # Mosquitto 2.0.11's websocket listener never passes on a 1 MB publish (paho's
        # neither): 300 kB still takes many reads and a 64-bit frame length.
        big = os.urandom(3_000_000 if transport == "tcp" else 300_000)
        async with bus_on(url, realm) as bus:
            got = Collector()
            await bus.subscribe(f"mtor/{realm}/big", got)
            await bus.publish(f"mtor/{realm}/big", big, correlation_data=b"x")
            await bus.publish(f"mtor/{realm}/big", b"small")
            await got.wait_count(2, timeout=20)
    assert got.messages[0].payload == big
    assert got.messages[0].correlation_data == b"x"
    assert got.messages[1].payload == b"small"


async def test_keepalive_pings_hold_an_idle_connection(broker: PrivateBroker, realm: str) -> None:
    """Mosquitto drops a client silent for 1.5 keepalives: the pings must keep us."""
    conn = await connect(ConnectParams("127.0.0.1", broker.port, f"ka-{realm}", keepalive=1))
    try:
        await conn.subscribe(f"mtor/{realm}/ka", codec.subscribe_options(1))
        await asyncio.sleep(3.5)
        assert not conn.closed
        conn.publish(f"mtor/{realm}/ka", b"still here", qos=1)
        async with asyncio.timeout(5):
            await conn.wait_message()
        assert conn.inbox.popleft().payload == b"still here"
    finally:
        await conn.close()
    assert conn.closed


async def test_a_frozen_broker_is_detected(own_broker: PrivateBroker, realm: str) -> None:
    conn = await connect(ConnectParams("127.0.0.1", own_broker.port, f"fz-{realm}", keepalive=1))
    pid = own_broker.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(ConnectionLost, match="silent"):
            async with asyncio.timeout(5):
                await conn.wait_message()
    finally:
        os.kill(pid, signal.SIGCONT)
        await conn.close()


async def test_unacknowledged_posts_are_sent_after_the_broker_returns(
    own_broker: PrivateBroker, realm: str
) -> None:
    """QoS 1 posts written to a broker that froze and then died come back on reconnect."""
    topic = f"mtor/{realm}/ua"
    async with bus_on(own_broker.url, realm) as bus:
        got = Collector()
        await bus.subscribe(topic, got)
        await bus.publish(topic, b"before")
        await got.wait_count(1, timeout=5)
        pid = own_broker.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        for i in range(5):
            bus.post(topic, f"p{i}")  # written to the socket; no PUBACK ever comes
        await asyncio.sleep(0.2)
        own_broker.kill()  # SIGKILL works on a stopped process
        async with asyncio.timeout(10):
            while bus.connected:
                await asyncio.sleep(0.01)
        own_broker.start()
        await bus.wait_connected(10)
        await got.wait_count(6, timeout=10)
        await bus.publish(topic, b"after")
        await got.wait_for(lambda m: m.payload == b"after", timeout=5)
    assert [m.payload for m in got.messages] == [
        b"before",
        *(f"p{i}".encode() for i in range(5)),
        b"after",
    ]


async def test_backlog_pauses_reading_and_loses_nothing(
    config: Config, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(bus_module, "MAX_QUEUED_INCOMING", 100)
    topic = f"mtor/{config.realm}/bp"
    gate = asyncio.Event()
    seen: list[bytes] = []

    async def slow(msg: Inbound) -> None:
        await gate.wait()
        seen.append(msg.payload)

    async with running_bus(config) as subscriber, running_bus(config) as publisher:
        await subscriber.subscribe(topic, slow)
        for i in range(2000):
            publisher.post(topic, str(i))
        await publisher.flush()
        await asyncio.sleep(0.3)
        with caplog.at_level(logging.WARNING, logger="daemon.mqtt.connection"):
            gate.set()
            async with asyncio.timeout(20):
                while len(seen) < 2000:
                    await asyncio.sleep(0.01)
    assert seen == [str(i).encode() for i in range(2000)]
    assert "reading paused" in caplog.text


async def test_post_from_another_thread(config: Config) -> None:
    topic = f"mtor/{config.realm}/th"
    async with running_bus(config) as bus:
        got = Collector()
        await bus.subscribe(topic, got)
        thread = threading.Thread(target=lambda: bus.post(topic, b"from a thread"))
        thread.start()
        thread.join()
        await got.wait_for(lambda m: m.payload == b"from a thread", timeout=5)


async def after_connack(packet: bytes, expected_error: str) -> None:
    """A stand-in server answers CONNECT with CONNACK (success), then sends
    ``packet``: our connection must end with ConnectionLost matching ``expected_error``."""
    handled = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(1024)  # CONNECT
            writer.write(b"\x20\x03\x00\x00\x00" + packet)  # CONNACK: success, no properties
            await writer.drain()
            await reader.read(1024)  # EOF once the client has dropped us
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            handled.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        conn = await connect(ConnectParams("127.0.0.1", port, "stand-in"))
        with pytest.raises(ConnectionLost, match=expected_error):
            async with asyncio.timeout(5):
                await conn.wait_message()
        assert conn.closed
        await asyncio.wait_for(handled.wait(), 5)
    finally:
        server.close()
        await server.wait_closed()


async def test_malformed_packets_from_the_broker_close_the_connection() -> None:
    # A PUBLISH whose topic (length 9) runs past the packet (two bytes of it).
    await after_connack(b"\x30\x04\x00\x09ab", "malformed")


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 it signed."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.crt")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", "server.key", "-out", "server.csr")  # fmt: skip
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.crt")  # fmt: skip
    return directory / "ca.crt", directory / "server.crt", directory / "server.key"


async def test_tls_and_secure_websockets(tmp_path: Path, realm: str) -> None:
    ca, cert, key = _certificates(tmp_path)
    tls_port, wss_port = free_port(), free_port()
    files = f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
    extra = f"listener {tls_port} 127.0.0.1\n{files}listener {wss_port} 127.0.0.1\n"
    extra += f"protocol websockets\n{files}"
    with PrivateBroker(extra_config=extra):
        for url in (f"mqtts://127.0.0.1:{tls_port}", f"wss://127.0.0.1:{wss_port}/"):
            cfg = make_config(url, realm, broker={"tls": {"ca_file": str(ca)}})
            async with running_bus(cfg) as bus:
                got = Collector()
                await bus.subscribe(f"mtor/{realm}/tls", got)
                await bus.publish(f"mtor/{realm}/tls", url)
                await got.wait_for(lambda m, url=url: m.payload == url.encode(), timeout=5)
        # Certificates are checked: without the CA that signed the broker's, no connection.
        params = ConnectParams(
            "127.0.0.1", tls_port, "no-ca", tls=ssl.create_default_context(), connect_timeout=5
        )
        with pytest.raises(ConnectionLost, match="CERTIFICATE_VERIFY_FAILED"):
            await connect(params)


async def test_broker_receive_maximum_is_respected(realm: str) -> None:
    """Mosquitto announces max_inflight_messages as its Receive Maximum and drops a
    client that has more QoS 1 publishes unacknowledged: the window must hold."""
    with PrivateBroker(extra_config="max_inflight_messages 3\n") as b:
        async with bus_on(b.url, realm) as bus:
            assert bus._conn is not None
            assert bus._conn.server.get(codec.RECEIVE_MAXIMUM) == 3
            got = Collector()
            await bus.subscribe(f"mtor/{realm}/rm", got)
            for i in range(500):
                bus.post(f"mtor/{realm}/rm", str(i))
            await bus.flush()
            await got.wait_count(500, timeout=20)
            assert bus.connects == 1
    assert [m.payload for m in got.messages] == [str(i).encode() for i in range(500)]


async def test_session_takeover_is_survived(config: Config) -> None:
    """Another client connecting with our id: Mosquitto (2.0.11) closes our connection,
    without a DISCONNECT; the bus reconnects and takes the session back."""
    async with running_bus(config, client_id=f"dup-{config.realm}") as bus:
        ep = config.broker.endpoint
        other = await connect(ConnectParams(ep.host, ep.port, f"dup-{config.realm}"))
        async with asyncio.timeout(10):
            while bus.connects < 2:
                await asyncio.sleep(0.01)
        await other.close()
        got = Collector()
        await bus.subscribe(f"mtor/{config.realm}/after", got)
        await bus.publish(f"mtor/{config.realm}/after", b"still works")
        await got.wait_for(lambda m: m.payload == b"still works", timeout=5)


async def test_a_disconnect_from_the_broker_carries_its_reason() -> None:
    """MQTT 5 brokers may say why they close a connection (Mosquitto 2.0.11 does not:
    a server speaking the packet stands in for one that does)."""
    reason = codec.encode_properties({codec.REASON_STRING: "maintenance"})
    disconnect = codec.packet(0xE0, b"\x8b" + reason)  # 0x8B: server shutting down
    await after_connack(disconnect, "server shutting down: maintenance")


async def test_the_broker_keeps_packets_over_our_maximum_to_itself(
    broker: PrivateBroker, realm: str
) -> None:
    topic = f"mtor/{realm}/mps"
    small = await connect(
        ConnectParams("127.0.0.1", broker.port, f"mps-{realm}", max_packet_size=2048)
    )
    try:
        await small.subscribe(topic, codec.subscribe_options(1))
        async with bus_on(broker.url, realm) as bus:
            await bus.publish(topic, b"x" * 4096)
            await bus.publish(topic, b"fits")
        async with asyncio.timeout(5):
            await small.wait_message()
        assert [m.payload for m in small.inbox] == [b"fits"]
        assert not small.closed
    finally:
        await small.close()
