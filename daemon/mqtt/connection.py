"""One MQTT 5 client connection on an asyncio transport, and the session that
outlives it.

Why our own client rather than paho-mqtt (through aiomqtt): on the task hot
path every process is bound by per-packet CPU, and paho spent most of it on
syscalls and bookkeeping — one ``send`` per packet, three to four ``recv``
calls per packet read a byte at a time, a thread-safe message-info object and
a 27-entry property table per PUBLISH (docs/mqtt.md has the measurements).  Here:

* every packet written during one event-loop iteration leaves in a single
  ``transport.write`` (acks included), and a read takes whatever the kernel
  has — one syscall for many packets each way;
* incoming PUBLISH packets are acknowledged on read and queued in
  :attr:`Connection.inbox` for the owner to dispatch (:meth:`Connection.take`);
  past ``max_queued_incoming`` messages the socket is paused (TCP back-pressure
  to the broker) instead of dropping anything, unless dispatch itself waits for
  something only reading brings; past ``max_queued_incoming_bytes`` of payload,
  large messages are dropped (see ``LARGE_INCOMING``) and counted;
* QoS 1 and 2 publishes live in a :class:`Session` from the moment they are
  made until the broker has acknowledged them; they respect the broker's Receive
  Maximum and our own ``max_inflight``; the rest wait in order, bounded in
  messages and bytes.  A kept session survives the connection: the next one
  resends with DUP when the broker kept its side (Session Present), or as new
  publishes when it did not; incoming QoS 2 state is kept the same way;
* every CONNACK capability is honoured: Maximum Packet Size, Retain Available,
  Maximum QoS (publishes above it are sent at it, with one warning),
  Wildcard / Subscription Identifier / Shared Subscription Available, Receive
  Maximum, Server Keep Alive, Assigned Client Identifier, Session Expiry;
  what the broker would refuse is refused here, with an error to the caller;
* keep-alive: PINGREQ when nothing was sent for half the interval, and a
  connection that has heard nothing for 1.5 intervals is dropped;
* a publish the broker will never take is not sent again: one the broker closed
  the connection on is identified and dropped (see :meth:`Connection._blame`);
  a PUBLISH from the broker whose topic is not valid text is acknowledged and
  dropped, the connection goes on; a packet that breaks the protocol gets a
  DISCONNECT with its reason code before the connection is closed;
* QoS 0 publishes to a broker that stopped reading are dropped (counted) once
  ``WRITE_BUFFER_LIMIT`` bytes wait unsent, instead of buffering without bound.

What it leaves out, because nothing in the realm uses it: topic aliases (we
announce Topic Alias Maximum 0 and send none), enhanced authentication (AUTH),
session state on disk (a process that restarts starts a clean session).
"""

from __future__ import annotations

import asyncio
import contextlib
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
# A publish that was the oldest one the broker had not acknowledged when it closed the
# connection, this many times, is given up: a broker that closes on a bad packet without
# saying why would otherwise get it first on every reconnect, forever.
MAX_STRIKES: Final = 3
# Topics whose refusal (PUBACK >= 0x80) gets a log line of its own; later ones are counted.
MAX_LOGGED_TOPICS: Final = 256
# What a session holds by default: QoS 1/2 publishes not yet acknowledged (queued or in
# flight), in messages and in bytes (topic + payload + properties).
SESSION_MESSAGES: Final = 100_000
SESSION_BYTES: Final = 64 * 1024 * 1024
# Bytes the transport may hold unsent (a broker that stopped reading) before QoS 0
# publishes are dropped; QoS 1/2 are bounded by the in-flight window and the session.
WRITE_BUFFER_LIMIT: Final = 8 * 1024 * 1024
# Topic names remembered as checked, per connection (past it the set starts again).
GOOD_TOPICS: Final = 4096


def _valid(first: int) -> bool:
    try:
        codec.check_flags(first)
    except ProtocolError:
        return False
    return True


# First bytes of every packet other than PUBLISH whose flags are right (2.1.3).
_VALID_FIRST_BYTES: Final = frozenset(b for b in range(256) if b >> 4 != 3 and _valid(b))
# CONNACK properties (3.2.2.3) this module reads by name.
RETAIN_AVAILABLE: Final = 0x25
WILDCARD_AVAILABLE: Final = 0x28
SUBSCRIPTION_ID_AVAILABLE: Final = 0x29
SHARED_AVAILABLE: Final = 0x2A
SERVER_REFERENCE: Final = 0x1C


