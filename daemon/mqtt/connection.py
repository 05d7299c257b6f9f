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
  :attr:`Connection.inbox` for the owner to dispatch; past
  ``max_queued_incoming`` the socket is paused (TCP back-pressure to the
  broker) instead of dropping anything;
* QoS 1 and 2 publishes respect the broker's Receive Maximum and our own
  ``max_inflight``; the rest wait in order.  Publishes that were never
  acknowledged when the connection drops can be taken back with
  :meth:`Connection.take_unacked` and sent again on the next connection;
* keep-alive: PINGREQ when nothing was sent for half the interval, and a
  connection that has heard nothing for 1.5 intervals is dropped.

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


class MqttError(BusError):
    """The connection failed or was lost."""


class ConnectionLost(MqttError):
    """The connection is gone (closed by either side, or unreachable)."""


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


class _InFlight:
    """A QoS 1/2 publish until the broker has acknowledged it."""

    __slots__ = ("future", "packet_id", "payload", "props", "qos", "released", "retain", "topic")

    def __init__(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int,
        retain: bool,
        props: bytes,
        future: asyncio.Future[int] | None,
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.props = props
        self.future = future
        self.packet_id = 0
        self.released = False  # QoS 2: PUBREC seen, PUBREL sent


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A publish as its owner keeps it until it is sent: the bus's backlog and
    outbox, and what :meth:`Connection.take_unacked` hands back."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    props: bytes  # the encoded MQTT 5 property block


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
        self._keepalive = params.keepalive
        self._max_qos = 2
        self._last_sent = self._last_heard = time.monotonic()
        self._ping_timer: asyncio.TimerHandle | None = None
        self._refused_publishes = 0
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
        self._transport = self._write_transport = None
        if self._ping_timer is not None:
            self._ping_timer.cancel()
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
    ) -> asyncio.Future[int] | None:
        """Send a PUBLISH.  With ``ack`` (QoS 1/2 only), a future for the broker's
        reason code; otherwise fire and forget (see :meth:`take_unacked`)."""
        if self._error is not None or self._transport is None:
            raise self._error or ConnectionLost("not connected")
        if threading.get_ident() != self._thread:
            raise MqttError("publish from outside the connection's event loop thread")
        qos = min(qos, self._max_qos)
        if not qos:
            self._write(
                codec.encode_publish(
                    topic.encode(), payload, qos=0, retain=retain, packet_id=0, props=props
                )
            )
            return None
        future = self._loop.create_future() if ack else None
        out = _InFlight(topic, payload, qos=qos, retain=retain, props=props, future=future)
        if len(self._inflight) < self._window and not self._queued:
            self._send(out)
        else:
            self._queued.append(out)
        return future

    def _send(self, out: _InFlight) -> None:
        out.packet_id = packet_id = self._packet_id()
        self._inflight[packet_id] = out
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
        return packet_id

    def take_unacked(self) -> list[Outgoing]:
        """Once closed: the fire-and-forget publishes the broker never acknowledged,
        in the order they were made (those with a future failed instead)."""
        left = [*self._inflight.values(), *self._queued]
        self._inflight.clear()
        self._queued.clear()
        return [
            Outgoing(o.topic, o.payload, o.qos, o.retain, o.props)
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

    def taken(self) -> None:
        """The owner took messages from the inbox: resume reading if it had paused."""
        if self._paused and len(self.inbox) < RESUME_BELOW:
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
            self._on_publish(codec.decode_publish(first, body))
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
                self._ack(codec.encode_ack(codec.PUBREL, packet_id))
        elif kind == codec.PUBREL:
            packet_id = codec.decode_ack(body)[0]
            self._incoming_qos2.discard(packet_id)
            self._ack(codec.encode_ack(codec.PUBCOMP, packet_id))
        elif kind in (codec.SUBACK, codec.UNSUBACK):
            packet_id, codes, _props = codec.decode_suback(body)
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
            self._fail(
                f"the broker disconnected us ({reason_text(reason)}{': ' + why if why else ''})"
            )
        else:
            raise ProtocolError(f"unexpected packet type {kind} from the broker")

    def _on_publish(self, message: Publish) -> None:
        if message.qos == 2:
            if message.packet_id in self._incoming_qos2:
                self._ack(codec.encode_ack(codec.PUBREC, message.packet_id))
                return  # a resend of one we already have
            self._incoming_qos2.add(message.packet_id)
        self.inbox.append(message)
        if len(self.inbox) == 1:
            self._wake()  # before the ack is queued: dispatch runs first, see _flush
        elif len(self.inbox) > self.params.max_queued_incoming and not self._paused:
            self._paused = True
            transport = self._transport
            if isinstance(transport, asyncio.ReadTransport):
                transport.pause_reading()
            log.warning(
                "%d incoming messages wait for dispatch: reading paused until it catches up",
                len(self.inbox),
            )
        if message.qos:
            kind = codec.PUBACK if message.qos == 1 else codec.PUBREC
            self._ack(codec.encode_ack(kind, message.packet_id))

    def _acked(self, packet_id: int, reason: int, props: Properties) -> None:
        out = self._inflight.pop(packet_id, None)
        if out is None:
            return
        if reason >= 0x80:
            self._refused_publishes += 1
            if self._refused_publishes in (1, 10, 100) or self._refused_publishes % 1000 == 0:
                why = props.get(codec.REASON_STRING)
                log.warning(
                    "the broker refused a publish to %s (%s%s): check the ACL (%d refused so far)",
                    out.topic,
                    reason_text(reason),
                    f": {why}" if why else "",
                    self._refused_publishes,
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
