"""The MQTT 5 bus: the one broker connection of a process.

:class:`Bus` owns an aiomqtt client inside a supervised reconnect loop (capped
exponential backoff with jitter).  On every connect it subscribes every
registered filter again, flushes what was published while it was away, and
runs the ``on_connect`` hooks (birth, adverts) — in that order, so a birth is
only seen once the node can hear replies.

* Each filter gets an MQTT 5 subscription identifier; an incoming message is
  dispatched to the handlers of exactly the subscriptions it matched, once.
* Handlers are isolated: one that raises is logged and dispatch goes on.
* Publishing is flow-controlled: at most ``max_inflight`` publishes await the
  broker at once; callers wait for a slot instead of buffering without bound.
  While disconnected, publishes go to a bounded outbox (oldest dropped).
* Refused credentials or authorisation is fatal (:class:`BusAuthError`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import re
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from daemon.config import BrokerConfig
from daemon.errors import BusAuthError, BusError, BusNotConnectedError
from daemon.messages import Message, encode
from daemon.mqttprops import FastProperties
from daemon.mqttprops import install as install_fast_properties
from daemon.topics import matches, validate_filter

log = logging.getLogger(__name__)

# CONNACK reason codes that no retry can fix (MQTT 5: 0x86, 0x87, 0x8C; MQTT 3.1.1: 4, 5).
AUTH_FAILURES: Final = frozenset({134, 135, 140, 4, 5})
# A dispatch queue this deep means handlers cannot keep up; paho drops beyond it.
MAX_QUEUED_INCOMING: Final = 50_000
# Messages the MQTT client may queue beyond its in-flight window (Bus.post).
MAX_QUEUED_OUTGOING: Final = 20_000
# Payloads in log lines are cut to this many bytes.
LOG_PAYLOAD_BYTES: Final = 200
# How long a publish may wait for the broker's acknowledgement before it is retried.
PUBLISH_TIMEOUT: Final = 10.0
# QoS 1/2 messages the broker may have in flight to us (MQTT 5 Receive Maximum).  Left
# unsaid, Mosquitto allows 20 and queues 1,000 more (max_queued_messages), then drops
# *silently*: a process whose loop is busy for a moment lost messages in a burst.  paho
# acknowledges on read, so the real bound is MAX_QUEUED_INCOMING on our side.
RECEIVE_MAXIMUM: Final = 65_535

Payload = bytes | str | Message


@dataclass(frozen=True, slots=True)
class Inbound:
    """An incoming message, decoupled from the MQTT library."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    response_topic: str | None = None
    correlation_data: bytes | None = None
    content_type: str | None = None
    user_properties: tuple[tuple[str, str], ...] = ()

    def preview(self) -> str:
        return truncate(self.payload)


Handler = Callable[[Inbound], Awaitable[None]]
Hook = Callable[[], Awaitable[None]]


_SECRET_FIELD = re.compile(r'("(?:token|password|api_key|secret)"\s*:\s*)"[^"]*"?')


def truncate(payload: bytes, limit: int = LOG_PAYLOAD_BYTES) -> str:
    """A payload for a log line: cut to ``limit`` bytes, secrets masked."""
    text = _SECRET_FIELD.sub(r'\1"***"', payload[:limit].decode("utf-8", errors="replace"))
    return text + (f"...(+{len(payload) - limit} bytes)" if len(payload) > limit else "")


@dataclass(slots=True)
class Subscription:
    topic_filter: str
    qos: int
    sub_id: int
    no_local: bool = False
    handlers: list[Handler] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties | None


def publish_properties(
    *,
    content_type: str | None = None,
    response_topic: str | None = None,
    correlation_data: bytes | None = None,
    expiry: float | None = None,
    user_properties: dict[str, str] | None = None,
) -> Properties | None:
    if not (content_type or response_topic or correlation_data or expiry or user_properties):
        return None
    props = FastProperties(PacketTypes.PUBLISH)
    if content_type:
        props.ContentType = content_type
    if response_topic:
        props.ResponseTopic = response_topic
    if correlation_data:
        props.CorrelationData = correlation_data
    if expiry:
        props.MessageExpiryInterval = max(1, int(expiry + 0.999))
    if user_properties:
        props.UserProperty = list(user_properties.items())
    return props


