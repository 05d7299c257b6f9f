"""The building blocks of the MQTT 5 wire format: packet types, the errors a
decoder raises, the data types (1.5: Variable Byte Integer, UTF-8 string, binary
data), the fixed header (2.1) and cutting a byte stream into packets.  Part of
:mod:`daemon.mqtt.codec`, which callers use."""

from __future__ import annotations

from typing import Final

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

MAX_REMAINING_LENGTH: Final = 268_435_455  # 2.2.3: four bytes of variable byte integer


# Reason codes (2.4) the codec raises or the connection sends by name.
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


# ---------------------------------------------------------------- data types

# Variable Byte Integers below 128, one byte each, made once (hot path).
SMALL_VARINTS: Final = [bytes((n,)) for n in range(128)]


def varint(n: int) -> bytes:
    """A Variable Byte Integer (1.5.5)."""
    if n < 128:
        return SMALL_VARINTS[n]
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
    found = varint_at(data, pos)
    if found is None:
        raise ProtocolError("variable byte integer runs past the packet")
    return found


def varint_at(data: bytes, pos: int) -> tuple[int, int] | None:
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


def read_utf8(data: bytes, pos: int) -> tuple[str, int]:
    if pos + 2 > len(data):
        raise ProtocolError("string length runs past the packet")
    end = pos + 2 + (data[pos] << 8 | data[pos + 1])
    if end > len(data):
        raise ProtocolError("string runs past the packet")
    return strict_text(data[pos + 2 : end]), end


def strict_text(raw: bytes) -> str:
    """Strict UTF-8 (Python's codec refuses encoded surrogates too), no U+0000 (1.5.4)."""
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise InvalidString(f"string is not UTF-8: {exc}") from exc
    if "\0" in text:
        raise InvalidString("string contains U+0000")
    return text


def read_binary(data: bytes, pos: int) -> tuple[bytes, int]:
    if pos + 2 > len(data):
        raise ProtocolError("binary data length runs past the packet")
    end = pos + 2 + (data[pos] << 8 | data[pos + 1])
    if end > len(data):
        raise ProtocolError("binary data runs past the packet")
    return data[pos + 2 : end], end


def packet(first_byte: int, body: bytes) -> bytes:
    """A whole control packet: fixed header (2.1.1) + body."""
    return bytes((first_byte,)) + varint(len(body)) + body


# ------------------------------------------------------------------ framing


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
            header = varint_at(data, pos + 1)  # the remaining length (2.1.4)
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
    header = varint_at(data, 1)
    return 0 if header is None else header[0] + header[1]


_FLAGS_TWO: Final = frozenset({PUBREL, SUBSCRIBE, UNSUBSCRIBE})  # flags 0b0010 (2.1.3)


def check_flags(first: int) -> None:
    """ProtocolError (0x81) if the fixed header's flags are not the ones the
    packet type requires (2.1.3-1); PUBLISH's are read by
    :func:`~daemon.mqtt.decoders.decode_publish`."""
    kind = first >> 4
    if kind != PUBLISH and first & 0x0F != (0x02 if kind in _FLAGS_TWO else 0):
        raise ProtocolError(f"packet type {kind} with fixed header flags 0x{first & 0x0F:x}")
