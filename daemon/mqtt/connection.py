"""One MQTT 5 client connection on an asyncio transport.

Why our own client rather than paho-mqtt (through aiomqtt): on the task hot
path every process is bound by per-packet CPU, and paho spent most of it on
syscalls and bookkeeping — one ``send`` per packet, three to four ``recv``
calls per packet read a byte at a time, a thread-safe message-info object and
a 27-entry property table per PUBLISH.  Here:

* every packet written during one event-loop iteration leaves in a single
  ``transport.write`` (acks included), and a read takes whatever the kernel
  has — one syscall for many packets each way;
* incoming PUBLISH packets are acknowledged on read and queued in
  :attr:`Connection.inbox` for the owner to dispatch (:meth:`Connection.take`);
  past ``max_queued_incoming`` messages the socket is paused (TCP back-pressure
  to the broker) instead of dropping anything, unless dispatch itself waits for
  something only reading brings; past ``max_queued_incoming_bytes`` of payload,
  large messages are dropped (see ``LARGE_INCOMING``);
* QoS 1 and 2 publishes respect the broker's Receive Maximum and our own
  ``max_inflight``; the rest wait in order.  Publishes that were never
  acknowledged when the connection drops can be taken back with
  :meth:`Connection.take_unacked` and sent again on the next connection;
* keep-alive: PINGREQ when nothing was sent for half the interval, and a
  connection that has heard nothing for 1.5 intervals is dropped;
* a publish the broker will never take is not sent again: one over the
  broker's Maximum Packet Size, or whose topic cannot be encoded, is refused
  at once (:class:`PublishRejected`); one the broker closed the connection on
  is identified and dropped (see :meth:`Connection.connection_lost`); a
  PUBLISH from the broker whose topic is not valid text is acknowledged and
  dropped, the connection goes on.

What it leaves out, because nothing in the realm uses it: sessions that
outlive the connection, topic aliases, enhanced authentication (AUTH).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Final, Literal

from daemon.errors import BusError
from daemon.mqtt import codec
from daemon.mqtt.codec import Properties, ProtocolError, Publish, Will, reason_text

log = logging.getLogger(__name__)

# Past this many undispatched incoming messages the socket stops being read.
MAX_QUEUED_INCOMING: Final = 50_000
# Dispatch has caught up again below this many: reading resumes.
RESUME_BELOW: Final = MAX_QUEUED_INCOMING // 2
# Payload bytes waiting for dispatch past which an arriving message over
# LARGE_INCOMING is dropped (acknowledged, counted, logged), and past twice which any
# is: a flood of large messages (1 MiB each is legal) would otherwise hold tens of GB
# before the count bound is reached.  Dropping, not pausing: the broker's
# acknowledgements of our own publishes arrive behind what it queued for us, so a
# paused socket stalls every handler that publishes (it did: 30 s echo round trips).
MAX_QUEUED_INCOMING_BYTES: Final = 32 * 1024 * 1024
LARGE_INCOMING: Final = 64 * 1024
# While reading is paused, dispatch must keep taking messages; if it takes none for
# this long it is blocked, most likely on something only reading can bring (an
# acknowledgement, a flow-control slot that one frees): reading resumes, and does not
# pause again until dispatch has taken a message.
STALL_RESUME: Final = 0.1
# DISCONNECT reasons by which a broker refuses the packet it just read (2.4): malformed
# packet, protocol error, topic name invalid, packet too large, payload format invalid,
# retain or QoS not supported.  Acknowledgements come in order, so when one of these
# arrives the oldest unacknowledged publish is the one refused (if nothing else was
# sent between it and the last acknowledged packet).
REJECTING_REASONS: Final = frozenset({0x81, 0x82, 0x90, 0x95, 0x99, 0x9A, 0x9B})
# Topics whose refusal (PUBACK >= 0x80) gets a log line of its own; later ones are counted.
MAX_LOGGED_TOPICS: Final = 256


class MqttError(BusError):
    """The connection failed or was lost."""


class ConnectionLost(MqttError):
    """The connection is gone (closed by either side, or unreachable).

    ``strike`` is set on the error of the one publish that was the oldest
    unacknowledged when the broker closed the connection: the prime suspect
    (see :attr:`Outgoing.strikes`).
    """

    def __init__(self, message: str, *, strike: bool = False) -> None:
        super().__init__(message)
        self.strike = strike


class PublishRejected(MqttError):
    """The broker will never take this publish (a reason code >= 0x80, or it closed
    the connection on it), or it cannot be sent at all: it is not sent again."""

    def __init__(self, message: str, reason: int) -> None:
        super().__init__(message)
        self.reason = reason


class ConnectRefused(MqttError):
    """The broker answered CONNECT with a failure reason code."""

    def __init__(self, code: int, reason: str | None = None) -> None:
        text = reason_text(code) + (f": {reason}" if reason else "")
        super().__init__(f"connection refused ({text})")
        self.code = code


@dataclass(frozen=True, slots=True)
class ConnectParams:
    host: str  # the socket path for transport "unix"
    port: int
    client_id: str
    transport: Literal["tcp", "websockets", "unix"] = "tcp"
    websocket_path: str = "/"
    tls: ssl.SSLContext | None = None
    username: str | None = None
    password: str | None = None
    keepalive: int = 30
    clean_start: bool = True
    session_expiry: int = 0
    will: Will | None = None
    receive_maximum: int = 65_535
    max_packet_size: int = 64 * 1024 * 1024  # the largest packet the broker may send us
    max_inflight: int = 65_535  # our own cap on unacknowledged QoS>0 publishes
    connect_timeout: float = 5.0
    max_queued_incoming: int = MAX_QUEUED_INCOMING
    max_queued_incoming_bytes: int = MAX_QUEUED_INCOMING_BYTES


class _InFlight:
    """A QoS 1/2 publish until the broker has acknowledged it."""

    __slots__ = (
        "future",
        "others_before",
        "packet_id",
        "payload",
        "props",
        "qos",
        "released",
        "retain",
        "seq",
        "strikes",
        "topic",
    )

    def __init__(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int,
        retain: bool,
        props: bytes,
        future: asyncio.Future[int] | None,
        strikes: int = 0,
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.props = props
        self.future = future
        self.strikes = strikes
        self.packet_id = 0
        self.released = False  # QoS 2: PUBREC seen, PUBREL sent
        self.seq = 0  # when it was written (Connection._seq)
        self.others_before = 0  # the last other packet the broker does not acknowledge


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A publish as its owner keeps it until it is sent: the bus's backlog and
    outbox, and what :meth:`Connection.take_unacked` hands back."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    props: bytes  # the encoded MQTT 5 property block
    # How often the broker closed the connection while this was the oldest publish
    # it had not acknowledged (the owner gives up on it after a few).
    strikes: int = 0


class Connection(asyncio.Protocol):
    """The client side of one MQTT 5 connection (create it with :func:`connect`)."""

    def __init__(self, params: ConnectParams) -> None:
        self.params = params
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._transport: asyncio.BaseTransport | None = None
        self._write_transport: asyncio.WriteTransport | None = None
        self._chunks: list[bytes] = []
        self._have = 0
        self._need = 0
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._acks_only = False  # _out holds nothing but acknowledgements
        self._acks_waited = False  # ... and the flush already waited one iteration for more
        self._next_id = 0
        self._inflight: dict[int, _InFlight] = {}
        self._queued: deque[_InFlight] = deque()
        self._window = params.max_inflight
        self._requests: dict[int, asyncio.Future[list[int]]] = {}
        self._incoming_qos2: set[int] = set()
        self._connack: asyncio.Future[Properties] = self._loop.create_future()
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._error: MqttError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._paused = False
        self._inbox_bytes = 0  # payload bytes in the inbox
        self._taken = 0  # messages taken from the inbox, ever (see STALL_RESUME)
        self._stalled = False  # reading resumed because dispatch was blocked
        self._dropped_incoming = 0  # over MAX_QUEUED_INCOMING_BYTES
        self._keepalive = params.keepalive
        self._max_qos = 2
        self._last_sent = self._last_heard = time.monotonic()
        self._ping_timer: asyncio.TimerHandle | None = None
        self._refused_publishes = 0
        self._refused_topics: set[str] = set()
        self._bad_incoming = 0
        self._max_send = 0  # the broker's Maximum Packet Size (0: none said)
        # Packets written, in order: what a broker's DISCONNECT can be blamed on.
        self._seq = 0
        self._last_other = 0  # seq of the last packet not acknowledged by the broker
        self._last_acked = 0  # seq of the newest packet the broker acknowledged
        self._request_seqs: dict[int, int] = {}
        self._broker_reason: int | None = None  # a DISCONNECT's reason; -1: closed silently
        self.inbox: deque[Publish] = deque()
        self.server: Properties = {}

    # ----------------------------------------------------------- transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        assert isinstance(transport, asyncio.WriteTransport)
        self._write_transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self._error is None:
            detail = f": {exc}" if exc else ""
            self._error = ConnectionLost(f"connection to the broker lost{detail}")
            if self._connack.done():
                self._broker_reason = -1  # not us: the broker (or the network) closed it
        self._transport = self._write_transport = None
        if self._ping_timer is not None:
            self._ping_timer.cancel()
        if self._broker_reason is not None:
            self._blame(self._broker_reason, self._error)
        error = self._error
        futures: list[asyncio.Future[Any]] = [self._connack, *self._requests.values()]
        futures += [o.future for o in self._inflight.values() if o.future is not None]
        futures += [o.future for o in self._queued if o.future is not None]
        for future in futures:
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: nobody may be waiting any more
        self._requests.clear()
        self._wake()
        self._wake_idle()
        if not self._closed.done():
            self._closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._last_heard = time.monotonic()
        if self._chunks:
            self._chunks.append(data)
            self._have += len(data)
            if self._have < self._need:
                return  # a large packet still arriving: join once, when it is whole
            data = b"".join(self._chunks)
            self._chunks.clear()
        try:
            packets, used = codec.split_packets(data)
            if used < len(data):
                rest = data[used:]
                self._chunks.append(rest)
                self._have = len(rest)
                self._need = codec.packet_size(rest)
                if self._need > self.params.max_packet_size:
                    raise ProtocolError(
                        f"a {self._need}-byte packet, over the {self.params.max_packet_size} "
                        "we announced as our Maximum Packet Size"
                    )
            limit = self.params.max_packet_size
            for first, body in packets:
                if len(body) > limit:
                    raise ProtocolError(f"a packet over our Maximum Packet Size ({limit} bytes)")
                self._handle(first, body)
        except (ProtocolError, IndexError, ValueError) as exc:
            self._fail(f"malformed packet from the broker: {exc}")

    def _blame(self, reason: int, error: MqttError) -> None:
        """The broker closed the connection: find the publish it refused.

        Mosquitto acknowledges every good packet before the DISCONNECT that
        refuses a bad one, so with a refusing reason the oldest unacknowledged
        publish is the bad one, unless a packet the broker does not acknowledge
        (QoS 0, SUBSCRIBE still unanswered) went out between it and the last
        acknowledged one.  That publish is dropped and its waiter told.  In any
        other case (no reason, another reason, doubt) it only gets a strike: its
        owner gives up after a few, so nothing is replayed into the broker forever.
        """
        head = next((o for o in self._inflight.values() if not o.released), None)
        if head is None:
            return
        if reason in REJECTING_REASONS and head.others_before <= self._last_acked:
            del self._inflight[head.packet_id]
            log.warning(
                "the broker closed the connection (%s) on our publish to %s (%d bytes): "
                "dropped, it is not sent again",
                reason_text(reason),
                head.topic,
                len(head.payload),
            )
            if head.future is not None and not head.future.done():
                head.future.set_exception(
                    PublishRejected(
                        f"the broker refused the publish to {head.topic} ({reason_text(reason)})",
                        reason,
                    )
                )
                head.future.exception()  # retrieved: the waiter may be gone
            return
        head.strikes += 1
        if head.future is not None and not head.future.done():
            head.future.set_exception(ConnectionLost(str(error), strike=True))
            head.future.exception()

    def pause_writing(self) -> None:  # the transport buffers; our windows bound it
        pass

    def resume_writing(self) -> None:
        pass

    # -------------------------------------------------------------- writing

    def _write(self, data: bytes) -> None:
        self._out.append(data)
        self._acks_only = False
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _ack(self, data: bytes) -> None:
        """Queue an acknowledgement; it leaves with the next write, or on its own
        one loop iteration later (see :meth:`_flush`)."""
        if not self._out:
            self._acks_only = True
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self._acks_only and not self._acks_waited:
            # Only acknowledgements so far: let the handlers of what they acknowledge run
            # first, so their answers leave in the same write, and the ack's syscall does
            # not delay the dispatch (one send instead of two on a worker's hot path).
            self._acks_waited = True
            self._loop.call_soon(self._flush)
            return
        self._flush_scheduled = False
        self._write_out()

    def _write_out(self) -> None:
        self._acks_only = self._acks_waited = False
        out = self._out
        if not out:
            return
        transport = self._write_transport
        if transport is None or transport.is_closing():
            out.clear()
            return
        transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()
        self._last_sent = time.monotonic()

    def _packet_id(self) -> int:
        for _ in range(65_535):
            self._next_id = self._next_id % 65_535 + 1
            if self._next_id not in self._inflight and self._next_id not in self._requests:
                return self._next_id
        raise MqttError("no free packet identifier")

    # ------------------------------------------------------------ handshake

    def send_connect(self) -> None:
        p = self.params
        props: Properties = {
            codec.RECEIVE_MAXIMUM: p.receive_maximum,
            codec.MAXIMUM_PACKET_SIZE: p.max_packet_size,
        }
        if p.session_expiry:
            props[codec.SESSION_EXPIRY] = p.session_expiry
        self._write(
            codec.encode_connect(
                p.client_id,
                keepalive=p.keepalive,
                clean_start=p.clean_start,
                username=p.username,
                password=p.password,
                will=p.will,
                properties=props,
            )
        )

    async def wait_connack(self) -> None:
        self.server = await self._connack
        self._window = min(self.params.max_inflight, self.server.get(codec.RECEIVE_MAXIMUM, 65_535))
        self._max_send = self.server.get(codec.MAXIMUM_PACKET_SIZE, 0)
        self._keepalive = self.server.get(codec.SERVER_KEEP_ALIVE, self.params.keepalive)
        # A broker that supports less than QoS 2 disconnects a client that publishes above it.
        self._max_qos = self.server.get(codec.MAXIMUM_QOS, 2)
        if self._keepalive:
            self._ping_timer = self._loop.call_later(self._keepalive / 2, self._tick)

    # ------------------------------------------------------------- requests

    @property
    def closed(self) -> bool:
        """No longer usable (failed, lost or closed; the socket may still be closing)."""
        return self._error is not None or self._closed.done()

    @property
    def queued(self) -> int:
        """QoS>0 publishes waiting for a slot in the in-flight window."""
        return len(self._queued)

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        props: bytes = b"\x00",
        *,
        ack: bool = False,
        strikes: int = 0,
    ) -> asyncio.Future[int] | None:
        """Send a PUBLISH.  With ``ack`` (QoS 1/2 only), a future for the broker's
        reason code; otherwise fire and forget (see :meth:`take_unacked`).

        :class:`PublishRejected` at once for a packet over the broker's Maximum
        Packet Size or a topic that is not encodable (the caller validates topics;
        this keeps a bad one from closing the connection)."""
        if self._error is not None or self._transport is None:
            raise self._error or ConnectionLost("not connected")
        if threading.get_ident() != self._thread:
            raise MqttError("publish from outside the connection's event loop thread")
        if not topic.isascii() or (
            self._max_send and len(payload) + len(props) + len(topic) + 9 > self._max_send
        ):
            self._check_sendable(topic, payload, props)
        qos = min(qos, self._max_qos)
        if not qos:
            self._seq += 1
            self._last_other = self._seq
            self._write(
                codec.encode_publish(
                    topic.encode(), payload, qos=0, retain=retain, packet_id=0, props=props
                )
            )
            return None
        future = self._loop.create_future() if ack else None
        out = _InFlight(
            topic, payload, qos=qos, retain=retain, props=props, future=future, strikes=strikes
        )
        if len(self._inflight) < self._window and not self._queued:
            self._send(out)
        else:
            self._queued.append(out)
        return future

    def _check_sendable(self, topic: str, payload: bytes, props: bytes) -> None:
        """The slow part of :meth:`publish`'s checks (a non-ASCII topic, or a packet
        that may be over the broker's limit)."""
        try:
            topic_size = len(topic.encode())
        except UnicodeEncodeError as exc:
            raise self._refuse(topic, 0x90, "its topic is not UTF-8") from exc
        # topic length + topic + packet id + properties + payload (3.3.1), then the fixed header
        remaining = 2 + topic_size + 2 + len(props) + len(payload)
        size = 1 + len(codec.varint(min(remaining, codec.MAX_REMAINING_LENGTH))) + remaining
        if self._max_send and size > self._max_send:
            raise self._refuse(
                topic, 0x95, f"{size} bytes, over the broker's Maximum Packet Size {self._max_send}"
            )

    def _refuse(self, topic: str, reason: int, why: str) -> PublishRejected:
        self._count_refusal(topic, "refused to send a publish to %s (%s)", why)
        return PublishRejected(f"publish to {topic!r} not sent: {why}", reason)

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

    def _send(self, out: _InFlight) -> None:
        out.packet_id = packet_id = self._packet_id()
        self._inflight[packet_id] = out
        self._seq += 1
        out.seq = self._seq
        out.others_before = self._last_other
        self._write(
            codec.encode_publish(
                out.topic.encode(),
                out.payload,
                qos=out.qos,
                retain=out.retain,
                packet_id=packet_id,
                props=out.props,
            )
        )

    async def subscribe(self, topic_filter: str, options: int, sub_id: int = 0) -> list[int]:
        """SUBSCRIBE one filter; the broker's reason codes (>= 0x80: refused)."""
        packet_id = self._request()
        self._write(codec.encode_subscribe(packet_id, topic_filter, options, sub_id))
        return await self._requests[packet_id]

    async def unsubscribe(self, topic_filter: str) -> list[int]:
        packet_id = self._request()
        self._write(codec.encode_unsubscribe(packet_id, topic_filter))
        return await self._requests[packet_id]

    def _request(self) -> int:
        if self._error is not None or self._transport is None:
            raise self._error or ConnectionLost("not connected")
        packet_id = self._packet_id()
        self._requests[packet_id] = self._loop.create_future()
        if self._paused:
            self._resume()
        self._seq += 1
        self._last_other = self._request_seqs[packet_id] = self._seq
        return packet_id

    def take_unacked(self) -> list[Outgoing]:
        """Once closed: the fire-and-forget publishes the broker never acknowledged,
        in the order they were made (those with a future failed instead)."""
        left = [*self._inflight.values(), *self._queued]
        self._inflight.clear()
        self._queued.clear()
        return [
            Outgoing(o.topic, o.payload, o.qos, o.retain, o.props, o.strikes)
            for o in left
            if o.future is None and not o.released  # QoS 2 past PUBREC has arrived
        ]

    async def wait_acknowledged(self) -> None:
        """Until every QoS>0 publish made so far is acknowledged (or the connection ends)."""
        if (self._inflight or self._queued) and not self.closed:
            waiter = self._loop.create_future()
            self._idle_waiters.append(waiter)
            await waiter

    def _wake_idle(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -------------------------------------------------------------- reading

    async def wait_message(self) -> None:
        """Until :attr:`inbox` has a message; :class:`MqttError` once the
        connection has ended and the inbox is empty."""
        while not self.inbox:
            if self._error is not None:
                raise self._error
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def take(self) -> Publish:
        """The oldest message of the inbox (there must be one), for dispatch."""
        message = self.inbox.popleft()
        self._inbox_bytes -= len(message.payload)
        self._taken += 1
        self._stalled = False
        if self._paused:
            self.taken()
        return message

    def taken(self) -> None:
        """The owner took messages from the inbox: resume reading if it had paused."""
        if self._paused and len(self.inbox) < RESUME_BELOW:
            self._resume()

    def _check_stall(self, taken: int) -> None:
        if not self._paused or self._transport is None:
            return
        if self._taken == taken:
            log.debug("dispatch took nothing for %gs while paused: reading resumes", STALL_RESUME)
            self._stalled = True
            self._resume()
        else:
            self._loop.call_later(STALL_RESUME, self._check_stall, self._taken)

    def _resume(self) -> None:
        self._paused = False
        transport = self._transport
        if isinstance(transport, asyncio.ReadTransport):
            transport.resume_reading()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _handle(self, first: int, body: bytes) -> None:
        kind = first >> 4
        if kind == codec.PUBLISH:
            try:
                message = codec.decode_publish(first, body)
            except codec.InvalidPublish as exc:
                self._drop_incoming(exc)
                return
            self._on_publish(message)
        elif kind in (codec.PUBACK, codec.PUBCOMP):
            packet_id, reason, props = codec.decode_ack(body)
            self._acked(packet_id, reason, props)
        elif kind == codec.PUBREC:
            packet_id, reason, props = codec.decode_ack(body)
            out = self._inflight.get(packet_id)
            if reason >= 0x80 or out is None:
                self._acked(packet_id, reason, props)
            else:
                out.released = True
                self._last_acked = max(self._last_acked, out.seq)
                self._ack(codec.encode_ack(codec.PUBREL, packet_id))
        elif kind == codec.PUBREL:
            packet_id = codec.decode_ack(body)[0]
            self._incoming_qos2.discard(packet_id)
            self._ack(codec.encode_ack(codec.PUBCOMP, packet_id))
        elif kind in (codec.SUBACK, codec.UNSUBACK):
            packet_id, codes, _props = codec.decode_suback(body)
            self._last_acked = max(self._last_acked, self._request_seqs.pop(packet_id, 0))
            future = self._requests.pop(packet_id, None)
            if future is not None and not future.done():
                future.set_result(codes)
        elif kind == codec.PINGRESP:
            pass
        elif kind == codec.CONNACK:
            self._on_connack(body)
        elif kind == codec.DISCONNECT:
            reason, props = codec.decode_disconnect(body)
            why = props.get(codec.REASON_STRING)
            self._broker_reason = reason
            self._fail(
                f"the broker disconnected us ({reason_text(reason)}{': ' + why if why else ''})"
            )
        else:
            raise ProtocolError(f"unexpected packet type {kind} from the broker")

    def _drop_incoming(self, exc: codec.InvalidPublish) -> None:
        """Acknowledge (0x90 topic name invalid) and drop a PUBLISH that is not valid text."""
        self._bad_incoming += 1
        if self._bad_incoming in (1, 10, 100) or self._bad_incoming % 1000 == 0:
            log.warning("%s (%d such message(s) so far)", exc, self._bad_incoming)
        if exc.qos:
            kind = codec.PUBACK if exc.qos == 1 else codec.PUBREC
            self._ack(codec.encode_ack(kind, exc.packet_id, 0x90))

    def _on_publish(self, message: Publish) -> None:
        if message.qos == 2:
            if message.packet_id in self._incoming_qos2:
                self._ack(codec.encode_ack(codec.PUBREC, message.packet_id))
                return  # a resend of one we already have
            self._incoming_qos2.add(message.packet_id)
        if not self.inbox:
            self._inbox_bytes = 0  # also right for owners that pop the inbox themselves
        size = len(message.payload)
        limit = self.params.max_queued_incoming_bytes
        if self._inbox_bytes > limit and (size > LARGE_INCOMING or self._inbox_bytes > 2 * limit):
            self._drop_overflow(message)
        else:
            self.inbox.append(message)
            self._inbox_bytes += size
            if len(self.inbox) == 1:
                self._wake()  # before the ack is queued: dispatch runs first, see _flush
            elif (
                len(self.inbox) > self.params.max_queued_incoming
                and not self._paused
                and not self._stalled
            ):
                self._paused = True
                transport = self._transport
                if isinstance(transport, asyncio.ReadTransport):
                    transport.pause_reading()
                self._loop.call_later(STALL_RESUME, self._check_stall, self._taken)
                log.warning(
                    "%d incoming messages wait for dispatch: reading paused until it catches up",
                    len(self.inbox),
                )
        if message.qos:
            kind = codec.PUBACK if message.qos == 1 else codec.PUBREC
            self._ack(codec.encode_ack(kind, message.packet_id))

    def _drop_overflow(self, message: Publish) -> None:
        self._dropped_incoming += 1
        n = self._dropped_incoming
        if n in (1, 10, 100) or n % 1000 == 0:
            log.warning(
                "%d bytes of incoming messages wait for dispatch: a %d-byte message to %s "
                "dropped (%d so far)",
                self._inbox_bytes,
                len(message.payload),
                message.topic[:200],
                n,
            )

    def _acked(self, packet_id: int, reason: int, props: Properties) -> None:
        out = self._inflight.pop(packet_id, None)
        if out is None:
            return
        self._last_acked = max(self._last_acked, out.seq)
        if reason >= 0x80:
            why = props.get(codec.REASON_STRING)
            self._count_refusal(
                out.topic,
                "the broker refused a publish to %s (%s%s): check the ACL",
                reason_text(reason),
                f": {why}" if why else "",
            )
        if out.future is not None and not out.future.done():
            out.future.set_result(reason)
        queued = self._queued
        while queued and len(self._inflight) < self._window:
            self._send(queued.popleft())
        if not self._inflight and self._idle_waiters:
            self._wake_idle()

    def _on_connack(self, body: bytes) -> None:
        _present, reason, props = codec.decode_connack(body)
        if self._connack.done():
            raise ProtocolError("a second CONNACK")
        if reason >= 0x80:
            error = ConnectRefused(reason, props.get(codec.REASON_STRING))
            self._error = error
            self._connack.set_exception(error)
            self._close_transport()
        else:
            self._connack.set_result(props)

    # ------------------------------------------------------------ keepalive

    def _tick(self) -> None:
        now = time.monotonic()
        interval = self._keepalive
        if (
            now - self._last_heard > interval * 1.5 and not self._paused
        ):  # paused: we stopped reading
            self._fail(f"the broker was silent for {now - self._last_heard:.1f}s (keepalive)")
            return
        if now - self._last_sent >= interval / 2:
            self._write(codec.PINGREQ_PACKET)
        self._ping_timer = self._loop.call_later(interval / 2, self._tick)

    # -------------------------------------------------------------- closing

    def _fail(self, why: str) -> None:
        if self._error is None:
            log.debug("closing the broker connection: %s", why)
            self._error = ConnectionLost(why)
        self._close_transport(abort=True)

    def _close_transport(self, *, abort: bool = False) -> None:
        transport = self._transport
        if transport is None:
            return
        if abort and isinstance(transport, asyncio.WriteTransport):
            transport.abort()
        else:
            transport.close()

    async def close(self, timeout: float = 1.0) -> None:
        """A normal DISCONNECT (so the broker drops the will), then close."""
        if self._transport is not None and self._error is None:
            self._error = ConnectionLost("connection closed by us")
            self._write(codec.DISCONNECT_PACKET)
            self._write_out()
            self._close_transport()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._closed)
        except TimeoutError:
            self._close_transport(abort=True)


