"""The layer of :class:`daemon.mqtt.connection.Connection` that opens the MQTT
session: CONNECT, the CONNACK's capabilities taken in (Receive Maximum, Maximum
Packet Size, Maximum QoS, Retain Available, Server Keep Alive, Assigned Client
Identifier, Session Expiry) and the kept session resumed (4.4)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final

from daemon.mqtt import codec
from daemon.mqtt.codec import Properties, ProtocolError
from daemon.mqtt.errors import ConnectRefused
from daemon.mqtt.params import ConnectParams
from daemon.mqtt.publishing import Publishing
from daemon.mqtt.session import Session

# The connection's one logger, whichever of its modules speaks: log filters and
# the tests name it.
log = logging.getLogger("daemon.mqtt.connection")

# CONNACK properties (3.2.2.3) this module reads by name.
RETAIN_AVAILABLE: Final = 0x25
WILDCARD_AVAILABLE: Final = 0x28
SUBSCRIPTION_ID_AVAILABLE: Final = 0x29
SHARED_AVAILABLE: Final = 0x2A
SERVER_REFERENCE: Final = 0x1C


class Handshake(Publishing):
    """CONNECT / CONNACK and the session taken over."""

    def __init__(self, params: ConnectParams, session: Session | None = None) -> None:
        super().__init__(params, session)
        self._connack: asyncio.Future[Properties] = self._loop.create_future()
        self.connected_at = 0.0  # time.monotonic() of the CONNACK
        self.session_present = False
        self.client_id = params.client_id  # or the broker's Assigned Client Identifier
        self.server: Properties = {}

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
