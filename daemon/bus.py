"""The MQTT 5 bus: the one broker connection of a process.

:class:`Bus` owns a :class:`daemon.mqtt.Connection` inside a supervised reconnect loop
(capped exponential backoff with jitter, reset only once a connection has held).  On
every connect it subscribes every registered filter again (including those registered
meanwhile), sends what was published while it was away, and runs the ``on_connect``
hooks (birth, adverts) — in that order, so a birth is only seen once the node can hear
replies.

* Publishes live in one :class:`daemon.mqtt.Session` for the bus's lifetime, bounded
  in messages and bytes (``broker.outbox_size`` / ``outbox_bytes``): what the broker
  had not acknowledged when a connection dropped, and what was published while there
  was none, is sent on the next connection.  With ``session_expiry`` the broker keeps
  our side too (subscriptions, messages queued for us while we are away) and the
  next connection resumes it (resending with DUP; see :meth:`Bus._start_session`
  for a process's first); otherwise each connect starts clean.
  :meth:`Bus.publish` waits while the outbox is full; :meth:`Bus.post` drops (counted).
* Each filter gets an MQTT 5 subscription identifier; an incoming message is
  dispatched to the handlers of exactly the subscriptions it matched, once — also
  from brokers that name only some of them (see :meth:`Bus._route`).
* Handlers are isolated: one that raises is logged and dispatch goes on.  Dispatch
  runs beside the reconnect loop, so a handler that waits for an acknowledgement
  across a reconnect does not hold the reconnect up.
* Refused credentials or authorisation is fatal (:class:`BusAuthError`); a refused
  subscription raises :class:`BusSubscribeError` and is forgotten, never resent.
* Topics made from data are checked before anything is sent: a topic that is
  not a valid MQTT topic name (empty, a wildcard, U+0000, not UTF-8, too long)
  or a payload that cannot be encoded is refused — :meth:`Bus.publish` raises
  :class:`BusPublishError`, :meth:`Bus.post` drops it with a log line — so it
  never gets the connection closed.  A publish the broker refuses (a reason
  code, or closing the connection on it) is never replayed forever either:
  see :class:`daemon.mqtt.PublishRejected` and ``MAX_STRIKES``.
* Another process with our client id (a cloned image, two daemons with one node
  id) is said plainly, and backed off from.
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
import time
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
    BusSubscribeError,
    MessageError,
)
from daemon.messages import Message, encode
from daemon.mqtt import (
    Connection,
    ConnectParams,
    ConnectRefused,
    MqttError,
    Publish,
    PublishRejected,
    Session,
    SessionFull,
    SubscribeRefused,
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
from daemon.mqtt.connection import MAX_STRIKES, SESSION_MESSAGES, Outgoing
from daemon.textcheck import text_problem, topic_name_problem, valid_topic_name
from daemon.topics import filters_overlap, matches, validate_filter

log = logging.getLogger(__name__)

# CONNACK reason codes that no retry can fix: bad user name or password, not
# authorized, bad authentication method (MQTT 5, 3.2.2.2).
AUTH_FAILURES: Final = frozenset({0x86, 0x87, 0x8C})
# A dispatch queue this deep means handlers cannot keep up: the connection stops
# reading (TCP back-pressure to the broker) until dispatch catches up.
MAX_QUEUED_INCOMING: Final = 50_000
# Payloads in log lines are cut to this many bytes.
LOG_PAYLOAD_BYTES: Final = 200
# QoS 1/2 messages the broker may have in flight to us (MQTT 5 Receive Maximum).  Left
# unsaid, Mosquitto allows 20 and queues 1,000 more (max_queued_messages), then drops
# *silently*: a process whose loop is busy for a moment lost messages in a burst.  The
# connection acknowledges on read, so the real bound is MAX_QUEUED_INCOMING on our side.
RECEIVE_MAXIMUM: Final = 65_535
# DISCONNECT reasons by which a broker refuses the SUBSCRIBE it just read: topic filter
# invalid, shared subscriptions / subscription identifiers / wildcards not supported.
SUBSCRIBE_REFUSALS: Final = frozenset({0x8F, 0x9E, 0xA1, 0xA2})
# A connection that stayed up this long (s) resets the reconnect backoff.
STABLE_AFTER: Final = 10.0
# The broker closing our connection this soon (s) after CONNACK without a word, this
# many times in a row, is taken for another process connecting with our client id.
TAKEOVER_WINDOW: Final = 3.0
TAKEOVER_SUSPECT: Final = 3
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
    conn: Connection | None = None  # the connection it was last sent on
    # Handlers added since the last resubscription: the retained copies that the
    # SUBSCRIBE made for them brings go to them alone (the others have them).
    retained_to: list[Handler] | None = None
    strikes: int = 0  # connections closed while it was unanswered, in a row


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


@dataclass(frozen=True, slots=True)
class _WillOptions:
    qos: int = 1
    retain: bool = True

    def __str__(self) -> str:
        return f"at QoS {self.qos}{', retained' if self.retain else ', not retained'}"


class Bus:
    """One MQTT 5 connection with reconnect, resubscribe, hooks and flow control."""

    def __init__(
        self,
        config: BrokerConfig,
        client_id: str,
        *,
        password: str | None = None,
        will: tuple[str, Payload] | None = None,
        session_expiry: int = 0,
        duplicate_hint: str | None = None,
    ) -> None:
        """``session_expiry`` > 0: a persistent session (the broker keeps our
        subscriptions and queues QoS 1/2 messages for us that long while we are
        away); 0: a clean session on every connect.  ``duplicate_hint``: what to
        ask when another process keeps taking our client id over."""
        self.config = config
        self.client_id = client_id
        self._password = password
        self._will = will
        self._session_expiry = session_expiry
        self._fresh = True  # no session of ours on the broker yet (see _start_session)
        self._reconnect_now = False  # reconnect() asked: no backoff this time
        self._will_as = _WillOptions()  # lowered if the broker refuses QoS 1 / retain
        self._duplicate_hint = duplicate_hint
        self._session = Session(
            max_messages=config.outbox_size or SESSION_MESSAGES, max_bytes=config.outbox_bytes
        )
        self._conn: Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None
        self._connected = asyncio.Event()
        self._subs: dict[str, Subscription] = {}
        self._by_id: dict[int, Subscription] = {}
        self._ids = itertools.count(1)
        self._overlapping = False  # two registered filters can match one topic
        self._copies = False  # the broker sends a copy per matching subscription
        self._filled: deque[tuple[str, int, frozenset[int]]] = deque(maxlen=64)
        self._use_ids = True  # the broker has Subscription Identifiers
        self._hooks: list[Hook] = []
        self._ready: asyncio.Queue[tuple[Connection, asyncio.Event]] = asyncio.Queue()
        self._dropped = 0
        self._takeovers = 0  # connections the broker ended soon after CONNACK, in a row
        self.connects = 0
        self.refused = 0
        self.handler_errors = 0

    # ------------------------------------------------------------------ state

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def dropped(self) -> int:
        """Publishes given up: QoS 0 while offline or to a broker that stopped reading,
        a full outbox, expired unsent, or closed on by the broker MAX_STRIKES times."""
        s = self._session
        return self._dropped + s.dropped + s.expired + s.given_up

    def stats(self) -> dict[str, int]:
        """Counters for health reports."""
        conn = self._conn
        return {
            "connects": self.connects,
            "dropped": self.dropped,
            "refused": self.refused,
            "handler_errors": self.handler_errors,
            "outbox": len(self._session),
            "outbox_bytes": self._session.bytes,
            "inbox_dropped": conn.dropped_incoming if conn is not None else 0,
        }

    async def wait_connected(self, timeout: float | None = None) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        except TimeoutError as exc:
            raise BusNotConnectedError(
                f"no connection to the broker at {self.config.url} after {timeout:g}s"
            ) from exc

    def set_will(self, topic: str, payload: Payload) -> None:
        """The will from the next connection on (see :meth:`reconnect`)."""
        self._will = (topic, payload)

    def reconnect(self) -> None:
        """Close the connection normally (its will is not sent) and connect again at
        once: e.g. for a new will to take effect.  The session goes on."""
        conn = self._conn
        if conn is not None:
            self._reconnect_now = True
            asyncio.get_running_loop().create_task(conn.close())

    def on_connect(self, hook: Hook) -> None:
        """Run ``hook`` after every (re)connect, once subscriptions are in place."""
        self._hooks.append(hook)

    # -------------------------------------------------------------- subscribe

    async def subscribe(
        self, topic_filter: str, handler: Handler, qos: int = 1, *, no_local: bool = False
    ) -> None:
        """Call ``handler`` for every message matching ``topic_filter``.

        Registered filters survive reconnects.  When connected, this returns
        once the broker has acknowledged the subscription, and raises
        :class:`BusSubscribeError` if it refused it (or would: a wildcard or
        shared subscription the broker says it lacks) — the filter is then
        forgotten, never resent.
        """
        validate_filter(topic_filter)
        sub = self._subs.get(topic_filter)
        if sub is not None:
            sub.handlers.append(handler)
            conn = self._conn
            if conn is not None and self.connected:
                # Subscribe again so the broker sends the retained messages once more,
                # for the new handler only: without a new SUBSCRIBE it would never get
                # the state the others got (retained copies come only with SUBSCRIBE).
                sub.retained_to = [*(sub.retained_to or []), handler]
                with contextlib.suppress(MqttError):
                    await self._subscribe(conn, sub)
            return
        sub = Subscription(topic_filter, qos, next(self._ids), no_local, [handler])
        self._subs[topic_filter] = sub
        self._by_id[sub.sub_id] = sub
        self._overlapping = self._overlapping or any(
            filters_overlap(topic_filter, f) for f in self._subs if f != topic_filter
        )
        conn = self._conn
        if conn is not None and self.connected:
            with contextlib.suppress(MqttError):  # resubscribed on reconnect
                await self._subscribe(conn, sub)
        # Not connected, or (re)subscribing: the connect loop sends it (see _resubscribe).

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
        sub.conn = conn
        options = subscribe_options(sub.qos, no_local=sub.no_local)
        try:
            granted = await conn.subscribe(sub.topic_filter, options, sub.sub_id)
        except SubscribeRefused as exc:
            refused = exc
        except MqttError:
            # Closed with this SUBSCRIBE unanswered: by a reason that refuses it, or
            # MAX_STRIKES times in a row — it is the broker's answer to it.
            reason = conn.broker_reason
            sub.strikes += 1
            if reason not in SUBSCRIBE_REFUSALS and sub.strikes < MAX_STRIKES:
                raise
            self._forget(sub, SubscribeRefused(sub.topic_filter, reason or 0x80))
            raise
        else:
            code = next((c for c in granted if c >= 0x80), None)
            if code is None:
                sub.strikes = 0
                return
            refused = SubscribeRefused(sub.topic_filter, code)
        self._forget(sub, refused)
        raise BusSubscribeError(str(refused)) from refused

    def _forget(self, sub: Subscription, refused: SubscribeRefused) -> None:
        if self._subs.get(sub.topic_filter) is sub:
            del self._subs[sub.topic_filter]
            self._by_id.pop(sub.sub_id, None)
        log.error("%s: not subscribed, not retried (check the ACL)", refused)

    async def _resubscribe(self, conn: Connection) -> None:
        """Every registered filter on ``conn``, including those registered meanwhile."""
        while pending := [s for s in self._subs.values() if s.conn is not conn]:
            for sub in pending:
                sub.retained_to = None  # a new connection's retained copies: for all
                if self._subs.get(sub.topic_filter) is sub:
                    with contextlib.suppress(BusSubscribeError):  # logged, forgotten
                        await self._subscribe(conn, sub)

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
        expiry = props.get("expiry")
        return Outgoing(topic, data, qos, retain, publish_properties(**props), expiry)

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

        Waits while the outbox is full (``broker.outbox_size`` /
        ``outbox_bytes``: back-pressure).  With ``wait=True`` (QoS 1/2) it then
        waits for the broker's acknowledgement — across reconnects: a message
        published while disconnected is sent on reconnect, and this returns
        once the broker has it.  With ``wait=False`` it returns as soon as the
        message is in the outbox.  QoS 0 is at most once: while disconnected
        it is dropped (and counted in :attr:`dropped`).

        :class:`BusPublishError` when the topic is not a valid topic name, the
        payload cannot be encoded, or the broker would refuse it (at once), or,
        with ``wait=True``, when the broker refused it (a reason code >= 0x80,
        or closing the connection on it) or it expired unsent.
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
        await self._session.wait_room(out.size)
        acked = self._offer(out, ack=wait, raise_refusal=True)
        if acked is None:
            return
        try:
            reason = await acked
        except PublishRejected as exc:
            raise BusPublishError(str(exc)) from exc
        if reason >= 0x80:
            raise BusPublishError(
                f"the broker refused the publish to {out.topic[:200]!r} ({reason_text(reason)})"
            )

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
        """Publish from synchronous code (timers, hot paths, other threads) without
        waiting: straight into the outbox, sent in order through the in-flight
        window (``max_inflight``) — no task per message, which is what the
        orchestrator's throughput depends on.  What cannot be sent (not a valid
        topic name, a payload that cannot be encoded, a full outbox) is dropped
        with a log line and counted."""
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
            self._loop.call_soon_threadsafe(self._offer, out)
            return
        self._offer(out)

    def _offer(
        self, out: Outgoing, *, ack: bool = False, raise_refusal: bool = False
    ) -> asyncio.Future[int] | None:
        """Hand ``out`` to the session (the live connection, or the outbox)."""
        if out.qos and not self.connected and self.config.outbox_size == 0:
            self._drop(f"publish to {out.topic[:200]!r} dropped: not connected, outbox_size 0")
            return None
        try:
            return self._session.publish(
                out.topic,
                out.payload,
                out.qos,
                out.retain,
                out.props,
                ack=ack and out.qos > 0,
                expiry=out.expiry,
            )
        except PublishRejected as exc:  # the connection logged it
            if raise_refusal:
                raise BusPublishError(str(exc)) from exc
        except SessionFull as exc:
            self._drop(f"outbox full: {exc}")
        return None

    def _drop(self, why: str) -> None:
        self._dropped += 1
        if self._dropped in (1, 10, 100) or self._dropped % 1000 == 0:
            log.warning("%s (%d dropped so far)", why, self._dropped)

    def _refused(self, exc: BusPublishError) -> None:
        self.refused += 1
        if self.refused <= LOGGED_REFUSALS or self.refused % 1000 == 0:
            log.warning("publish dropped: %s (%d refused so far)", exc, self.refused)

    async def flush(self) -> None:
        """While connected: wait until every publish made so far has been
        acknowledged by the broker (or the connection drops)."""
        conn = self._conn
        if conn is not None:
            await conn.wait_acknowledged()

    # -------------------------------------------------------------- lifecycle

    def _params(self) -> ConnectParams:
        ep = self.config.endpoint
        will = None
        if self._will is not None:
            topic, payload = self._will
            will = Will(
                topic, to_bytes(payload), qos=self._will_as.qos, retain=self._will_as.retain
            )
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
            # With a session expiry, always resume (see _start_session).
            clean_start=not self._session_expiry,
            session_expiry=self._session_expiry,
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
        """Stay connected until cancelled.  Raises :class:`BusAuthError` on refusal.

        The backoff between attempts grows until a connection has stayed up for
        ``STABLE_AFTER``: a broker that accepts and then drops us at once (a
        publish it refuses, another process with our client id) is not hammered."""
        attempt = 0
        rc = self.config.reconnect
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        dispatcher = asyncio.create_task(self._dispatcher(), name="bus-dispatch")
        try:
            while True:
                conn: Connection | None = None
                try:
                    if self._session_expiry and self._fresh:
                        await self._start_session()
                    conn = await connect(self._params(), self._session)
                    await self._connection(conn)
                except ConnectRefused as exc:
                    if exc.code in (0x9A, 0x9B) and self._will_downgraded(exc):
                        continue  # at once, with a will the broker can take
                    if exc.code in AUTH_FAILURES:
                        raise BusAuthError(
                            f"broker {self.config.url} refused the connection: {exc}. "
                            "Check broker.username / password and the broker's ACL."
                        ) from exc
                    self._lost(exc, attempt)
                except MqttError as exc:
                    if not self._reconnect_now:
                        self._lost(exc, attempt)
                finally:
                    self._connected.clear()
                    self._conn = None
                    if conn is not None:
                        await conn.close()
                if self._reconnect_now:
                    self._reconnect_now = False
                    continue
                if conn is not None and conn.connected_at:
                    lived = time.monotonic() - conn.connected_at
                    if lived >= STABLE_AFTER:
                        attempt = 0
                    self._check_takeover(conn, lived)
                delay = rc.initial_delay * (2 ** min(attempt, 30))
                delay *= 1 + random.uniform(-rc.jitter, rc.jitter)
                delay = min(rc.max_delay, delay)  # capped after the jitter: never past max_delay
                attempt += 1
                await asyncio.sleep(delay)
        finally:
            dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dispatcher

    async def _start_session(self) -> None:
        """A process's first connect with a session expiry: drop whatever session an
        earlier process left with our client id (we have no state for it: stale
        subscriptions, messages queued for a configuration that is gone;
        MQTT-3.2.2-4), then resume the fresh one from the next CONNECT on — with
        Clean Start 0 from the start, because Mosquitto 2.0.11 writes to disk only
        sessions made that way (one made with Clean Start 1 is lost when the broker
        restarts)."""
        clean = await connect(replace(self._params(), clean_start=True), Session(keep=False))
        await clean.close()  # a normal DISCONNECT: the will is not sent
        self._fresh = False

    def _will_downgraded(self, exc: ConnectRefused) -> bool:
        """The broker refused our will (0x9A: it has no retained messages; 0x9B: not
        its QoS): send it without retain / at QoS 0 from now on, once."""
        will = self._will_as
        if exc.code == 0x9A and will.retain:
            self._will_as = replace(will, retain=False)
        elif exc.code == 0x9B and will.qos:
            self._will_as = replace(will, qos=0)
        else:
            return False
        log.warning("%s: the will is sent %s from now on", exc, self._will_as)
        return True

    def _check_takeover(self, conn: Connection, lived: float) -> None:
        """Another process connected with our client id takes the session over, and we
        take it back, forever (cloned images, two daemons with one node id): say so."""
        reason = conn.broker_reason
        silent = reason == -1 and lived < TAKEOVER_WINDOW and not conn.closed_on_publish
        if reason == 0x8E or silent:
            self._takeovers += 1
        else:
            self._takeovers = 0
            return
        n = self._takeovers
        if (reason == 0x8E and n == 1) or n == TAKEOVER_SUSPECT or n % 100 == 0:
            hint = f" — {self._duplicate_hint}" if self._duplicate_hint else ""
            how = (
                "(session taken over)"
                if reason == 0x8E
                else f"{n} times in a row, each within {TAKEOVER_WINDOW:g}s of connecting"
            )
            log.error(
                "another process is connected to the broker as %s: the broker dropped us %s%s. "
                "Backing off; two clients with one client id knock each other off forever.",
                self.client_id,
                how,
                hint,
            )

    async def _connection(self, conn: Connection) -> None:
        """One connection: resubscribe, send the outbox, run the hooks; returns by
        raising :class:`MqttError` when the connection ends."""
        self._conn = conn
        self._use_ids = conn.sub_ids_ok
        await self._resubscribe(conn)
        self._connected.set()
        self.connects += 1
        log.info(
            "connected to %s as %s%s",
            self.config.url,
            self.client_id,
            " (session resumed)" if conn.session_present and self.connects > 1 else "",
        )
        conn.start_sending()  # the outbox, now that replies can be heard
        ready = asyncio.Event()
        self._ready.put_nowait((conn, ready))
        hooks = asyncio.create_task(self._run_hooks(ready))
        try:
            await conn.wait_closed()
        finally:
            if not hooks.done():
                hooks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await hooks
        raise conn.error

    async def _run_hooks(self, ready: asyncio.Event) -> None:
        try:
            for hook in self._hooks:
                try:
                    await hook()
                except MqttError as exc:
                    log.debug("on-connect hook %s: %s", getattr(hook, "__qualname__", hook), exc)
                except Exception:
                    log.exception("on-connect hook %s failed", getattr(hook, "__qualname__", hook))
        finally:
            ready.set()

    async def _dispatcher(self) -> None:
        """Dispatch every connection's messages, in order, connection after connection:
        a handler may wait (for an acknowledgement, across a reconnect) without holding
        up the reconnect; a connection's inbox is dispatched once its hooks have run."""
        while True:
            conn, ready = await self._ready.get()
            await ready.wait()
            inbox = conn.inbox
            with contextlib.suppress(MqttError):
                while True:
                    if not inbox:
                        await conn.wait_message()  # MqttError once it is gone and empty
                    await self._dispatch(conn.take())

    def _lost(self, exc: Exception, attempt: int) -> None:
        if isinstance(exc, ConnectRefused) and exc.legacy:
            if attempt in (0, 3) or attempt % 20 == 0:
                log.error("cannot use the broker at %s: %s", self.config.url, exc)
        elif self.connects and attempt == 0:
            log.warning("lost the broker at %s: %s; reconnecting", self.config.url, exc)
        elif attempt in (0, 3) or attempt % 20 == 0:
            log.warning("cannot reach the broker at %s: %s (retrying)", self.config.url, exc)

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
        for sub in self._route(inbound.topic, ids, inbound.payload):
            to = sub.retained_to if inbound.retain and sub.retained_to is not None else sub.handlers
            for handler in list(to):
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

    def _route(self, topic: str, ids: list[int] | None, payload: bytes) -> list[Subscription]:
        """The subscriptions a message is for, each once.

        By its Subscription Identifiers, each checked against its filter.  Where
        two filters overlap, a broker may send one copy carrying every matching id
        (Mosquitto), one copy per subscription (allowed, 3.3.4), or one copy with
        only the first id (aedes 2 beta): a matching subscription the copy does not
        name is served from it, and remembered; should the broker's own copy for it
        follow, it is skipped, and from then on the broker is trusted to send
        copies."""
        if not ids or not self._use_ids:
            return [s for s in self._subs.values() if matches(s.topic_filter, topic)]
        by_id = self._by_id
        subs = [
            s for i in ids if (s := by_id.get(i)) is not None and matches(s.topic_filter, topic)
        ]
        if not subs:  # stale or wrong ids: the filters decide
            return [s for s in self._subs.values() if matches(s.topic_filter, topic)]
        if not self._overlapping:
            return subs
        named = frozenset(s.sub_id for s in subs)
        key = hash(payload)
        for entry in self._filled:
            if entry[0] == topic and entry[1] == key and named <= entry[2]:
                self._filled.remove(entry)
                if not self._copies:
                    self._copies = True
                    log.info("the broker sends one copy per matching subscription")
                return []  # the broker's own copy of one we already served
        if self._copies:
            return subs
        missing = [
            s
            for s in self._subs.values()
            if s.sub_id not in named and matches(s.topic_filter, topic)
        ]
        if missing:
            self._filled.append((topic, key, frozenset(s.sub_id for s in missing)))
            subs += missing
        return subs

    async def drain(self, timeout: float = 2.0) -> None:
        """Wait (bounded) for unacknowledged publishes before the run task is cancelled.

        Cancelling :meth:`run` disconnects gracefully, so the will is not sent.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.flush()