def to_bytes(payload: Payload) -> bytes:
    if isinstance(payload, Message):
        return encode(payload)
    return payload.encode() if isinstance(payload, str) else payload


class Bus:
    """One MQTT 5 connection with reconnect, resubscribe, hooks and flow control."""

    def __init__(
        self,
        config: BrokerConfig,
        client_id: str,
        *,
        password: str | None = None,
        will: tuple[str, Payload] | None = None,
        clean_start: bool = True,
    ) -> None:
        install_fast_properties()  # paho decodes MQTT 5 properties 3x cheaper (idempotent)
        self.config = config
        self.client_id = client_id
        self._password = password
        self._will = will
        self._clean_start = clean_start
        self._client: aiomqtt.Client | None = None
        self._inbox: asyncio.Queue[aiomqtt.Message] | None = None
        self._connected = asyncio.Event()
        self._subs: dict[str, Subscription] = {}
        self._by_id: dict[int, Subscription] = {}
        self._ids = itertools.count(1)
        self._hooks: list[Hook] = []
        self._inflight_n = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._backlog: deque[Outgoing] = deque()
        self._outbox: deque[Outgoing] = deque(maxlen=config.outbox_size or None)
        self._background: set[asyncio.Task[None]] = set()
        self.connects = 0
        self.dropped = 0
        self.handler_errors = 0

    # ------------------------------------------------------------------ state

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float | None = None) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        except TimeoutError as exc:
            raise BusNotConnectedError(
                f"no connection to the broker at {self.config.url} after {timeout:g}s"
            ) from exc

    def on_connect(self, hook: Hook) -> None:
        """Run ``hook`` after every (re)connect, once subscriptions are in place."""
        self._hooks.append(hook)

    # -------------------------------------------------------------- subscribe

    async def subscribe(
        self, topic_filter: str, handler: Handler, qos: int = 1, *, no_local: bool = False
    ) -> None:
        """Call ``handler`` for every message matching ``topic_filter``.

        Registered filters survive reconnects.  When connected, this returns
        once the broker has acknowledged the subscription.
        """
        validate_filter(topic_filter)
        sub = self._subs.get(topic_filter)
        if sub is not None:
            sub.handlers.append(handler)
            return
        sub = Subscription(topic_filter, qos, next(self._ids), no_local, [handler])
        self._subs[topic_filter] = sub
        self._by_id[sub.sub_id] = sub
        client = self._client
        if client is not None and self.connected:
            with contextlib.suppress(aiomqtt.MqttError):  # resubscribed on reconnect
                await self._subscribe(client, sub)

    async def unsubscribe(self, topic_filter: str) -> None:
        sub = self._subs.pop(topic_filter, None)
        if sub is None:
            return
        self._by_id.pop(sub.sub_id, None)
        client = self._client
        if client is not None and self.connected:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.unsubscribe(topic_filter)

    async def _subscribe(self, client: aiomqtt.Client, sub: Subscription) -> None:
        props = FastProperties(PacketTypes.SUBSCRIBE)
        props.SubscriptionIdentifier = sub.sub_id
        options = SubscribeOptions(qos=sub.qos, noLocal=sub.no_local)
        granted = await client.subscribe(sub.topic_filter, options=options, properties=props)
        for code in granted:
            value = getattr(code, "value", code)
            if isinstance(value, int) and value >= 0x80:
                log.error(
                    "broker refused subscription to %s (reason %s): check the ACL",
                    sub.topic_filter,
                    code,
                )

    # ---------------------------------------------------------------- publish

    def _outgoing(
        self,
        topic: str,
        payload: Payload,
        qos: int,
        retain: bool,
        **props: Any,
    ) -> Outgoing:
        return Outgoing(topic, to_bytes(payload), qos, retain, publish_properties(**props))

    async def publish(
        self,
        topic: str,
        payload: Payload,
        *,
        qos: int = 1,
        retain: bool = False,
        content_type: str | None = None,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        expiry: float | None = None,
        user_properties: dict[str, str] | None = None,
        wait: bool = True,
    ) -> None:
        """Publish a message (a :class:`Message` is encoded as JSON).

        Waits for a flow-control slot.  With ``wait=True`` it then waits for
        the broker's acknowledgement; with ``wait=False`` it returns as soon as
        the message is handed over.  While disconnected the message is kept in
        the outbox and sent on reconnect.
        """
        out = self._outgoing(
            topic,
            payload,
            qos,
            retain,
            content_type=content_type,
            response_topic=response_topic,
            correlation_data=correlation_data,
            expiry=expiry,
            user_properties=user_properties,
        )
        await self._acquire()
        if wait:
            try:
                await self._send(out)
            finally:
                self._release()
            return
        self._start(out)

    def post(
        self,
        topic: str,
        payload: Payload,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation_data: bytes | None = None,
        expiry: float | None = None,
        content_type: str | None = None,
        response_topic: str | None = None,
    ) -> None:
        """Publish from synchronous code (timers, hot paths) without waiting.

        Connected, the message goes straight to the MQTT client's send queue,
        whose in-flight window is ``max_inflight`` and whose queue is bounded
        (``MAX_QUEUED_OUTGOING``) — no task per message, which is what the
        orchestrator's throughput depends on.  Otherwise (offline, or that
        queue full) it takes the flow-controlled path: a backlog that drains
        in order, or the outbox while disconnected.
        """
        out = self._outgoing(
            topic,
            payload,
            qos,
            retain,
            correlation_data=correlation_data,
            expiry=expiry,
            content_type=content_type,
            response_topic=response_topic,
        )
        client = self._client
        if client is not None and self.connected and not self._backlog:
            paho = client._client
            info = paho.publish(out.topic, out.payload, out.qos, out.retain, out.properties)
            if info.rc == 0:
                return
        if self._inflight_n < self.config.max_inflight and not self._backlog:
            self._inflight_n += 1
            self._start(out)
        else:
            self._backlog.append(out)

    async def _acquire(self) -> None:
        loop = asyncio.get_running_loop()
        while self._inflight_n >= self.config.max_inflight or self._backlog:
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
        self._inflight_n += 1

    def _release(self) -> None:
        self._inflight_n -= 1
        if self._backlog:
            self._inflight_n += 1
            self._start(self._backlog.popleft())
            return
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
                break

    def _start(self, out: Outgoing) -> None:
        """Send ``out`` in the background; its slot is already taken."""
        task = asyncio.create_task(self._send(out))
        self._background.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        self._release()
        if not task.cancelled() and task.exception() is not None:
            log.error("background publish failed", exc_info=task.exception())

    async def _send(self, out: Outgoing) -> None:
        client = self._client
        if client is None or not self.connected:
            self._keep(out)
            return
        try:
            await client.publish(
                out.topic,
                out.payload,
                qos=out.qos,
                retain=out.retain,
                properties=out.properties,
                timeout=PUBLISH_TIMEOUT,
            )
        except aiomqtt.MqttError as exc:
            log.debug("publish to %s failed (%s); kept for reconnect", out.topic, exc)
            self._keep(out)

    def _keep(self, out: Outgoing) -> None:
        if self._outbox.maxlen == 0 or out.qos == 0:
            self.dropped += 1
            return
        if self._outbox.maxlen is not None and len(self._outbox) == self._outbox.maxlen:
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                log.warning("outbox full: %d message(s) dropped while offline", self.dropped)
        self._outbox.append(out)

    async def flush(self) -> None:
        """Wait until every background publish has been acknowledged."""
        while self._background or self._backlog:
            if self._background:
                await asyncio.gather(*list(self._background), return_exceptions=True)
            else:
                await asyncio.sleep(0)

    # -------------------------------------------------------------- lifecycle

    def _make_client(self) -> aiomqtt.Client:
        ep = self.config.endpoint
        will = None
        if self._will is not None:
            topic, payload = self._will
            will = aiomqtt.Will(topic, to_bytes(payload), qos=1, retain=True)
        tls_context = self._tls_context() if ep.tls else None
        socket_options: list[tuple[int, int, int]] = []
        if ep.transport != "unix":
            # Without TCP_NODELAY a QoS 1 round trip costs 40-90 ms (Nagle + delayed ACK).
            socket_options.append((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1))
        connect_props = FastProperties(PacketTypes.CONNECT)
        connect_props.SessionExpiryInterval = 0
        connect_props.ReceiveMaximum = RECEIVE_MAXIMUM
        bus = self

        class Inbox(asyncio.Queue[aiomqtt.Message]):
            """aiomqtt's incoming queue, kept so a backlog drains without a task per message."""

            def __init__(self, maxsize: int = 0) -> None:
                super().__init__(maxsize)
                bus._inbox = self

        client = aiomqtt.Client(
            ep.host,
            ep.port or 1,  # paho rejects port 0 even for unix sockets, where it is unused
            username=self.config.username,
            password=self._password,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=will,
            transport=ep.transport,
            timeout=self.config.connect_timeout,
            keepalive=self.config.keepalive,
            clean_start=self._clean_start,
            properties=connect_props,
            max_queued_incoming_messages=MAX_QUEUED_INCOMING,
            queue_type=Inbox,
            max_inflight_messages=self.config.max_inflight,
            max_queued_outgoing_messages=MAX_QUEUED_OUTGOING,
            tls_context=tls_context,
            tls_insecure=self.config.tls.insecure if ep.tls else None,
            socket_options=socket_options,
            websocket_path=ep.path if ep.transport == "websockets" else None,
        )
        # aiomqtt warns past 10 pending publishes; our flow control (max_inflight)
        # is the real bound, so only warn beyond it.
        client.pending_calls_threshold = self.config.max_inflight + 1
        _write_in_loop(client)
        return client

    def _tls_context(self) -> ssl.SSLContext:
        tls = self.config.tls
        try:
            ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
            if tls.cert_file:
                ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise BusError(f"TLS setup failed: {exc}") from exc
        if tls.insecure:
            ctx.check_hostname = False
        return ctx

    async def run(self) -> None:
        """Stay connected until cancelled.  Raises :class:`BusAuthError` on refusal."""
        attempt = 0
        rc = self.config.reconnect
        while True:
            try:
                async with self._make_client() as client:
                    attempt = 0
                    await self._session(client)
            except aiomqtt.MqttCodeError as exc:
                code = getattr(exc.rc, "value", exc.rc)
                if isinstance(code, int) and code in AUTH_FAILURES:
                    raise BusAuthError(
                        f"broker {self.config.url} refused the connection: {exc}. "
                        "Check broker.username / password and the broker's ACL."
                    ) from exc
                self._lost(exc, attempt)
            except aiomqtt.MqttError as exc:
                self._lost(exc, attempt)
            finally:
                self._connected.clear()
                self._client = None
            delay = rc.initial_delay * (2 ** min(attempt, 30))
            delay *= 1 + random.uniform(-rc.jitter, rc.jitter)
            delay = min(rc.max_delay, delay)  # capped after the jitter: never past max_delay
            attempt += 1
            await asyncio.sleep(delay)

    def _lost(self, exc: Exception, attempt: int) -> None:
        if self.connects and attempt == 0:
            log.warning("lost the broker at %s: %s; reconnecting", self.config.url, exc)
        elif attempt in (0, 3) or attempt % 20 == 0:
            log.warning("cannot reach the broker at %s: %s (retrying)", self.config.url, exc)

    async def _session(self, client: aiomqtt.Client) -> None:
        self._client = client
        for sub in list(self._subs.values()):
            await self._subscribe(client, sub)
        self._connected.set()
        self.connects += 1
        log.info("connected to %s as %s", self.config.url, self.client_id)
        pending = list(self._outbox)
        self._outbox.clear()
        for out in pending:
            await self._send(out)
        for hook in self._hooks:
            try:
                await hook()
            except aiomqtt.MqttError:
                raise
            except Exception:
                log.exception("on-connect hook %s failed", getattr(hook, "__qualname__", hook))
        inbox = self._inbox
        async for message in client.messages:
            await self._dispatch(message)
            # aiomqtt's iterator spends a task and an asyncio.wait on every message;
            # under load, take what has already arrived straight from its queue.
            while inbox is not None and not inbox.empty():
                await self._dispatch(inbox.get_nowait())

    async def _dispatch(self, message: aiomqtt.Message) -> None:
        props = message.properties
        inbound = Inbound(
            topic=message.topic.value,
            payload=_payload_bytes(message.payload),
            qos=message.qos,
            retain=message.retain,
            response_topic=getattr(props, "ResponseTopic", None),
            correlation_data=getattr(props, "CorrelationData", None),
            content_type=getattr(props, "ContentType", None),
            user_properties=tuple(getattr(props, "UserProperty", ()) or ()),
        )
        ids = getattr(props, "SubscriptionIdentifier", None)
        if ids:
            subs = [self._by_id[i] for i in ids if i in self._by_id]
        else:
            subs = [s for s in self._subs.values() if matches(s.topic_filter, inbound.topic)]
        for sub in subs:
            for handler in list(sub.handlers):
                try:
                    await handler(inbound)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self.handler_errors += 1
                    log.exception(
                        "handler %s failed on %s (payload %s)",
                        getattr(handler, "__qualname__", handler),
                        inbound.topic,
                        inbound.preview(),
                    )

    async def drain(self, timeout: float = 2.0) -> None:
        """Wait (bounded) for background publishes before the run task is cancelled.

        Cancelling :meth:`run` disconnects gracefully, so the will is not sent.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.flush()


def _write_in_loop(client: aiomqtt.Client) -> None:
    """Write queued packets from the event loop itself, once per loop iteration.

    aiomqtt asks for writability on every publish with
    ``call_soon_threadsafe(add_writer)`` (it may be called from its connect
    thread): a self-pipe write, two ``epoll_ctl`` calls and two more loop
    iterations per message before the packet leaves.  On the loop thread we
    instead schedule one ``loop_write`` for the current batch of publishes;
    only if the socket cannot take everything (or off the loop thread) does
    aiomqtt's writer registration take over.
    """
    paho = getattr(client, "_client", None)  # aiomqtt keeps its paho client here (2.x)
    register = getattr(paho, "on_socket_register_write", None)
    if paho is None or register is None:
        return
    loop = asyncio.get_running_loop()
    scheduled = False

    def flush(sock: Any) -> None:
        nonlocal scheduled
        scheduled = False
        if paho.socket() is None:  # disconnected since: nothing to write to
            return
        try:
            paho.loop_write()
        except Exception:  # aiomqtt's writer callback handles (and reports) it
            if paho.socket() is not None:
                register(paho, None, sock)
            return
        # Socket full: wait for writability the usual way (unless writing the
        # DISCONNECT just closed it).
        if paho.want_write() and paho.socket() is not None:
            register(paho, None, sock)

    def on_register_write(c: Any, userdata: Any, sock: Any) -> None:
        nonlocal scheduled
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not loop:
            register(c, userdata, sock)
        elif not scheduled:
            scheduled = True
            loop.call_soon(flush, sock)

    paho.on_socket_register_write = on_register_write


def _payload_bytes(payload: Any) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    if payload is None:
        return b""
    return str(payload).encode()
