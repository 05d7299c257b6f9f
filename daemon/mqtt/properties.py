"""MQTT 5 properties (2.2.2): the identifiers, and the property block encoded and
read.  Properties are read into a ``dict`` keyed by property identifier; the two
that may repeat (Subscription Identifier, User Property) hold lists.  Part of
:mod:`daemon.mqtt.codec`, which callers use."""

from __future__ import annotations

from typing import Any, Final

from daemon.mqtt.primitives import (
    SMALL_VARINTS,
    ProtocolError,
    binary,
    read_binary,
    read_utf8,
    read_varint,
    utf8,
    varint,
)

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


Properties = dict[int, Any]


def encode_properties(props: Properties) -> bytes:
    """The property block (2.2.2): length, then each property."""
    if not props:
        return b"\x00"
    parts: list[bytes] = []
    for ident, value in props.items():
        kind = _TYPES[ident]
        values = value if ident in _REPEATABLE and isinstance(value, list) else [value]
        for item in values:
            parts.append(SMALL_VARINTS[ident])
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
                value, pos = read_utf8(data, pos)
            elif kind == _BINARY:
                value, pos = read_binary(data, pos)
            else:
                key, pos = read_utf8(data, pos)
                text, pos = read_utf8(data, pos)
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
