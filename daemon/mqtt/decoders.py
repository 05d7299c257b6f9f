"""Decoders of the packets a broker sends (3.2-3.14): each reads one packet's body
(what :func:`~daemon.mqtt.primitives.split_packets` cut out) and raises
:class:`~daemon.mqtt.primitives.ProtocolError` with the reason code to disconnect
with.  Part of :mod:`daemon.mqtt.codec`, which callers use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from daemon.mqtt.primitives import (
    PROTOCOL_ERROR,
    TOPIC_ALIAS_INVALID,
    InvalidPublish,
    InvalidString,
    LegacyConnack,
    ProtocolError,
    strict_text,
)
from daemon.mqtt.properties import (
    CONTENT_TYPE,
    CORRELATION_DATA,
    MESSAGE_EXPIRY,
    PAYLOAD_FORMAT,
    RESPONSE_TOPIC,
    SUBSCRIPTION_ID,
    TOPIC_ALIAS,
    USER_PROPERTY,
    Properties,
    read_properties,
)


@dataclass(frozen=True, slots=True)
class Publish:
    """An incoming PUBLISH."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    packet_id: int
    properties: Properties


# The properties a PUBLISH may carry (3.3.2.3); any other is a Malformed Packet (2.2.2.2).
_PUBLISH_PROPERTIES: Final = frozenset(
    {PAYLOAD_FORMAT, MESSAGE_EXPIRY, CONTENT_TYPE, RESPONSE_TOPIC, CORRELATION_DATA}
    | {SUBSCRIPTION_ID, TOPIC_ALIAS, USER_PROPERTY}
)


def decode_publish(first: int, data: bytes) -> Publish:
    """The body of a PUBLISH (3.3) whose fixed header's first byte is ``first``.

    A topic that is not a valid Topic Name (not UTF-8, U+0000, a wildcard:
    1.5.4, 3.3.2-2) or a string property that is not valid text raises
    :class:`InvalidPublish` (with the QoS and packet id, so it can be
    acknowledged with 0x90 and dropped).  Anything else wrong raises
    :class:`ProtocolError` with the reason code to disconnect with: QoS 3
    (0x81), DUP on QoS 0 (3.3.1-2), packet identifier 0 (2.2.1-3), an empty
    topic without a Topic Alias (3.3.2-1), Subscription Identifier 0 (3.3.4-6)
    are protocol errors (0x82); a Topic Alias is 0x94, as we announce a Topic
    Alias Maximum of 0 (3.2.2.3.8 on the client's side: 3.3.2-8).
    """
    qos = first >> 1 & 3
    if qos == 3:
        raise ProtocolError("PUBLISH with QoS 3")  # 3.3.1-4: malformed
    if first & 0x08 and not qos:
        raise ProtocolError("PUBLISH with DUP set at QoS 0", PROTOCOL_ERROR)
    size = len(data)
    if size < 3:
        raise ProtocolError("PUBLISH too short")
    pos = 2 + (data[0] << 8 | data[1])
    if pos > size:
        raise ProtocolError("topic name runs past the packet")
    raw_topic = data[2:pos]
    packet_id = 0
    if qos:
        if pos + 3 > size:
            raise ProtocolError("PUBLISH cut short after its topic")
        packet_id = data[pos] << 8 | data[pos + 1]
        if not packet_id:
            raise ProtocolError("PUBLISH with packet identifier 0", PROTOCOL_ERROR)
        pos += 2
    elif pos == size:
        raise ProtocolError("PUBLISH without a property length")
    try:
        if data[pos] == 0:  # the common case: no properties
            props: Properties = {}
            pos += 1
        else:
            props, pos = read_properties(data, pos)
        topic = strict_text(raw_topic)
    except InvalidString as exc:
        raise InvalidPublish(f"PUBLISH dropped: {exc}", qos, packet_id) from exc
    if props:
        if not props.keys() <= _PUBLISH_PROPERTIES:
            odd = ", ".join(f"0x{i:02x}" for i in sorted(props.keys() - _PUBLISH_PROPERTIES))
            raise ProtocolError(f"PUBLISH with a property it may not carry ({odd})")
        if TOPIC_ALIAS in props:
            raise ProtocolError(
                "PUBLISH with a Topic Alias: we announced a Topic Alias Maximum of 0",
                TOPIC_ALIAS_INVALID,
            )
        if 0 in props.get(SUBSCRIPTION_ID, ()):
            raise ProtocolError("PUBLISH with Subscription Identifier 0", PROTOCOL_ERROR)
    if not topic:
        raise ProtocolError("PUBLISH with an empty topic and no Topic Alias", PROTOCOL_ERROR)
    if "+" in topic or "#" in topic:
        raise InvalidPublish(
            f"PUBLISH dropped: topic {topic[:200]!r} holds a wildcard", qos, packet_id
        )
    return Publish(topic, data[pos:], qos, bool(first & 1), packet_id, props)


def _end_of(data: bytes, pos: int, what: str) -> None:
    if pos != len(data):
        raise ProtocolError(f"{len(data) - pos} byte(s) after the end of {what}")


def decode_ack(data: bytes) -> tuple[int, int, Properties]:
    """(packet id, reason code, properties) of PUBACK/PUBREC/PUBREL/PUBCOMP (3.4.2)."""
    if len(data) < 2:
        raise ProtocolError("acknowledgement without a packet identifier")
    packet_id = data[0] << 8 | data[1]
    if not packet_id:
        raise ProtocolError("acknowledgement of packet identifier 0", PROTOCOL_ERROR)
    reason = data[2] if len(data) > 2 else 0
    props: Properties = {}
    if len(data) > 3:
        props, end = read_properties(data, 3)
        _end_of(data, end, "an acknowledgement")
    return packet_id, reason, props


def decode_suback(data: bytes) -> tuple[int, list[int], Properties]:
    """(packet id, reason codes, properties) of SUBACK or UNSUBACK (3.9, 3.11)."""
    if len(data) < 3:
        raise ProtocolError("SUBACK too short")
    props, pos = read_properties(data, 2)
    if pos == len(data):
        raise ProtocolError("SUBACK without a reason code")
    return data[0] << 8 | data[1], list(data[pos:]), props


def decode_connack(data: bytes) -> tuple[bool, int, Properties]:
    """(session present, reason code, properties) of CONNACK (3.2).

    A CONNACK of two bytes is MQTT 3.1.1's (a broker that does not speak
    MQTT 5 answers our CONNECT that way, usually with return code 1):
    :class:`LegacyConnack`.
    """
    if len(data) < 2:
        raise ProtocolError("CONNACK too short")
    if len(data) == 2:  # an MQTT 5 CONNACK always has a property length (3.2.2.3.1)
        raise LegacyConnack(data[1])
    flags, reason = data[0], data[1]
    if flags & 0xFE:
        raise ProtocolError(f"CONNACK with reserved flags set (0x{flags:02x})")  # 3.2.2.1
    if flags and reason >= 0x80:
        raise ProtocolError("CONNACK refusing with Session Present set", PROTOCOL_ERROR)  # 3.2.2-6
    props, end = read_properties(data, 2)
    _end_of(data, end, "CONNACK")
    return bool(flags), reason, props


def decode_disconnect(data: bytes) -> tuple[int, Properties]:
    """(reason code, properties) of a DISCONNECT from the server (3.14)."""
    if not data:
        return 0, {}
    props: Properties = {}
    if len(data) > 1:
        props, end = read_properties(data, 1)
        _end_of(data, end, "DISCONNECT")
    return data[0], props