async def connect(params: ConnectParams) -> Connection:
    """Open the transport, send CONNECT and wait for a successful CONNACK.

    Raises :class:`ConnectRefused` (with the broker's reason code) or
    :class:`ConnectionLost` (unreachable, timed out, closed).
    """
    loop = asyncio.get_running_loop()
    conn = Connection(params)
    try:
        async with asyncio.timeout(params.connect_timeout):
            if params.transport == "unix":
                await loop.create_unix_connection(lambda: conn, params.host)
            elif params.transport == "websockets":
                from daemon.mqtt.websocket import open_websocket

                await open_websocket(conn, params)
            else:
                await loop.create_connection(
                    lambda: conn,
                    params.host,
                    params.port,
                    ssl=params.tls,
                    server_hostname=params.host if params.tls else None,
                )
            conn.send_connect()
            await conn.wait_connack()
    except TimeoutError as exc:
        conn._close_transport(abort=True)
        raise ConnectionLost(
            f"no answer from the broker within {params.connect_timeout:g}s"
        ) from exc
    except (OSError, ssl.SSLError) as exc:
        conn._close_transport(abort=True)
        raise ConnectionLost(f"cannot connect: {exc}") from exc
    except BaseException:
        conn._close_transport(abort=True)
        raise
    return conn
