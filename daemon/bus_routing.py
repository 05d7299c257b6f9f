"""The bus's subscriptions and dispatch: filters registered once and resubscribed on
every connection, each with an MQTT 5 subscription identifier; incoming messages
routed to exactly the subscriptions they matched, once (:meth:`Routing._route`),
each handler isolated.  A part of :class:`daemon.bus.Bus`."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Final

from daemon.bus_types import Handler, Inbound
from daemon.errors import BusSubscribeError
from daemon.mqtt import Connection, MqttError, Publish, SubscribeRefused
from daemon.mqtt.codec import (
    CONTENT_TYPE,
    CORRELATION_DATA,
    RESPONSE_TOPIC,
    SUBSCRIPTION_ID,
    USER_PROPERTY,
    subscribe_options,
)
from daemon.mqtt.connection import MAX_STRIKES
from daemon.topics import filters_overlap, matches, validate_filter

# The bus's one logger, whichever of its modules speaks: log filters and the
# tests name it.
log = logging.getLogger("daemon.bus")

# DISCONNECT reasons by which a broker refuses the SUBSCRIBE it just read: topic filter
# invalid, shared subscriptions / subscription identifiers / wildcards not supported.
SUBSCRIBE_REFUSALS: Final = frozenset({0x8F, 0x9E, 0xA1, 0xA2})


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


class Routing:
    """Subscriptions and dispatch (a part of :class:`daemon.bus.Bus`)."""

    # What it uses of the bus: the live connection, and whether it is up.
    _conn: Connection | None
    _connected: asyncio.Event

    def __init__(self) -> None:
        super().__init__()
        self._subs: dict[str, Subscription] = {}
        self._by_id: dict[int, Subscription] = {}
        self._ids = itertools.count(1)
        self._overlapping = False  # two registered filters can match one topic
        self._copies = False  # the broker sends a copy per matching subscription
        self._filled: deque[tuple[str, int, frozenset[int]]] = deque(maxlen=64)
        self._use_ids = True  # the broker has Subscription Identifiers
        # Each connection, once its hooks have run (see _dispatcher).
        self._ready: asyncio.Queue[tuple[Connection, asyncio.Event]] = asyncio.Queue()
        self.handler_errors = 0

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
            if conn is not None and self._connected.is_set():
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
        if conn is not None and self._connected.is_set():
            with contextlib.suppress(MqttError):  # resubscribed on reconnect
                await self._subscribe(conn, sub)

    async def unsubscribe(self, topic_filter: str) -> None:
        sub = self._subs.pop(topic_filter, None)
        if sub is None:
            return
        self._by_id.pop(sub.sub_id, None)
        conn = self._conn
        if conn is not None and self._connected.is_set():
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

    # ------------------------------------------------------------- dispatch

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
