"""Encoders of the packets a client sends (3.1-3.14): each returns the whole
packet.  Part of :mod:`daemon.mqtt.codec`, which callers use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from daemon.mqtt.primitives import DISCONNECT_PACKET, PUBREL, binary, packet, utf8, varint
from daemon.mqtt.properties import (
    REASON_STRING,
    SUBSCRIPTION_ID,
    Properties,
    encode_properties,
)


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def encode_connect(
    client_id: str,
    *,
    keepalive: int,
    clean_start: bool = True,
    username: str | None = None,
    password: str | None = None,
    will: Will | None = None,
    properties: Properties | None = None,
) -> bytes:
    """CONNECT (3.1)."""
    flags = 0x02 if clean_start else 0
    payload = [utf8(client_id)]
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        payload += [b"\x00", utf8(will.topic), binary(will.payload)]
    if username is not None:
        flags |= 0x80
        payload.append(utf8(username))
    if password is not None:
        flags |= 0x40
        payload.append(binary(password.encode()))
    header = b"\x00\x04MQTT\x05" + bytes((flags,)) + keepalive.to_bytes(2, "big")
    return packet(0x10, header + encode_properties(properties or {}) + b"".join(payload))


def encode_publish(
    topic: bytes,
    payload: bytes,
    *,
    qos: int,
    retain: bool,
    packet_id: int,
    props: bytes,
    dup: bool = False,
) -> bytes:
    """PUBLISH (3.3); ``topic`` already UTF-8 encoded, ``props`` a property block."""
    head = len(topic).to_bytes(2, "big") + topic
    if qos:
        head += packet_id.to_bytes(2, "big")
    first = 0x30 | qos << 1 | retain | (0x08 if dup else 0)
    return bytes((first,)) + varint(len(head) + len(props) + len(payload)) + head + props + payload


def encode_ack(kind: int, packet_id: int, reason: int = 0) -> bytes:
    """PUBACK / PUBREC / PUBREL / PUBCOMP (3.4-3.7); reason 0 (success) is left out."""
    first = kind << 4 | (0x02 if kind == PUBREL else 0)
    if reason:
        return bytes((first, 3)) + packet_id.to_bytes(2, "big") + bytes((reason,))
    return bytes((first, 2)) + packet_id.to_bytes(2, "big")


def encode_subscribe(packet_id: int, topic_filter: str, options: int, sub_id: int) -> bytes:
    """SUBSCRIBE (3.8) of one filter with a Subscription Identifier."""
    props = encode_properties({SUBSCRIPTION_ID: sub_id} if sub_id else {})
    body = packet_id.to_bytes(2, "big") + props + utf8(topic_filter) + bytes((options,))
    return packet(0x82, body)


def subscribe_options(
    qos: int, *, no_local: bool = False, retain_as_published: bool = False, retain_handling: int = 0
) -> int:
    """The options byte of a SUBSCRIBE entry (3.8.3.1)."""
    return (
        qos
        | (0x04 if no_local else 0)
        | (0x08 if retain_as_published else 0)
        | retain_handling << 4
    )


def encode_unsubscribe(packet_id: int, topic_filter: str) -> bytes:
    """UNSUBSCRIBE (3.10) of one filter."""
    return packet(0xA2, packet_id.to_bytes(2, "big") + b"\x00" + utf8(topic_filter))


MAX_REASON_STRING: Final = 256  # characters of a Reason String we send


def encode_disconnect(reason: int, reason_string: str | None = None) -> bytes:
    """DISCONNECT (3.14) with a reason code and, if given, a Reason String.

    The shortest form the standard allows: no body for reason 0 without a
    string, no property length without properties (3.14.2.1).  The string is
    a diagnostic: cut to :data:`MAX_REASON_STRING` characters so that the
    packet stays small (the broker's Maximum Packet Size is the caller's to check).
    """
    if reason_string is None:
        return DISCONNECT_PACKET if reason == 0 else bytes((0xE0, 1, reason))
    props = encode_properties({REASON_STRING: reason_string[:MAX_REASON_STRING]})
    return packet(0xE0, bytes((reason,)) + props)