class MqttError(BusError):
    """The connection failed or was lost."""


class ConnectionLost(MqttError):
    """The connection is gone (closed by either side, or unreachable)."""


class PublishRejected(MqttError):
    """The broker will never take this publish (a reason code >= 0x80, or it closed
    the connection on it), or it cannot be sent at all: it is not sent again."""

    def __init__(self, message: str, reason: int) -> None:
        super().__init__(message)
        self.reason = reason


class SessionFull(MqttError):
    """The session holds as many unacknowledged publishes (or bytes) as it may."""


# Why a subscription is refused here, before the broker sees it.
_LOCAL_REFUSALS: Final = {
    0xA2: "the broker has no wildcard subscriptions",
    0x9E: "the broker has no shared subscriptions",
    0x95: "over the broker's Maximum Packet Size",
}


class SubscribeRefused(MqttError):
    """A subscription the broker refused (SUBACK >= 0x80) or would refuse."""

    def __init__(self, topic_filter: str, reason: int) -> None:
        text = _LOCAL_REFUSALS.get(reason) or f"refused by the broker ({reason_text(reason)})"
        super().__init__(f"subscription to {topic_filter[:200]!r}: {text}")
        self.reason = reason


class ConnectRefused(MqttError):
    """The broker answered CONNECT with a failure reason code (``legacy``: it
    answered as an MQTT 3.1.1 broker)."""

    def __init__(self, code: int, reason: str | None = None) -> None:
        text = reason_text(code) + (f": {reason}" if reason else "")
        super().__init__(f"connection refused ({text})")
        self.code = code
        self.legacy = False


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
    """A QoS 1/2 publish from the moment it is made until the broker has
    acknowledged it (or it is given up), across connections when its
    :class:`Session` is kept."""

    __slots__ = (
        "expires",
        "expiry",
        "future",
        "others_before",
        "packet_id",
        "payload",
        "props",
        "qos",
        "released",
        "retain",
        "seq",
        "size",
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
        expiry: float | None = None,
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.props = props
        self.future = future
        self.strikes = strikes
        self.size = len(topic) + len(payload) + len(props)
        self.expiry = expiry  # the Message Expiry Interval asked for (s), aged on resend
        self.expires = time.monotonic() + expiry if expiry else 0.0
        self.packet_id = 0  # 0: not sent on the broker's session yet
        self.released = False  # QoS 2: PUBREC seen, PUBREL sent
        self.seq = 0  # when it was written (Connection._seq)
        self.others_before = 0  # the last other packet the broker does not acknowledge


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A publish as its owner prepares it (:class:`daemon.bus.Bus`)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    props: bytes  # the encoded MQTT 5 property block
    expiry: float | None = None  # Message Expiry Interval (s), also in ``props``

    @property
    def size(self) -> int:
        """What it takes of a session's byte bound (as :class:`_InFlight` counts it)."""
        return len(self.topic) + len(self.payload) + len(self.props)


class Session:
    """The client's side of an MQTT session: what must outlive one connection.

    * outgoing QoS 1/2 publishes, from the moment they are made until the broker
      has acknowledged them: :attr:`queued` (not sent yet: no connection, or the
      in-flight window is full) and :attr:`inflight` (sent, by packet id, in the
      order sent);
    * the packet ids of incoming QoS 2 publishes not yet released (PUBREL), so a
      resent one is not delivered twice.

    A session made by its owner and handed to every :func:`connect` is *kept*:
    when a connection drops, its publishes wait (their futures stay pending) and
    the next connection sends them — with DUP and their packet ids when the broker
    kept its side (Session Present), otherwise as new publishes.  A session
    :func:`connect` makes for itself is not kept: a lost connection fails them.

    Bounded in messages and bytes (topic + payload + properties): past either,
    :meth:`admit` raises :class:`SessionFull` and :meth:`wait_room` waits.
    """

    def __init__(
        self,
        *,
        max_messages: int = SESSION_MESSAGES,
        max_bytes: int = SESSION_BYTES,
        keep: bool = True,
    ) -> None:
        self.inflight: dict[int, _InFlight] = {}
        self.queued: deque[_InFlight] = deque()
        self.incoming_qos2: set[int] = set()
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.keep = keep
        self.connection: Connection | None = None
        self.bytes = 0
        self.dropped = 0  # QoS 0 offline or to a broker that stopped reading
        self.expired = 0  # their Message Expiry passed before they could be sent
        self.given_up = 0  # the broker closed the connection on them MAX_STRIKES times
        self._next_id = 0
        self._room: deque[asyncio.Future[None]] = deque()
        self._idle: list[asyncio.Future[None]] = []

    def __len__(self) -> int:
        return len(self.inflight) + len(self.queued)

    def has_room(self, size: int) -> bool:
        """Whether a publish of ``size`` bytes fits (one always fits an empty session)."""
        n = len(self.inflight) + len(self.queued)
        if n >= self.max_messages:
            return False
        return n == 0 or self.bytes + size <= self.max_bytes

    async def wait_room(self, size: int) -> None:
        """Until :meth:`has_room` (back-pressure for publishers that can wait)."""
        loop = asyncio.get_running_loop()
        while not self.has_room(size):
            waiter = loop.create_future()
            self._room.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._room:
                    self._room.remove(waiter)

    async def wait_idle(self) -> None:
        """Until nothing is queued or in flight."""
        while self.inflight or self.queued:
            waiter = asyncio.get_running_loop().create_future()
            self._idle.append(waiter)
            await waiter

    def admit(self, out: _InFlight) -> None:
        if not self.has_room(out.size):
            raise SessionFull(
                f"{len(self)} publishes ({self.bytes} bytes) wait for the broker: "
                f"publish to {out.topic[:200]!r} refused"
            )
        self.bytes += out.size

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
        """Publish through the live connection, or keep it for the next one (QoS 1/2;
        QoS 0 is at most once: dropped and counted while there is none)."""
        conn = self.connection
        if conn is not None and conn.usable:
            return conn.publish(topic, payload, qos, retain, props, ack=ack, expiry=expiry)
        if not qos:
            self.dropped += 1
            return None
        if not self.keep:
            raise ConnectionLost("not connected")
        future = asyncio.get_running_loop().create_future() if ack else None
        out = _InFlight(
            topic, payload, qos=qos, retain=retain, props=props, future=future, expiry=expiry
        )
        self.admit(out)
        self.queued.append(out)
        return future

    def packet_id(self, taken: dict[int, Any]) -> int:
        inflight = self.inflight
        for _ in range(65_535):
            self._next_id = self._next_id % 65_535 + 1
            if self._next_id not in inflight and self._next_id not in taken:
                return self._next_id
        raise MqttError("no free packet identifier")

    def finish(self, out: _InFlight, reason: int | BaseException) -> None:
        """``out`` is done (acknowledged, refused or given up): free its room."""
        self.bytes -= out.size
        future = out.future
        if future is not None and not future.done():
            if isinstance(reason, BaseException):
                future.set_exception(reason)
                future.exception()  # retrieved: the publisher may have stopped waiting
            else:
                future.set_result(reason)
        if self._room:
            self._wake_room()
        if self._idle and not self.inflight and not self.queued:
            waiters, self._idle = self._idle, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _wake_room(self) -> None:
        while self._room:
            waiter = self._room[0]
            if waiter.done():
                self._room.popleft()
                continue
            waiter.set_result(None)  # it checks has_room itself, and waits again if not
            self._room.popleft()
            if not self.has_room(1):
                break

    def fail_all(self, error: MqttError) -> None:
        """Give every publish up (a session that is not kept lost its connection)."""
        left = [*self.inflight.values(), *self.queued]
        self.inflight.clear()
        self.queued.clear()
        for out in left:
            self.finish(out, error)


class Connection(asyncio.Protocol):
    """The client side of one MQTT 5 connection (create it with :func:`connect`)."""

    def __init__(self, params: ConnectParams, session: Session | None = None) -> None:
        self.params = params
        self.session = session if session is not None else Session(keep=False)
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
        self._window = 0  # in-flight QoS>0 publishes allowed: 0 until CONNACK
        # A kept session's owner says when new publishes may go (start_sending): not
        # before it has resubscribed, so the answers to them can be heard.
        self._hold = self.session.keep
        self._requests: dict[int, asyncio.Future[list[int]]] = {}
        self._connack: asyncio.Future[Properties] = self._loop.create_future()
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._error: MqttError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._write_paused = False  # the transport's buffer is past WRITE_BUFFER_LIMIT
        self._inbox_bytes = 0  # payload bytes in the inbox
        self._taken = 0  # messages taken from the inbox, ever (see STALL_RESUME)
        self._stalled = False  # reading resumed because dispatch was blocked
        self._dropped_incoming = 0  # over MAX_QUEUED_INCOMING_BYTES
        self._keepalive = params.keepalive
        self._max_qos = 2
        self._downgraded = False
        self._retain_ok = True
        self._last_sent = self._last_heard = time.monotonic()
        self._ping_timer: asyncio.TimerHandle | None = None
        self._refused_publishes = 0
        self._refused_topics: set[str] = set()
        self._bad_incoming = 0
        self._max_send = 0  # the broker's Maximum Packet Size (0: none said)
        self._good_topics: set[str] = set()  # topic names already checked (hot path)
        # Packets written, in order: what a broker's DISCONNECT can be blamed on.
        self._seq = 0
        self._last_other = 0  # seq of the last packet not acknowledged by the broker
        self._last_acked = 0  # seq of the newest packet the broker acknowledged
        self._request_seqs: dict[int, int] = {}
        self.broker_reason: int | None = None  # a DISCONNECT's reason; -1: closed silently
        self.connected_at = 0.0  # time.monotonic() of the CONNACK
        self.session_present = False
        # The broker closed the connection with a publish of ours unacknowledged: a
        # refusal, more likely than another process taking our client id over.
        self.closed_on_publish = False
        self.client_id = params.client_id  # or the broker's Assigned Client Identifier
        self.inbox: deque[Publish] = deque()
        self.server: Properties = {}

    # ----------------------------------------------------------- transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        assert isinstance(transport, asyncio.WriteTransport)
        self._write_transport = transport
        with contextlib.suppress(NotImplementedError):  # the websocket framing has none
            transport.set_write_buffer_limits(high=WRITE_BUFFER_LIMIT)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._error is None:
            detail = f": {exc}" if exc else ""
            if not self._connack.done():
                detail += (
                    " before it answered CONNECT (some brokers, rumqttd among them, refuse"
                    " a wrong user name or password that way)"
                )
            self._error = ConnectionLost(f"connection to the broker lost{detail}")
            if self._connack.done():
                self.broker_reason = -1  # not us: the broker (or the network) closed it
        self._transport = self._write_transport = None
        if self._ping_timer is not None:
            self._ping_timer.cancel()
        session = self.session
        if session.connection is self:
            session.connection = None
        if self.broker_reason is not None:
            self._blame(self.broker_reason)
        error = self._error
        futures: list[asyncio.Future[Any]] = [self._connack, *self._requests.values()]
        for future in futures:
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: nobody may be waiting any more
        self._requests.clear()
        if not session.keep:
            session.fail_all(error)
        self._wake()
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
                if self._error is not None:
                    break  # the handler ended the connection: read no further
        except ProtocolError as exc:
            self._protocol_error(f"malformed packet from the broker: {exc}", exc.reason)
        except (IndexError, ValueError) as exc:  # the codec raises ProtocolError: a belt
            self._protocol_error(f"malformed packet from the broker: {exc}", 0x81)

    def _protocol_error(self, why: str, reason: int) -> None:
        """The broker broke the protocol: say why in a DISCONNECT (4.13), then close."""
        if self._error is None and self._write_transport is not None:
            log.warning("closing the broker connection: %s (%s)", why, reason_text(reason))
            self._out.clear()
            self._write(codec.encode_disconnect(reason, why))
            self._write_out()
        self._fail(why)

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

    # ------------------------------------------------------------- writing

    def _write(self, data: bytes) -> None:
        self._acks_only = False
        self._out.append(data)
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
        await self._connack

    def _on_connack(self, body: bytes) -> None:
        if self._connack.done():
            raise ProtocolError("a second CONNACK")
        try:
            present, reason, props = codec.decode_connack(body)
        except codec.LegacyConnack as exc:
            error = ConnectRefused(
                0x84, f"{exc}; M-TOR needs an MQTT 5 broker (Mosquitto 1.6 or later, ...)"
            )
            error.legacy = True
            self._refused(error)
            return
        if reason >= 0x80:
            self._refused(ConnectRefused(reason, props.get(codec.REASON_STRING)))
            reference = props.get(SERVER_REFERENCE)
            if reference:
                log.warning("the broker refers us to another server: %s", reference)
            return
        if present and self.params.clean_start:
            raise ProtocolError("CONNACK with Session Present after a Clean Start", 0x82)
        self.server = props
        self.connected_at = time.monotonic()
        self.session_present = present
        p = self.params
        self._window = min(p.max_inflight, props.get(codec.RECEIVE_MAXIMUM, 65_535))
        self._max_send = props.get(codec.MAXIMUM_PACKET_SIZE, 0)
        self._keepalive = props.get(codec.SERVER_KEEP_ALIVE, p.keepalive)
        # A broker that supports less than QoS 2 disconnects a client that publishes above it.
        self._max_qos = props.get(codec.MAXIMUM_QOS, 2)
        self._retain_ok = bool(props.get(RETAIN_AVAILABLE, 1))
        assigned = props.get(codec.ASSIGNED_CLIENT_ID)
        if assigned:
            self.client_id = assigned
        if self._keepalive:
            self._ping_timer = self._loop.call_later(self._keepalive / 2, self._tick)
        expiry = props.get(codec.SESSION_EXPIRY, p.session_expiry)
        if expiry < p.session_expiry:
            log.info(
                "the broker keeps our session %d s after a disconnect (we asked %d s)",
                expiry,
                p.session_expiry,
            )
        self._resume_session(present)
        self._connack.set_result(props)

    def _refused(self, error: ConnectRefused) -> None:
        self._error = error
        self._connack.set_exception(error)
        self._close_transport()

    def _resume_session(self, present: bool) -> None:
        """Take the session over (4.4): with Session Present, resend what the broker
        never acknowledged — PUBLISH with DUP and its packet id, PUBREL for a QoS 2
        publish it received — in the order first sent; without, the broker's side is
        gone: what was in flight is sent again as new publishes.  That includes a QoS 2
        publish past PUBREC: Mosquitto delivers QoS 2 on PUBREL, so not resending it
        loses it; a broker that delivered it on PUBLISH delivers it twice (at least
        once, only when a session was lost)."""
        session = self.session
        session.connection = self
        inflight = session.inflight
        if present:
            for out in inflight.values():
                self._seq += 1
                out.seq = self._seq
                out.others_before = self._last_other
                if out.released:
                    self._write(codec.encode_ack(codec.PUBREL, out.packet_id))
                else:
                    self._write(self._encode(out, dup=True))
        else:
            session.incoming_qos2.clear()
            again = []
            for out in list(inflight.values()):
                out.packet_id = out.seq = 0
                out.released = False
                again.append(out)
            inflight.clear()
            session.queued.extendleft(reversed(again))
        if not self._hold:
            self._send_queued()

    def start_sending(self) -> None:
        """Send what the session queued (a kept session's owner calls this once it
        has resubscribed); from now on publishes go out as they are made."""
        self._hold = False
        if self.usable:
            self._send_queued()

    # ------------------------------------------------------------- requests

    @property
    def closed(self) -> bool:
        """No longer usable (failed, lost or closed; the socket may still be closing)."""
        return self._error is not None or self._closed.done()

    @property
    def error(self) -> MqttError:
        """Why the connection ended (only once it has)."""
        return self._error or ConnectionLost("connection to the broker lost")

    @property
    def usable(self) -> bool:
        return self._error is None and self._transport is not None

    @property
    def wildcards_ok(self) -> bool:
        return bool(self.server.get(WILDCARD_AVAILABLE, 1))

    @property
    def sub_ids_ok(self) -> bool:
        return bool(self.server.get(SUBSCRIPTION_ID_AVAILABLE, 1))

    @property
    def shared_ok(self) -> bool:
        return bool(self.server.get(SHARED_AVAILABLE, 1))

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
        out = _InFlight(
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

    def _encode(self, out: _InFlight, *, dup: bool = False) -> bytes:
        return codec.encode_publish(
            out.topic.encode(),
            out.payload,
            qos=out.qos,
            retain=out.retain,
            packet_id=out.packet_id,
            props=out.props,
            dup=dup,
        )

    def _send(self, out: _InFlight) -> None:
        if out.expires and not self._age(out):
            return
        out.packet_id = packet_id = self.session.packet_id(self._requests)
        self.session.inflight[packet_id] = out
        self._seq += 1
        out.seq = self._seq
        out.others_before = self._last_other
        self._write(self._encode(out))

    def _age(self, out: _InFlight) -> bool:
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

    async def subscribe(self, topic_filter: str, options: int, sub_id: int = 0) -> list[int]:
        """SUBSCRIBE one filter; the broker's reason codes (>= 0x80: refused).

        What the broker said it lacks is refused here (:class:`SubscribeRefused`):
        wildcards, shared subscriptions; a Subscription Identifier is left out
        when the broker has none."""
        if not self.wildcards_ok and ("+" in topic_filter or "#" in topic_filter):
            raise SubscribeRefused(topic_filter, 0xA2)
        if not self.shared_ok and topic_filter.startswith("$share/"):
            raise SubscribeRefused(topic_filter, 0x9E)
        if not self.sub_ids_ok:
            sub_id = 0
        if self._max_qos < (options & 3):
            options = options & ~3 | self._max_qos
        packet = codec.encode_subscribe(0, topic_filter, options, sub_id)
        if self._max_send and len(packet) > self._max_send:
            raise SubscribeRefused(topic_filter, 0x95)
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
        packet_id = self.session.packet_id(self._requests)
        self._requests[packet_id] = self._loop.create_future()
        if self._paused:
            self._resume()
        self._seq += 1
        self._last_other = self._request_seqs[packet_id] = self._seq
        return packet_id

    async def wait_acknowledged(self) -> None:
        """Until every QoS>0 publish made so far is acknowledged (or the connection ends)."""
        session = self.session
        if (session.inflight or session.queued) and not self.closed:
            idle = asyncio.ensure_future(session.wait_idle())
            try:
                await asyncio.wait([idle, self._closed], return_when=asyncio.FIRST_COMPLETED)
            finally:
                idle.cancel()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

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
        if kind != codec.PUBLISH and first not in _VALID_FIRST_BYTES:
            codec.check_flags(first)  # raises
        if kind == codec.PUBLISH:
            if not self._connack.done():
                raise ProtocolError("PUBLISH before CONNACK", 0x82)
            try:
                message = codec.decode_publish(first, body)
            except codec.InvalidPublish as exc:
                self._drop_incoming(exc)
                return
            self._on_publish(message)
        elif kind in (codec.PUBACK, codec.PUBCOMP):
            packet_id, reason, props = codec.decode_ack(body)
            self._acked(packet_id, reason, props, kind)
        elif kind == codec.PUBREC:
            self._on_pubrec(*codec.decode_ack(body))
        elif kind == codec.PUBREL:
            packet_id = codec.decode_ack(body)[0]
            known = packet_id in self.session.incoming_qos2
            self.session.incoming_qos2.discard(packet_id)
            self._ack(codec.encode_ack(codec.PUBCOMP, packet_id, 0 if known else 0x92))
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
            reference = props.get(SERVER_REFERENCE)
            if reference:
                log.warning("the broker refers us to another server: %s", reference)
            self.broker_reason = reason
            self._fail(
                "the broker disconnected us "
                f"({reason_text(reason, codec.DISCONNECT)}{': ' + why if why else ''})"
            )
        else:
            raise ProtocolError(f"unexpected packet type {kind} from the broker", 0x82)

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

    def _drop_incoming(self, exc: codec.InvalidPublish) -> None:
        """Acknowledge (0x90 topic name invalid) and drop a PUBLISH that is not valid text."""
        self._bad_incoming += 1
        if self._bad_incoming in (1, 10, 100) or self._bad_incoming % 1000 == 0:
            log.warning("%s (%d such message(s) so far)", exc, self._bad_incoming)
        if exc.qos:
            kind = codec.PUBACK if exc.qos == 1 else codec.PUBREC
            self._ack(codec.encode_ack(kind, exc.packet_id, exc.reason))

    def _on_publish(self, message: Publish) -> None:
        if message.qos == 2:
            received = self.session.incoming_qos2
            if message.packet_id in received:
                self._ack(codec.encode_ack(codec.PUBREC, message.packet_id))
                return  # a resend of one we already have
            received.add(message.packet_id)
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

    @property
    def dropped_incoming(self) -> int:
        """Incoming messages dropped because dispatch was too far behind."""
        return self._dropped_incoming

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


async def connect(params: ConnectParams, session: Session | None = None) -> Connection:
    """Open the transport, send CONNECT and wait for a successful CONNACK.

    ``session``: the client's session state, kept across connections (see
    :class:`Session`); without one, a session of this connection alone.

    Raises :class:`ConnectRefused` (with the broker's reason code) or
    :class:`ConnectionLost` (unreachable, timed out, closed).
    """
    loop = asyncio.get_running_loop()
    conn = Connection(params, session)
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
