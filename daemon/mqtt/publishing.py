"""The layer of :class:`daemon.mqtt.connection.Connection` that sends publishes and
hears their acknowledgements: the broker's limits checked before sending, the
in-flight window, Message Expiry aged on resend, and the publish a broker closed
the connection on found and dropped (:meth:`Publishing._blame`)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Final

from daemon.mqtt import codec
from daemon.mqtt.codec import Properties, ProtocolError, reason_text
from daemon.mqtt.errors import ConnectionLost, MqttError, PublishRejected
from daemon.mqtt.params import ConnectParams
from daemon.mqtt.session import InFlight, Session
from daemon.mqtt.wire import WRITE_BUFFER_LIMIT, Wire

# The connection's one logger, whichever of its modules speaks: log filters and
# the tests name it.
log = logging.getLogger("daemon.mqtt.connection")

# DISCONNECT reasons by which a broker refuses the packet it just read (2.4): malformed
# packet, protocol error, topic name invalid, packet too large, payload format invalid,
# retain or QoS not supported.  Acknowledgements come in order, so when one of these
# arrives the oldest unacknowledged publish is the one refused (if nothing else was
# sent between it and the last acknowledged packet).
REJECTING_REASONS: Final = frozenset({0x81, 0x82, 0x90, 0x95, 0x99, 0x9A, 0x9B})

# A publish that was the oldest one the broker had not acknowledged when it closed the
# connection, this many times, is given up: a broker that closes on a bad packet without
# saying why would otherwise get it first on every reconnect, forever.
MAX_STRIKES: Final = 3

# Topics whose refusal (PUBACK >= 0x80) gets a log line of its own; later ones are counted.
MAX_LOGGED_TOPICS: Final = 256

# Topic names remembered as checked, per connection (past it the set starts again).
GOOD_TOPICS: Final = 4096


class Publishing(Wire):
    """Outgoing QoS 0/1/2 publishes and their acknowledgements."""

    def __init__(self, params: ConnectParams, session: Session | None = None) -> None:
        super().__init__(params, session)
        self._window = 0  # in-flight QoS>0 publishes allowed: 0 until CONNACK
        # A kept session's owner says when new publishes may go (start_sending): not
        # before it has resubscribed, so the answers to them can be heard.
        self._hold = self.session.keep
        self._requests: dict[int, asyncio.Future[list[int]]] = {}  # SUBSCRIBE, UNSUBSCRIBE
        self._max_qos = 2
        self._downgraded = False
        self._retain_ok = True
        self._refused_publishes = 0
        self._refused_topics: set[str] = set()
        self._max_send = 0  # the broker's Maximum Packet Size (0: none said)
        self._good_topics: set[str] = set()  # topic names already checked (hot path)
        # Packets written, in order: what a broker's DISCONNECT can be blamed on.
        self._seq = 0
        self._last_other = 0  # seq of the last packet not acknowledged by the broker
        self._last_acked = 0  # seq of the newest packet the broker acknowledged
        self._request_seqs: dict[int, int] = {}
        # The broker closed the connection with a publish of ours unacknowledged: a
        # refusal, more likely than another process taking our client id over.
        self.closed_on_publish = False

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        props: bytes = b"\x00",
        *,
        ack: bool = False,
        expiry: float | None = None,
    ) -> asyncio.Future[int] | None:
        """Send a PUBLISH.  With ``ack`` (QoS 1/2 only), a future for the broker's
        reason code; otherwise fire and forget.

        Refused at once, with :class:`PublishRejected`, is what the broker would
        refuse: a topic that is not a topic name, a packet over the broker's
        Maximum Packet Size, a retained message when the broker has none.  Past
        the session's bounds :class:`SessionFull`.  ``expiry`` (the Message
        Expiry Interval also in ``props``) lets a publish that waited be aged."""
        if self._error is not None or self._transport is None:
            raise self._error or ConnectionLost("not connected")
        if threading.get_ident() != self._thread:
            raise MqttError("publish from outside the connection's event loop thread")
        if topic not in self._good_topics or (
            self._max_send and len(payload) + len(props) + len(topic) + 9 > self._max_send
        ):
            self._check_sendable(topic, payload, props)
        if retain and not self._retain_ok:
            raise self._refuse(topic, 0x9A, "the broker has no retained messages")
        if qos > self._max_qos:
            if not self._downgraded:
                self._downgraded = True
                log.warning(
                    "the broker supports QoS up to %d: QoS %d publishes are sent at QoS %d",
                    self._max_qos,
                    qos,
                    self._max_qos,
                )
            qos = self._max_qos
        if not qos:
            if self._write_paused:
                self._drop_qos0(topic)
                return None
            self._seq += 1
            self._last_other = self._seq
            self._write(
                codec.encode_publish(
                    topic.encode(), payload, qos=0, retain=retain, packet_id=0, props=props
                )
            )
            return None
        future = self._loop.create_future() if ack else None
        out = InFlight(
            topic, payload, qos=qos, retain=retain, props=props, future=future, expiry=expiry
        )
        session = self.session
        session.admit(out)
        if len(session.inflight) < self._window and not session.queued and not self._hold:
            self._send(out)
        else:
            session.queued.append(out)
        return future

    def _drop_qos0(self, topic: str) -> None:
        session = self.session
        session.dropped += 1
        if session.dropped in (1, 10, 100) or session.dropped % 1000 == 0:
            log.warning(
                "the broker is not reading (over %d bytes unsent): a QoS 0 publish to %s "
                "dropped (%d so far)",
                WRITE_BUFFER_LIMIT,
                topic[:200],
                session.dropped,
            )

    def _check_sendable(self, topic: str, payload: bytes, props: bytes) -> None:
        """The slow part of :meth:`publish`'s checks (a topic not seen before, or a
        packet that may be over the broker's limit)."""
        try:
            topic_size = len(topic.encode())
        except UnicodeEncodeError as exc:
            raise self._refuse(topic, 0x90, "its topic is not UTF-8") from exc
        if not topic or "+" in topic or "#" in topic or "\0" in topic:
            raise self._refuse(topic, 0x90, "it is not a valid topic name")
        if len(self._good_topics) >= GOOD_TOPICS:
            self._good_topics.clear()
        self._good_topics.add(topic)
        # topic length + topic + packet id + properties + payload (3.3.1), then the fixed header
        remaining = 2 + topic_size + 2 + len(props) + len(payload)
        size = 1 + len(codec.varint(min(remaining, codec.MAX_REMAINING_LENGTH))) + remaining
        if self._max_send and size > self._max_send:
            raise self._refuse(
                topic, 0x95, f"{size} bytes, over the broker's Maximum Packet Size {self._max_send}"
            )

    def _refuse(self, topic: str, reason: int, why: str) -> PublishRejected:
        self._count_refusal(topic, "refused to send a publish to %s (%s)", why)
        return PublishRejected(f"publish to {topic[:200]!r} not sent: {why}", reason)

    def _count_refusal(self, topic: str, text: str, *args: object) -> None:
        """One log line per topic (the first few hundred topics), then every 1000th.

        ``text`` is a %-format whose first argument is the topic."""
        self._refused_publishes += 1
        first = topic not in self._refused_topics and len(self._refused_topics) < MAX_LOGGED_TOPICS
        if first:
            self._refused_topics.add(topic)
        if first or self._refused_publishes % 1000 == 0:
            log.warning(
                "%s (%d refused so far)", text % (topic[:200], *args), self._refused_publishes
            )

    def _encode(self, out: InFlight, *, dup: bool = False) -> bytes:
        return codec.encode_publish(
            out.topic.encode(),
            out.payload,
            qos=out.qos,
            retain=out.retain,
            packet_id=out.packet_id,
            props=out.props,
            dup=dup,
        )

    def _send(self, out: InFlight) -> None:
        if out.expires and not self._age(out):
            return
        out.packet_id = packet_id = self.session.packet_id(self._requests)
        self.session.inflight[packet_id] = out
        self._seq += 1
        out.seq = self._seq
        out.others_before = self._last_other
        self._write(self._encode(out))

    def _age(self, out: InFlight) -> bool:
        """A publish that waited: its Message Expiry counts the wait (or it expired)."""
        left = out.expires - time.monotonic()
        if left <= 0:
            session = self.session
            session.expired += 1
            if session.expired in (1, 10, 100) or session.expired % 1000 == 0:
                log.warning(
                    "a publish to %s expired before it could be sent (%d so far)",
                    out.topic[:200],
                    session.expired,
                )
            session.finish(
                out, PublishRejected(f"publish to {out.topic[:200]!r} expired unsent", 0)
            )
            return False
        seconds = max(1, int(left + 0.999))
        if out.expiry is not None and seconds < int(out.expiry + 0.999):
            props, _ = codec.read_properties(out.props, 0)
            props[codec.MESSAGE_EXPIRY] = seconds
            out.props = codec.encode_properties(props)
        return True

    def _send_queued(self) -> None:
        queued = self.session.queued
        inflight = self.session.inflight
        while queued and len(inflight) < self._window:
            self._send(queued.popleft())

    async def wait_acknowledged(self) -> None:
        """Until every QoS>0 publish made so far is acknowledged (or the connection ends)."""
        session = self.session
        if (session.inflight or session.queued) and not self.closed:
            idle = asyncio.ensure_future(session.wait_idle())
            try:
                await asyncio.wait([idle, self._closed], return_when=asyncio.FIRST_COMPLETED)
            finally:
                idle.cancel()

    # ------------------------------------------------------- acknowledgements

    def _acked(self, packet_id: int, reason: int, props: Properties, kind: int) -> None:
        session = self.session
        out = session.inflight.get(packet_id)
        if out is None:
            return  # 4.3: an acknowledgement for nothing of ours (a late duplicate)
        if (kind == codec.PUBACK) != (out.qos == 1) or (kind == codec.PUBCOMP and not out.released):
            raise ProtocolError(
                f"packet {packet_id}: a {'PUBACK' if kind == codec.PUBACK else 'PUBCOMP'} "
                f"for a QoS {out.qos} publish{'' if out.released else ' not released'}",
                0x82,
            )
        del session.inflight[packet_id]
        self._last_acked = max(self._last_acked, out.seq)
        if reason >= 0x80:
            why = props.get(codec.REASON_STRING)
            self._count_refusal(
                out.topic,
                "the broker refused a publish to %s (%s%s): check the ACL",
                reason_text(reason),
                f": {why}" if why else "",
            )
        session.finish(out, reason)
        if session.queued:
            self._send_queued()

    def _on_pubrec(self, packet_id: int, reason: int, props: Properties) -> None:
        out = self.session.inflight.get(packet_id)
        if out is None or out.qos != 2:
            if reason < 0x80:  # 4.3.3: release what we do not know, "not found"
                self._ack(codec.encode_ack(codec.PUBREL, packet_id, 0x92))
        elif reason >= 0x80:
            self._acked(packet_id, reason, props, codec.PUBREC)
        else:
            out.released = True
            self._last_acked = max(self._last_acked, out.seq)
            self._ack(codec.encode_ack(codec.PUBREL, packet_id))

    def _blame(self, reason: int) -> None:
        """The broker closed the connection: find the publish it refused.

        Mosquitto acknowledges every good packet before the DISCONNECT that
        refuses a bad one, so with a refusing reason the oldest unacknowledged
        publish is the bad one, unless a packet the broker does not acknowledge
        (QoS 0, SUBSCRIBE still unanswered) went out between it and the last
        acknowledged one.  That publish is dropped and its waiter told.  In any
        other case (no reason, another reason, doubt) it only gets a strike, and
        after ``MAX_STRIKES`` it is given up: nothing is replayed into the broker
        forever.
        """
        inflight = self.session.inflight
        head = next((o for o in inflight.values() if not o.released and o.seq), None)
        if head is None:
            return
        self.closed_on_publish = True
        if reason in REJECTING_REASONS and head.others_before <= self._last_acked:
            why = f"the broker closed the connection on it ({reason_text(reason)})"
            log.warning(
                "the broker closed the connection (%s) on our publish to %s (%d bytes): "
                "dropped, it is not sent again",
                reason_text(reason),
                head.topic[:200],
                len(head.payload),
            )
            del inflight[head.packet_id]
            self.session.finish(head, PublishRejected(f"publish to {head.topic!r}: {why}", reason))
            return
        head.strikes += 1
        if head.strikes >= MAX_STRIKES:
            del inflight[head.packet_id]
            self.session.given_up += 1
            log.warning(
                "publish to %s dropped: the broker closed the connection %d times while it "
                "was the oldest unacknowledged one",
                head.topic[:200],
                head.strikes,
            )
            self.session.finish(
                head,
                PublishRejected(
                    f"publish to {head.topic!r} given up: the broker closed the connection "
                    f"{head.strikes} times while it was the oldest unacknowledged one",
                    0x80,
                ),
            )
