"""The floor: MQTT 5 request/response between two bare aiomqtt clients.

The responder (``python -m bench.mqtt_echo HOST PORT TOPIC``) answers every
message on ``TOPIC`` with its payload on the request's response topic, with
the same correlation data, QoS 1 both ways, TCP_NODELAY like the project's
bus.  :class:`EchoClient` is the requesting side, used in the benchmark
process.  No validation, no models: what any Python MQTT service pays at least.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def _client(host: str, port: int, name: str) -> aiomqtt.Client:
    return aiomqtt.Client(
        host,
        port,
        identifier=f"{name}-{uuid.uuid4().hex[:6]}",
        protocol=aiomqtt.ProtocolVersion.V5,
        socket_options=NODELAY,
        max_inflight_messages=64,
    )


async def respond(host: str, port: int, topic: str) -> None:
    async with _client(host, port, "bench-echo") as client:
        await client.subscribe(topic, qos=1)
        sending: set[asyncio.Task[None]] = set()  # don't wait for PUBACK before the next
        async for msg in client.messages:
            req = msg.properties
            reply_to = getattr(req, "ResponseTopic", None)
            if not reply_to:
                continue
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.CorrelationData = getattr(req, "CorrelationData", b"")
            task = asyncio.create_task(
                client.publish(reply_to, msg.payload, qos=1, properties=props)
            )
            sending.add(task)
            task.add_done_callback(sending.discard)


class EchoClient:
    def __init__(self, host: str, port: int, topic: str) -> None:
        self.host, self.port, self.topic = host, port, topic
        self.reply_topic = f"bench/reply/{uuid.uuid4().hex[:8]}"
        self.waiting: dict[bytes, asyncio.Future[bytes]] = {}
        self._client: aiomqtt.Client | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[EchoClient]:
        async with _client(self.host, self.port, "bench-rr") as client:
            self._client = client
            await client.subscribe(self.reply_topic, qos=1)
            pump = asyncio.create_task(self._pump(client))
            try:
                yield self
            finally:
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump

    async def _pump(self, client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            key = getattr(msg.properties, "CorrelationData", b"")
            fut = self.waiting.pop(key, None)
            if fut is not None and not fut.done():
                payload = msg.payload
                fut.set_result(payload if isinstance(payload, bytes) else b"")

    async def call(self, payload: bytes) -> bytes:
        assert self._client is not None
        key = uuid.uuid4().bytes
        fut = asyncio.get_running_loop().create_future()
        self.waiting[key] = fut
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = key
        await self._client.publish(self.topic, payload, qos=1, properties=props)
        return await fut


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("topic")
    a = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(respond(a.host, a.port, a.topic))
