"""The MQTT 5 bus: the one broker connection of a process.

:class:`Bus` owns a :class:`daemon.mqtt.Connection` inside a supervised reconnect loop (capped
exponential backoff with jitter).  On every connect it subscribes every
registered filter again, flushes what was published while it was away, and
runs the ``on_connect`` hooks (birth, adverts) — in that order, so a birth is
only seen once the node can hear replies.

* Each filter gets an MQTT 5 subscription identifier; an incoming message is
  dispatched to the handlers of exactly the subscriptions it matched, once.
* Handlers are isolated: one that raises is logged and dispatch goes on.
* Publishing is flow-controlled: at most ``max_inflight`` publishes await the
  broker at once; callers wait for a slot instead of buffering without bound.
  While disconnected, publishes go to a bounded outbox (oldest dropped), and
  QoS 1 publishes the broker had not acknowledged when the connection dropped
  are put back there too.
* Refused credentials or authorisation is fatal (:class:`BusAuthError`).
* Topics made from data are checked before anything is sent: a topic that is
  not a valid MQTT topic name (empty, a wildcard, U+0000, not UTF-8, too long)
  or a payload that cannot be encoded is refused — :meth:`Bus.publish` raises
  :class:`BusPublishError`, :meth:`Bus.post` drops it with a log line — so it
  never gets the connection closed.  A publish the broker refuses (a reason
  code, or closing the connection on it) is never replayed forever either:
  see :class:`daemon.mqtt.PublishRejected` and ``MAX_STRIKES``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import re
import ssl
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Final

from daemon.config import BrokerConfig
from daemon.errors import (
    BusAuthError,
    BusError,
    BusNotConnectedError,
    BusPublishError,
    MessageError,
)
from daemon.messages import Message, encode
from daemon.mqtt import (
    Connection,
    ConnectionLost,
    ConnectParams,
    ConnectRefused,
    MqttError,
    Outgoing,
    Publish,
    PublishRejected,
    Will,
    connect,
)
from daemon.mqtt.codec import (
    CONTENT_TYPE,
    CORRELATION_DATA,
    RESPONSE_TOPIC,
    SUBSCRIPTION_ID,
    USER_PROPERTY,
    publish_properties,
    reason_text,
    subscribe_options,
)
from daemon.textcheck import text_problem, topic_name_problem, valid_topic_name
from daemon.topics import matches, validate_filter

log = logging.getLogger(__name__)

# CONNACK reason codes that no retry can fix: bad user name or password, not
# authorized, bad authentication method (MQTT 5, 3.2.2.2).
AUTH_FAILURES: Final = frozenset({0x86, 0x87, 0x8C})
# A dispatch queue this deep means handlers cannot keep up: the connection stops
# reading (TCP back-pressure to the broker) until dispatch catches up.
MAX_QUEUED_INCOMING: Final = 50_000
# Messages the connection may queue beyond its in-flight window (Bus.post).
MAX_QUEUED_OUTGOING: Final = 20_000
# Payloads in log lines are cut to this many bytes.
LOG_PAYLOAD_BYTES: Final = 200
# How long a publish may wait for the broker's acknowledgement before it is retried.
PUBLISH_TIMEOUT: Final = 10.0
# QoS 1/2 messages the broker may have in flight to us (MQTT 5 Receive Maximum).  Left
# unsaid, Mosquitto allows 20 and queues 1,000 more (max_queued_messages), then drops
# *silently*: a process whose loop is busy for a moment lost messages in a burst.  The
# connection acknowledges on read, so the real bound is MAX_QUEUED_INCOMING on our side.
RECEIVE_MAXIMUM: Final = 65_535
# A publish that was the oldest one the broker had not acknowledged when it closed the
# connection, this many times, is dropped: a broker that closes on a bad packet without
# saying why would otherwise get it first on every reconnect, forever.
MAX_STRIKES: Final = 3
# Refused posts: each of the first ones gets a log line, then every 1000th.
LOGGED_REFUSALS: Final = 10

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


def to_bytes(payload: Payload) -> bytes:
    if isinstance(payload, Message):
        return encode(payload)
    return payload.encode() if isinstance(payload, str) else payload


def _check_properties(props: dict[str, Any]) -> None:
    """The strings of a PUBLISH's properties: a response topic must be a topic name;
    no string may hold U+0000 or a lone surrogate (MQTT 5, 1.5.4)."""
    response_topic = props.get("response_topic")
    if response_topic and not valid_topic_name(response_topic):
        raise BusPublishError(
            f"response topic {response_topic[:200]!r} is not a valid topic name "
            f"({topic_name_problem(response_topic)})"
        )
    texts = [props.get("content_type") or ""]
    for key, value in (props.get("user_properties") or {}).items():
        texts += [key, value]
    for text in texts:
        problem = text_problem(text)
        if problem is not None:
            raise BusPublishError(f"property {text[:200]!r} {problem}")


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
        self.config = config
        self.client_id = client_id
        self._password = password
        self._will = will
        self._clean_start = clean_start
        self._conn: Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None
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
        self.refused = 0
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
        conn = self._conn
        if conn is not None and self.connected:
            with contextlib.suppress(MqttError):  # resubscribed on reconnect
                await self._subscribe(conn, sub)

    async def unsubscribe(self, topic_filter: str) -> None:
        sub = self._subs.pop(topic_filter, None)
        if sub is None:
            return
        self._by_id.pop(sub.sub_id, None)
        conn = self._conn
        if conn is not None and self.connected:
            with contextlib.suppress(MqttError):
                await conn.unsubscribe(topic_filter)

    async def _subscribe(self, conn: Connection, sub: Subscription) -> None:
        options = subscribe_options(sub.qos, no_local=sub.no_local)
        granted = await conn.subscribe(sub.topic_filter, options, sub.sub_id)
        for code in granted:
            if code >= 0x80:
                log.error(
                    "broker refused subscription to %s (%s): check the ACL",
                    sub.topic_filter,
                    reason_text(code),
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
        """What to send; :class:`BusPublishError` when it could not be sent as asked."""
        if qos not in (0, 1, 2):
            raise ValueError(f"QoS must be 0, 1 or 2, not {qos!r}")
        if not valid_topic_name(topic):
            raise BusPublishError(
                f"not a valid MQTT topic name ({topic_name_problem(topic)}): {topic[:200]!r}"
            )
        if props.get("response_topic") or props.get("content_type") or props.get("user_properties"):
            _check_properties(props)
        try:
            data = to_bytes(payload)
        except (MessageError, UnicodeEncodeError) as exc:
            raise BusPublishError(f"cannot publish to {topic[:200]!r}: {exc}") from exc
        return Outgoing(topic, data, qos, retain, publish_properties(**props))

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

        :class:`BusPublishError` when the topic is not a valid topic name or
        the payload cannot be encoded (at once), or, with ``wait=True``, when
        the broker refused the publish.
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
                await self._send(out, waiter=True)
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
        in order, or the outbox while disconnected.  A topic that is not a valid
        topic name, or a payload that cannot be encoded, is dropped with a log line.
        """
        try:
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
        except BusPublishError as exc:
            self._refused(exc)
            return
        if self._thread is not None and threading.get_ident() != self._thread:
            # A worker thread (inference, a sensor driver): hand it to the loop's thread.
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._post, out)
            return
        self._post(out)

    def _post(self, out: Outgoing) -> None:
        conn = self._conn
        if (
            conn is not None
            and self.connected
            and not self._backlog
            and conn.queued < MAX_QUEUED_OUTGOING
        ):
            try:
                conn.publish(out.topic, out.payload, out.qos, out.retain, out.props)
            except PublishRejected:
                return  # it can never be sent (the connection logged why)
            except MqttError:
                pass  # lost since: the slow path keeps it
            else:
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

    async def _send(self, out: Outgoing, *, waiter: bool = False) -> None:
        """Send and await the broker's acknowledgement; kept for the next connection
        if this one is lost.  A refusal raises :class:`BusPublishError` for a
        ``waiter`` (else the connection has logged it)."""
        conn = self._conn
        if conn is None or not self.connected:
            self._keep(out)
            return
        try:
            acked = conn.publish(
                out.topic,
                out.payload,
                out.qos,
                out.retain,
                out.props,
                ack=True,
                strikes=out.strikes,
            )
            if acked is not None:
                async with asyncio.timeout(PUBLISH_TIMEOUT):
                    reason = await acked
                if reason >= 0x80 and waiter:
                    raise BusPublishError(
                        f"the broker refused the publish to {out.topic[:200]!r} "
                        f"({reason_text(reason)})"
                    )
        except PublishRejected as exc:
            if waiter:
                raise BusPublishError(str(exc)) from exc
        except (MqttError, TimeoutError) as exc:
            log.debug("publish to %s failed (%s); kept for reconnect", out.topic, exc)
            if isinstance(exc, ConnectionLost) and exc.strike:
                out = replace(out, strikes=out.strikes + 1)
            self._keep(out)

    def _refused(self, exc: BusPublishError) -> None:
        self.refused += 1
        if self.refused <= LOGGED_REFUSALS or self.refused % 1000 == 0:
            log.warning("publish dropped: %s (%d refused so far)", exc, self.refused)

    def _keep(self, out: Outgoing) -> None:
        if out.strikes >= MAX_STRIKES:
            self.dropped += 1
            log.warning(
                "publish to %s dropped: the broker closed the connection %d times while it "
                "was the oldest unacknowledged one",
                out.topic[:200],
                out.strikes,
            )
            return
        if self._outbox.maxlen == 0 or out.qos == 0:
            self.dropped += 1
            return
        if self._outbox.maxlen is not None and len(self._outbox) == self._outbox.maxlen:
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                log.warning("outbox full: %d message(s) dropped while offline", self.dropped)
        self._outbox.append(out)

    async def flush(self) -> None:
        """Wait until every publish made so far has been acknowledged by the broker
        (or kept in the outbox, if the connection dropped meanwhile)."""
        while self._background or self._backlog:
            if self._background:
                await asyncio.gather(*list(self._background), return_exceptions=True)
            else:
                await asyncio.sleep(0)
        conn = self._conn
        if conn is not None:
            await conn.wait_acknowledged()

    # -------------------------------------------------------------- lifecycle

    def _params(self) -> ConnectParams:
        ep = self.config.endpoint
        will = None
        if self._will is not None:
            topic, payload = self._will
            will = Will(topic, to_bytes(payload), qos=1, retain=True)
        return ConnectParams(
            host=ep.host,
            port=ep.port,
            client_id=self.client_id,
            transport=ep.transport,
            websocket_path=ep.path or "/",
            tls=self._tls_context() if ep.tls else None,
            username=self.config.username,
            password=self._password,
            keepalive=self.config.keepalive,
            clean_start=self._clean_start,
            will=will,
            receive_maximum=RECEIVE_MAXIMUM,
            max_inflight=self.config.max_inflight,
            connect_timeout=self.config.connect_timeout,
            max_queued_incoming=MAX_QUEUED_INCOMING,
            max_packet_size=self.config.max_packet_size,
        )

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
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        while True:
            conn: Connection | None = None
            try:
                conn = await connect(self._params())
                attempt = 0
                await self._session(conn)
            except ConnectRefused as exc:
                if exc.code in AUTH_FAILURES:
                    raise BusAuthError(
                        f"broker {self.config.url} refused the connection: {exc}. "
                        "Check broker.username / password and the broker's ACL."
                    ) from exc
                self._lost(exc, attempt)
            except MqttError as exc:
                self._lost(exc, attempt)
            finally:
                self._connected.clear()
                self._conn = None
                if conn is not None:
                    await self._closed(conn)
            delay = rc.initial_delay * (2 ** min(attempt, 30))
            delay *= 1 + random.uniform(-rc.jitter, rc.jitter)
            delay = min(rc.max_delay, delay)  # capped after the jitter: never past max_delay
            attempt += 1
            await asyncio.sleep(delay)

    async def _closed(self, conn: Connection) -> None:
        """Close ``conn`` (a normal DISCONNECT if it is still up: no will) and keep
        what the broker never acknowledged for the next connection."""
        try:
            await conn.close()
        finally:
            for left in conn.take_unacked():
                self._keep(left)

    def _lost(self, exc: Exception, attempt: int) -> None:
        if self.connects and attempt == 0:
            log.warning("lost the broker at %s: %s; reconnecting", self.config.url, exc)
        elif attempt in (0, 3) or attempt % 20 == 0:
            log.warning("cannot reach the broker at %s: %s (retrying)", self.config.url, exc)

    async def _session(self, conn: Connection) -> None:
        self._conn = conn
        for sub in list(self._subs.values()):
            await self._subscribe(conn, sub)
        self._connected.set()
        self.connects += 1
        log.info("connected to %s as %s", self.config.url, self.client_id)
        pending = list(self._outbox)
        self._outbox.clear()
        for out in pending:  # in order, through the in-flight window; unacked ones come back
            with contextlib.suppress(PublishRejected):  # never sendable here (logged)
                conn.publish(
                    out.topic, out.payload, out.qos, out.retain, out.props, strikes=out.strikes
                )
        for hook in self._hooks:
            try:
                await hook()
            except MqttError:
                raise
            except Exception:
                log.exception("on-connect hook %s failed", getattr(hook, "__qualname__", hook))
        inbox = conn.inbox
        while True:
            if not inbox:
                await conn.wait_message()  # MqttError once the connection is gone
            await self._dispatch(conn.take())

    async def _dispatch(self, message: Publish) -> None:
        props = message.properties
        ids = None
        if props:
            inbound = Inbound(
                message.topic,
                message.payload,
                message.qos,
                message.retain,
                props.get(RESPONSE_TOPIC),
                props.get(CORRELATION_DATA),
                props.get(CONTENT_TYPE),
                tuple(props.get(USER_PROPERTY, ())),
            )
            ids = props.get(SUBSCRIPTION_ID)
        else:
            inbound = Inbound(message.topic, message.payload, message.qos, message.retain)
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
