"""The same request/response floor on paho-mqtt 2, the way paho is meant to be used.

Same shape as :mod:`bench.raw_echo` and :mod:`bench.mqtt_echo`: the responder
(``python -m bench.paho_echo HOST PORT TOPIC``) answers every message on
``TOPIC`` with its payload on the request's response topic and correlation
data, QoS 1 both ways, MQTT 5, TCP_NODELAY, at most 64 QoS 1 publishes in
flight.  Both sides run paho's own network thread (``loop_start``) and do
their work in its callbacks: the responder publishes the reply from
``on_message``; :class:`PahoRequester` keeps ``inflight`` requests
outstanding by sending the next one from the callback that received a reply.
No asyncio and no cross-thread hand-off per message, so this is paho at its
cheapest, not paho behind an asyncio bridge.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

MAX_INFLIGHT: Final = 64
CONNECT_TIMEOUT: Final = 10.0
PAYLOAD: Final = b'{"text":"hello realm","n":42}'


def _on_socket_open(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):  # a websocket wrapper has no setsockopt
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


OnMessage = Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None]


def _started(host: str, port: int, name: str, topic: str, on_message: OnMessage) -> mqtt.Client:
    """A connected client with its network thread running, subscribed to ``topic``."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"{name}-{uuid.uuid4().hex[:6]}",
        protocol=mqtt.MQTTv5,
    )
    client.max_inflight_messages_set(MAX_INFLIGHT)
    client.on_socket_open = _on_socket_open
    client.on_message = on_message
    subscribed = threading.Event()
    client.on_subscribe = lambda *_args: subscribed.set()
    client.connect(host, port, keepalive=60)
    client.loop_start()
    client.subscribe(topic, qos=1)
    if not subscribed.wait(CONNECT_TIMEOUT):
        client.loop_stop()
        raise TimeoutError(f"paho: no SUBACK for {topic} from {host}:{port}")
    return client


def respond(host: str, port: int, topic: str) -> None:
    def on_message(client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        req = msg.properties
        reply_to = getattr(req, "ResponseTopic", None)
        if not reply_to:
            return
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = getattr(req, "CorrelationData", b"")
        client.publish(reply_to, msg.payload, qos=1, properties=props)

    _started(host, port, "bench-paho-echo", topic, on_message)
    threading.Event().wait()  # the network thread does the work


class PahoRequester:
    """Closed-loop requests: each reply's callback sends the next request."""

    def __init__(self, host: str, port: int, topic: str) -> None:
        self.host, self.port, self.topic = host, port, topic
        self.reply_topic = f"bench/reply/{uuid.uuid4().hex[:8]}"
        self._ids = itertools.count()
        self._lock = threading.Lock()  # callbacks run on paho's thread, start() on ours
        self._sent: dict[bytes, float] = {}
        self._latencies_ms: list[float] = []
        self._deadline = 0.0
        self._drained = threading.Event()
        self._client: mqtt.Client | None = None

    def start(self) -> None:
        self._client = _started(
            self.host, self.port, "bench-paho-rr", self.reply_topic, self._on_message
        )

    def stop(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()

    def _send(self) -> None:
        assert self._client is not None
        key = next(self._ids).to_bytes(8, "big")
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = key
        with self._lock:
            self._sent[key] = time.perf_counter()
        self._client.publish(self.topic, PAYLOAD, qos=1, properties=props)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        key = getattr(msg.properties, "CorrelationData", b"")
        with self._lock:
            t0 = self._sent.pop(key, None)
            if t0 is None:
                return  # a reply to a probe that timed out
            self._latencies_ms.append((now - t0) * 1000)
            more = now < self._deadline
            if not more and not self._sent:
                self._drained.set()
        if more:
            self._send()

    def probe(self, timeout: float) -> bool:
        """One round trip within ``timeout`` (the responder may not have subscribed yet)."""
        self._latencies_ms = []
        self._drained.clear()
        self._deadline = 0.0  # answer it, send nothing more
        self._send()
        ok = self._drained.wait(timeout)
        with self._lock:
            self._sent.clear()
        return ok

    def run(self, seconds: float, inflight: int) -> tuple[list[float], float]:
        """Keep ``inflight`` requests outstanding for ``seconds``, then drain.

        Returns the round-trip latencies (ms) and the elapsed time (s), drain included.
        """
        with self._lock:
            self._latencies_ms = []
            self._drained.clear()
            start = time.perf_counter()
            self._deadline = start + seconds
        for _ in range(inflight):
            self._send()
        if not self._drained.wait(seconds + CONNECT_TIMEOUT):
            raise TimeoutError(f"paho: {len(self._sent)} requests unanswered")
        return self._latencies_ms, time.perf_counter() - start


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("topic")
    a = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        respond(a.host, a.port, a.topic)
