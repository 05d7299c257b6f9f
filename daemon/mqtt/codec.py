"""MQTT 5 wire format: the packets the bus sends and the ones it reads.

Pure functions over ``bytes``, no I/O (the connection in
:mod:`daemon.mqtt.connection` owns the socket).  Encoders return whole
packets; :func:`split_packets` cuts a byte stream into packets; the
``decode_*`` functions read one packet's body.  Names and numbers follow the
OASIS MQTT 5.0 standard (section numbers in comments).

Properties are read into a ``dict`` keyed by property identifier; the two
that may repeat (Subscription Identifier, User Property) hold lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

# Control packet types (2.1.2).
CONNECT: Final = 1
CONNACK: Final = 2
PUBLISH: Final = 3
PUBACK: Final = 4
PUBREC: Final = 5
PUBREL: Final = 6
PUBCOMP: Final = 7
SUBSCRIBE: Final = 8
SUBACK: Final = 9
UNSUBSCRIBE: Final = 10
UNSUBACK: Final = 11
PINGREQ: Final = 12
PINGRESP: Final = 13
DISCONNECT: Final = 14
AUTH: Final = 15

PINGREQ_PACKET: Final = b"\xc0\x00"
DISCONNECT_PACKET: Final = b"\xe0\x00"  # reason 0: normal disconnection (the will is not sent)

# Property identifiers (2.2.2.2) used by name in this package.
PAYLOAD_FORMAT: Final = 0x01
MESSAGE_EXPIRY: Final = 0x02
CONTENT_TYPE: Final = 0x03
RESPONSE_TOPIC: Final = 0x08
CORRELATION_DATA: Final = 0x09
SUBSCRIPTION_ID: Final = 0x0B
SESSION_EXPIRY: Final = 0x11
ASSIGNED_CLIENT_ID: Final = 0x12
SERVER_KEEP_ALIVE: Final = 0x13
REASON_STRING: Final = 0x1F
RECEIVE_MAXIMUM: Final = 0x21
TOPIC_ALIAS_MAXIMUM: Final = 0x22
TOPIC_ALIAS: Final = 0x23
MAXIMUM_QOS: Final = 0x24
USER_PROPERTY: Final = 0x26
MAXIMUM_PACKET_SIZE: Final = 0x27

_BYTE, _INT16, _INT32, _VARINT, _UTF8, _BINARY, _PAIR = range(7)
# Every property of the standard with its data type: needed to skip the ones we ignore.
_TYPES: Final[dict[int, int]] = {
    0x01: _BYTE,
    0x02: _INT32,
    0x03: _UTF8,
    0x08: _UTF8,
    0x09: _BINARY,
    0x0B: _VARINT,
    0x11: _INT32,
    0x12: _UTF8,
    0x13: _INT16,
    0x15: _UTF8,
    0x16: _BINARY,
    0x17: _BYTE,
    0x18: _INT32,
    0x19: _BYTE,
    0x1A: _UTF8,
    0x1C: _UTF8,
    0x1F: _UTF8,
    0x21: _INT16,
    0x22: _INT16,
    0x23: _INT16,
    0x24: _BYTE,
    0x25: _BYTE,
    0x26: _PAIR,
    0x27: _INT32,
    0x28: _BYTE,
    0x29: _BYTE,
    0x2A: _BYTE,
}
_REPEATABLE: Final = frozenset({SUBSCRIPTION_ID, USER_PROPERTY})
MAX_REMAINING_LENGTH: Final = 268_435_455  # 2.2.3: four bytes of variable byte integer

Properties = dict[int, Any]


# Reason codes (2.4) this module raises or the connection sends by name.
MALFORMED_PACKET: Final = 0x81
PROTOCOL_ERROR: Final = 0x82
UNSUPPORTED_PROTOCOL_VERSION: Final = 0x84
TOPIC_NAME_INVALID: Final = 0x90
TOPIC_ALIAS_INVALID: Final = 0x94


class ProtocolError(ValueError):
    """Bytes that are not valid MQTT 5: the connection must be closed.

    ``reason`` is the reason code (2.4) of the DISCONNECT the client sends
    before it closes (4.13.1): 0x81 Malformed Packet for bytes that cannot be
    read as the standard says, 0x82 Protocol Error for readable packets that
    break a rule, or a more specific code (0x94 Topic Alias invalid).
    """

    def __init__(self, message: str, reason: int = MALFORMED_PACKET) -> None:
        super().__init__(message)
        self.reason = reason


class InvalidString(ProtocolError):
    """A UTF-8 Encoded String (1.5.4) that is not UTF-8 or holds U+0000."""


class InvalidPublish(ProtocolError):
    """A PUBLISH whose framing is sound but whose topic or a string property is
    not valid (1.5.4, 4.7.3): that one message is dropped and acknowledged with
    ``reason`` (0x90 Topic Name invalid), the connection goes on."""

    def __init__(
        self, message: str, qos: int, packet_id: int, reason: int = TOPIC_NAME_INVALID
    ) -> None:
        super().__init__(message, reason)
        self.qos = qos
        self.packet_id = packet_id


class LegacyConnack(ProtocolError):
    """A CONNACK in MQTT 3.1.1's form (3.1.1 section 3.2: two bytes, no
    properties): the broker does not speak MQTT 5.  ``return_code`` is the
    3.1.1 Connect Return code.  No DISCONNECT is due: the broker closes."""

    def __init__(self, return_code: int) -> None:
        name = LEGACY_RETURN_CODES.get(return_code, f"unknown return code {return_code}")
        if return_code == 0:
            why = f"it answered our MQTT 5 CONNECT with a 3.1.1 CONNACK: {name}"
        else:
            why = f"it refused our MQTT 5 CONNECT: {name}"
        super().__init__(
            f"the broker speaks MQTT 3.1.1, not MQTT 5 ({why})", UNSUPPORTED_PROTOCOL_VERSION
        )
        self.return_code = return_code


# MQTT 3.1.1 Connect Return codes (3.1.1 section 3.2.2.3, table 3.1).
LEGACY_RETURN_CODES: Final[dict[int, str]] = {
    0: "connection accepted",
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}


# --------------------------------------------------------------- primitives

_VARINT_1: Final = [bytes((n,)) for n in range(128)]


def varint(n: int) -> bytes:
    """A Variable Byte Integer (1.5.5)."""
    if n < 128:
        return _VARINT_1[n]
    if n > MAX_REMAINING_LENGTH:
        raise ValueError(f"{n} does not fit a variable byte integer")
    out = bytearray()
    while True:
        digit = n & 0x7F
        n >>= 7
        if n:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it); ProtocolError if malformed or cut short."""
    found = _varint_at(data, pos)
    if found is None:
        raise ProtocolError("variable byte integer runs past the packet")
    return found


