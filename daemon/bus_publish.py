"""The bus's outgoing side: a publish checked and encoded (:class:`BusPublishError`
when it cannot be sent as asked), then handed to the session — the live
connection, or the outbox while there is none.  :meth:`Publishing.publish` waits
(room, then the broker's acknowledgement); :meth:`Publishing.post` never does.
A part of :class:`daemon.bus.Bus`."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Final

from daemon.bus_types import Payload, to_bytes
from daemon.config import BrokerConfig
from daemon.errors import BusPublishError, MessageError
from daemon.mqtt import Connection, Outgoing, PublishRejected, Session, SessionFull
from daemon.mqtt.codec import publish_properties, reason_text
from daemon.textcheck import text_problem, topic_name_problem, valid_topic_name

# The bus's one logger, whichever of its modules speaks: log filters and the
# tests name it.
log = logging.getLogger("daemon.bus")

# Refused posts: each of the first ones gets a log line, then every 1000th.
LOGGED_REFUSALS: Final = 10


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


class Publishing:
    """Publishing (a part of :class:`daemon.bus.Bus`)."""

    # What it uses of the bus.
    config: BrokerConfig
    _session: Session
    _conn: Connection | None
    _connected: asyncio.Event
    _loop: asyncio.AbstractEventLoop | None
    _thread: int | None

    def __init__(self) -> None:
        super().__init__()
        self._dropped = 0
        self.refused = 0

    @property
    def dropped(self) -> int:
        """Publishes given up: QoS 0 while offline or to a broker that stopped reading,
        a full outbox, expired unsent, or closed on by the broker MAX_STRIKES times."""
        s = self._session
        return self._dropped + s.dropped + s.expired + s.given_up

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
        if out.qos and not self._connected.is_set() and self.config.outbox_size == 0:
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
