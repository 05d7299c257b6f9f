"""The names of MQTT 5 reason codes (2.4), for log lines and errors.  Part of
:mod:`daemon.mqtt.codec`, which callers use."""

from __future__ import annotations

from typing import Final

from daemon.mqtt.primitives import DISCONNECT, SUBACK

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