def _varint_at(data: bytes, pos: int) -> tuple[int, int] | None:
    """(value, position after it); None if ``data`` ends first (more may be
    arriving); ProtocolError if longer than four bytes."""
    value = 0
    shift = 0
    end = len(data)
    while pos < end:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 21:
            raise ProtocolError("variable byte integer longer than four bytes")
    return None


def utf8(text: str) -> bytes:
    """A UTF-8 Encoded String (1.5.4): two-byte length, then the bytes."""
    raw = text.encode()
    if len(raw) > 0xFFFF:
        raise ValueError("string longer than 65,535 bytes")
    return len(raw).to_bytes(2, "big") + raw


def binary(data: bytes) -> bytes:
    """Binary Data (1.5.6): two-byte length, then the bytes."""
    if len(data) > 0xFFFF:
        raise ValueError("binary data longer than 65,535 bytes")
    return len(data).to_bytes(2, "big") + data


def _read_utf8(data: bytes, pos: int) -> tuple[str, int]:
    if pos + 2 > len(data):
        raise ProtocolError("string length runs past the packet")
    end = pos + 2 + (data[pos] << 8 | data[pos + 1])
    if end > len(data):
        raise ProtocolError("string runs past the packet")
    return _text(data[pos + 2 : end]), end


def _text(raw: bytes) -> str:
    """Strict UTF-8 (Python's codec refuses encoded surrogates too), no U+0000 (1.5.4)."""
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise InvalidString(f"string is not UTF-8: {exc}") from exc
    if "\0" in text:
        raise InvalidString("string contains U+0000")
    return text


