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
import logging
import ssl
from typing import Any

from daemon.mqtt import codec
from daemon.mqtt.errors import (
    ConnectionLost,
    ConnectRefused,
    MqttError,
    PublishRejected,
    SessionFull,
    SubscribeRefused,
)
from daemon.mqtt.handshake import (
    RETAIN_AVAILABLE,
    SERVER_REFERENCE,
    SHARED_AVAILABLE,
    SUBSCRIPTION_ID_AVAILABLE,
    WILDCARD_AVAILABLE,
)
from daemon.mqtt.params import (
    LARGE_INCOMING,
    MAX_QUEUED_INCOMING,
    MAX_QUEUED_INCOMING_BYTES,
    ConnectParams,
)
from daemon.mqtt.publishing import GOOD_TOPICS, MAX_LOGGED_TOPICS, MAX_STRIKES, REJECTING_REASONS
from daemon.mqtt.reading import RESUME_BELOW, STALL_RESUME, Reading
from daemon.mqtt.session import SESSION_BYTES, SESSION_MESSAGES, InFlight, Outgoing, Session
from daemon.mqtt.wire import WRITE_BUFFER_LIMIT

__all__ = [
    "GOOD_TOPICS",
    "LARGE_INCOMING",
    "MAX_LOGGED_TOPICS",
    "MAX_QUEUED_INCOMING",
    "MAX_QUEUED_INCOMING_BYTES",
    "MAX_STRIKES",
    "REJECTING_REASONS",
    "RESUME_BELOW",
    "RETAIN_AVAILABLE",
    "SERVER_REFERENCE",
    "SESSION_BYTES",
    "SESSION_MESSAGES",
    "SHARED_AVAILABLE",
    "STALL_RESUME",
    "SUBSCRIPTION_ID_AVAILABLE",
    "WILDCARD_AVAILABLE",
    "WRITE_BUFFER_LIMIT",
    "ConnectParams",
    "ConnectRefused",
    "Connection",
    "ConnectionLost",
    "InFlight",
    "MqttError",
    "Outgoing",
    "PublishRejected",
    "Session",
    "SessionFull",
    "SubscribeRefused",
    "connect",
]

# The connection's one logger, whichever of its modules speaks: log filters and
# the tests name it.
log = logging.getLogger("daemon.mqtt.connection")


class Connection(Reading):
    """The client side of one MQTT 5 connection (create it with :func:`connect`).

    Built in layers, one module each: :class:`~daemon.mqtt.wire.Wire` (transport,
    writing, keep-alive, closing), :class:`~daemon.mqtt.publishing.Publishing`
    (publishes and their acknowledgements),
    :class:`~daemon.mqtt.handshake.Handshake` (CONNECT, CONNACK, the session
    resumed) and :class:`~daemon.mqtt.reading.Reading` (packets in, the inbox);
    this class adds what ends a connection and subscriptions."""

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

    # ------------------------------------------------------------- requests

    @property
    def wildcards_ok(self) -> bool:
        return bool(self.server.get(WILDCARD_AVAILABLE, 1))

    @property
    def sub_ids_ok(self) -> bool:
        return bool(self.server.get(SUBSCRIPTION_ID_AVAILABLE, 1))

    @property
    def shared_ok(self) -> bool:
        return bool(self.server.get(SHARED_AVAILABLE, 1))

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

    # -------------------------------------------------------------- closing

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
