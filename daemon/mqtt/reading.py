"""The layer of :class:`daemon.mqtt.connection.Connection` that reads: packets cut
from whatever the kernel has, dispatched by type; incoming PUBLISH acknowledged on
read and queued in :attr:`Reading.inbox`, with back-pressure (reading paused past
``max_queued_incoming`` messages) and large messages dropped past
``max_queued_incoming_bytes`` of payload."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Final

from daemon.mqtt import codec
from daemon.mqtt.codec import ProtocolError, Publish, reason_text
from daemon.mqtt.handshake import SERVER_REFERENCE, Handshake
from daemon.mqtt.params import LARGE_INCOMING, MAX_QUEUED_INCOMING, ConnectParams
from daemon.mqtt.session import Session

# The connection's one logger, whichever of its modules speaks: log filters and
# the tests name it.
log = logging.getLogger("daemon.mqtt.connection")

# Dispatch has caught up again below this many: reading resumes.
RESUME_BELOW: Final = MAX_QUEUED_INCOMING // 2

# While reading is paused, dispatch must keep taking messages; if it takes none for
# this long it is blocked, most likely on something only reading can bring (an
# acknowledgement, a flow-control slot that one frees): reading resumes, and does not
# pause again until dispatch has taken a message.
STALL_RESUME: Final = 0.1


def _valid(first: int) -> bool:
    try:
        codec.check_flags(first)
    except ProtocolError:
        return False
    return True


# First bytes of every packet other than PUBLISH whose flags are right (2.1.3).
_VALID_FIRST_BYTES: Final = frozenset(b for b in range(256) if b >> 4 != 3 and _valid(b))


class Reading(Handshake):
    """Incoming packets, and the inbox of incoming messages."""

    def __init__(self, params: ConnectParams, session: Session | None = None) -> None:
        super().__init__(params, session)
        self._chunks: list[bytes] = []
        self._have = 0
        self._need = 0
        self._waiter: asyncio.Future[None] | None = None
        self._inbox_bytes = 0  # payload bytes in the inbox
        self._taken = 0  # messages taken from the inbox, ever (see STALL_RESUME)
        self._stalled = False  # reading resumed because dispatch was blocked
        self._dropped_incoming = 0  # over MAX_QUEUED_INCOMING_BYTES
        self._bad_incoming = 0
        self.inbox: deque[Publish] = deque()

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

    # ---------------------------------------------------------------- inbox

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