def _read_binary(data: bytes, pos: int) -> tuple[bytes, int]:
    if pos + 2 > len(data):
        raise ProtocolError("binary data length runs past the packet")
    end = pos + 2 + (data[pos] << 8 | data[pos + 1])
    if end > len(data):
        raise ProtocolError("binary data runs past the packet")
    return data[pos + 2 : end], end


def packet(first_byte: int, body: bytes) -> bytes:
    """A whole control packet: fixed header (2.1.1) + body."""
    return bytes((first_byte,)) + varint(len(body)) + body


# --------------------------------------------------------------- properties


def encode_properties(props: Properties) -> bytes:
    """The property block (2.2.2): length, then each property."""
    if not props:
        return b"\x00"
    parts: list[bytes] = []
    for ident, value in props.items():
        kind = _TYPES[ident]
        values = value if ident in _REPEATABLE and isinstance(value, list) else [value]
        for item in values:
            parts.append(_VARINT_1[ident])
            if kind == _BYTE:
                parts.append(bytes((item,)))
            elif kind == _INT16:
                parts.append(item.to_bytes(2, "big"))
            elif kind == _INT32:
                parts.append(item.to_bytes(4, "big"))
            elif kind == _VARINT:
                parts.append(varint(item))
            elif kind == _UTF8:
                parts.append(utf8(item))
            elif kind == _BINARY:
                parts.append(binary(item))
            else:
                parts.append(utf8(item[0]) + utf8(item[1]))
    body = b"".join(parts)
    return varint(len(body)) + body


def read_properties(data: bytes, pos: int) -> tuple[Properties, int]:
    """(properties, position after the block); ProtocolError (0x81) if the
    block is cut short, runs past its length, repeats a property that may not
    repeat or holds an identifier the standard does not define (2.2.2.2)."""
    length, pos = read_varint(data, pos)
    end = pos + length
    if end > len(data):
        raise ProtocolError("properties run past the packet")
    if end < len(data):
        data = data[:end]  # no property may read into what follows (a short copy: the header)
    props: Properties = {}
    try:
        while pos < end:
            ident = data[pos]
            pos += 1
            kind = _TYPES.get(ident)
            if kind is None:
                raise ProtocolError(f"unknown property identifier 0x{ident:02x}")
            value: Any
            if kind == _BYTE:
                value = data[pos]
                pos += 1
            elif kind == _INT16:
                value = data[pos] << 8 | data[pos + 1]
                pos += 2
            elif kind == _INT32:
                if pos + 4 > end:
                    raise ProtocolError("property runs past the properties")
                value = int.from_bytes(data[pos : pos + 4], "big")
                pos += 4
            elif kind == _VARINT:
                value, pos = read_varint(data, pos)
            elif kind == _UTF8:
                value, pos = _read_utf8(data, pos)
            elif kind == _BINARY:
                value, pos = _read_binary(data, pos)
            else:
                key, pos = _read_utf8(data, pos)
                text, pos = _read_utf8(data, pos)
                value = (key, text)
            if ident in _REPEATABLE:
                props.setdefault(ident, []).append(value)
            elif ident in props:
                raise ProtocolError(f"property 0x{ident:02x} given twice")
            else:
                props[ident] = value
    except IndexError as exc:  # a one- or two-byte value cut off by the block's end
        raise ProtocolError("property runs past the properties") from exc
    return props, end


def publish_properties(
    *,
    content_type: str | None = None,
    response_topic: str | None = None,
    correlation_data: bytes | None = None,
    expiry: float | None = None,
    user_properties: dict[str, str] | None = None,
) -> bytes:
    """The property block of a PUBLISH (built once per message, reused on resend)."""
    if not (content_type or response_topic or correlation_data or expiry or user_properties):
        return b"\x00"
    props: Properties = {}
    if expiry:
        props[MESSAGE_EXPIRY] = max(1, int(expiry + 0.999))
    if content_type:
        props[CONTENT_TYPE] = content_type
    if response_topic:
        props[RESPONSE_TOPIC] = response_topic
    if correlation_data:
        props[CORRELATION_DATA] = correlation_data
    if user_properties:
        props[USER_PROPERTY] = list(user_properties.items())
    return encode_properties(props)


