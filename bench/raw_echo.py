"""The floor of the project's own MQTT client: request/response on bare
:class:`daemon.mqtt.Connection` objects, no Bus, no models, no validation.

Same shape as :mod:`bench.mqtt_echo` (the aiomqtt floor): the responder
(``python -m bench.raw_echo HOST PORT TOPIC``) answers every message on
``TOPIC`` with its payload on the request's response topic and correlation
data, QoS 1 both ways; :class:`RawEchoClient` is the requesting side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator

from daemon.mqtt import Connection, ConnectParams, connect
from daemon.mqtt.codec import (
    CORRELATION_DATA,
    RESPONSE_TOPIC,
    publish_properties,
    subscribe_options,
)


def _params(host: str, port: int, name: str) -> ConnectParams:
    return ConnectParams(host, port, f"{name}-{uuid.uuid4().hex[:6]}", max_inflight=64)


async def respond(host: str, port: int, topic: str) -> None:
    conn = await connect(_params(host, port, "bench-raw-echo"))
    await conn.subscribe(topic, subscribe_options(1))
    while True:
        if not conn.inbox:
            await conn.wait_message()
        msg = conn.inbox.popleft()
        reply_to = msg.properties.get(RESPONSE_TOPIC)
        if reply_to:
            props = publish_properties(correlation_data=msg.properties.get(CORRELATION_DATA))
            conn.publish(reply_to, msg.payload, 1, False, props)


class RawEchoClient:
    def __init__(self, host: str, port: int, topic: str) -> None:
        self.host, self.port, self.topic = host, port, topic
        self.reply_topic = f"bench/reply/{uuid.uuid4().hex[:8]}"
        self.waiting: dict[bytes, asyncio.Future[bytes]] = {}
        self._ids = itertools.count()
        self._conn: Connection | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[RawEchoClient]:
        conn = await connect(_params(self.host, self.port, "bench-raw-rr"))
        self._conn = conn
        await conn.subscribe(self.reply_topic, subscribe_options(1))
        pump = asyncio.create_task(self._pump(conn))
        try:
            yield self
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            await conn.close()

    async def _pump(self, conn: Connection) -> None:
        while True:
            if not conn.inbox:
                await conn.wait_message()
            msg = conn.inbox.popleft()
            fut = self.waiting.pop(msg.properties.get(CORRELATION_DATA, b""), None)
            if fut is not None and not fut.done():
                fut.set_result(msg.payload)

    async def call(self, payload: bytes) -> bytes:
        assert self._conn is not None
        key = next(self._ids).to_bytes(8, "big")
        fut = asyncio.get_running_loop().create_future()
        self.waiting[key] = fut
        props = publish_properties(response_topic=self.reply_topic, correlation_data=key)
        self._conn.publish(self.topic, payload, 1, False, props)
        return await fut


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("topic")
    a = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(respond(a.host, a.port, a.topic))