# ------------------------------------------------------------------ packets


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
        topic = _text(raw_topic)
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


def split_packets(data: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """Cut ``data`` into whole packets: ([(first byte, body)], bytes consumed).

    A packet still arriving is left for the next call.
    """
    out: list[tuple[int, bytes]] = []
    pos = 0
    end = len(data)
    while end - pos >= 2:
        length = data[pos + 1]
        start = pos + 2
        if length & 0x80:  # the common one-byte length is read inline (hot path)
            header = _varint_at(data, pos + 1)  # the remaining length (2.1.4)
            if header is None:
                break
            length, start = header
        stop = start + length
        if stop > end:
            break
        out.append((data[pos], data[start:stop]))
        pos = stop
    return out, pos


def packet_size(data: bytes) -> int:
    """Total size of the packet ``data`` starts with; 0 while its header is incomplete."""
    header = _varint_at(data, 1)
    return 0 if header is None else header[0] + header[1]


_FLAGS_TWO: Final = frozenset({PUBREL, SUBSCRIBE, UNSUBSCRIBE})  # flags 0b0010 (2.1.3)


def check_flags(first: int) -> None:
    """ProtocolError (0x81) if the fixed header's flags are not the ones the
    packet type requires (2.1.3-1); PUBLISH's are read by :func:`decode_publish`."""
    kind = first >> 4
    if kind != PUBLISH and first & 0x0F != (0x02 if kind in _FLAGS_TWO else 0):
        raise ProtocolError(f"packet type {kind} with fixed header flags 0x{first & 0x0F:x}")


# Every reason code of MQTT 5.0 (2.4, table 2-6), named as the standard does.
# 0x00-0x02 have other names in some packets: see _PACKET_NAMES.
REASONS: Final[dict[int, str]] = {
    0x00: "success",
    0x01: "granted QoS 1",
    0x02: "granted QoS 2",
    0x04: "disconnect with will message",
    0x10: "no matching subscribers",
    0x11: "no subscription existed",
    0x18: "continue authentication",
    0x19: "re-authenticate",
    0x80: "unspecified error",
    0x81: "malformed packet",
    0x82: "protocol error",
    0x83: "implementation specific error",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
    0x8B: "server shutting down",
    0x8C: "bad authentication method",
    0x8D: "keep alive timeout",
    0x8E: "session taken over",
    0x8F: "topic filter invalid",
    0x90: "topic name invalid",
    0x91: "packet identifier in use",
    0x92: "packet identifier not found",
    0x93: "receive maximum exceeded",
    0x94: "topic alias invalid",
    0x95: "packet too large",
    0x96: "message rate too high",
    0x97: "quota exceeded",
    0x98: "administrative action",
    0x99: "payload format invalid",
    0x9A: "retain not supported",
    0x9B: "QoS not supported",
    0x9C: "use another server",
    0x9D: "server moved",
    0x9E: "shared subscriptions not supported",
    0x9F: "connection rate exceeded",
    0xA0: "maximum connect time",
    0xA1: "subscription identifiers not supported",
    0xA2: "wildcard subscriptions not supported",
}
_PACKET_NAMES: Final[dict[int, dict[int, str]]] = {
    DISCONNECT: {0x00: "normal disconnection"},
    SUBACK: {0x00: "granted QoS 0"},
}


def reason_text(code: int, packet_type: int | None = None) -> str:
    """``0x87 not authorized``; with ``packet_type`` (e.g. :data:`DISCONNECT`)
    the name that packet gives a code of several names (0x00)."""
    name = _PACKET_NAMES.get(packet_type or 0, {}).get(code) or REASONS.get(code, "unknown reason")
    return f"0x{code:02x} {name}"
