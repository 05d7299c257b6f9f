"""A scripted stand-in MQTT 5 broker for conformance tests of daemon/mqtt.

An asyncio server on ``127.0.0.1:0``.  It reads whole packets from the client,
decodes each one *strictly* (the client -> server packets the codec does not
read, CONNECT, SUBSCRIBE and UNSUBSCRIBE, are decoded here) and records it with
its type, flags and fields.  Whatever breaks a client-side rule of MQTT 5.0 is
written to :attr:`StubConnection.violations`, and the stub fails the test on
leaving its ``async with`` block if there is any (``strict=True``).  It tracks the
packet identifiers the client has in flight, so it also catches an identifier
used twice, zero, or more QoS>0 publishes unacknowledged than the Receive
Maximum it announced.

By default it answers like a small broker: CONNACK success, PUBACK / PUBREC /
PUBCOMP, SUBACK granting the QoS asked, UNSUBACK, PINGRESP.  A test changes that
per connection (``setup`` is called with each new connection before it reads a
byte) or answers by hand::

    async with StubBroker(setup=lambda c: c.hold(PUBLISH)) as stub:
        conn = await connect(ConnectParams("127.0.0.1", stub.port, "me"))
        server = await stub.next_connection()
        conn.publish("a/b", b"x", qos=1)
        pkt = await server.expect(PUBLISH)
        await server.puback(pkt, reason=0x87)

What the server writes can be cut into single bytes or random pieces
(``chunking``) to exercise the client's partial reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from daemon.mqtt import codec
from daemon.mqtt.codec import (
    AUTH,
    CONNACK,
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PINGRESP,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
)

# Property identifiers (2.2.2.2) the codec has no name for.
WILL_DELAY: Final = 0x18
AUTH_METHOD: Final = 0x15
AUTH_DATA: Final = 0x16
REQUEST_PROBLEM_INFO: Final = 0x17
REQUEST_RESPONSE_INFO: Final = 0x19
SERVER_REFERENCE: Final = 0x1C
RETAIN_AVAILABLE: Final = 0x25
WILDCARD_AVAILABLE: Final = 0x28
SUB_ID_AVAILABLE: Final = 0x29
SHARED_AVAILABLE: Final = 0x2A

NAMES: Final = {
    CONNECT: "CONNECT",
    CONNACK: "CONNACK",
    PUBLISH: "PUBLISH",
    PUBACK: "PUBACK",
    PUBREC: "PUBREC",
    PUBREL: "PUBREL",
    PUBCOMP: "PUBCOMP",
    SUBSCRIBE: "SUBSCRIBE",
    SUBACK: "SUBACK",
    UNSUBSCRIBE: "UNSUBSCRIBE",
    UNSUBACK: "UNSUBACK",
    PINGREQ: "PINGREQ",
    PINGRESP: "PINGRESP",
    DISCONNECT: "DISCONNECT",
    AUTH: "AUTH",
}

# Properties a client may put in each packet (3.x.2.2), and in a will (3.1.3.2).
_CONNECT_PROPS: Final = frozenset(
    {
        codec.SESSION_EXPIRY,
        codec.RECEIVE_MAXIMUM,
        codec.MAXIMUM_PACKET_SIZE,
        codec.TOPIC_ALIAS_MAXIMUM,
        REQUEST_RESPONSE_INFO,
        REQUEST_PROBLEM_INFO,
        codec.USER_PROPERTY,
        AUTH_METHOD,
        AUTH_DATA,
    }
)
_WILL_PROPS: Final = frozenset(
    {
        WILL_DELAY,
        codec.PAYLOAD_FORMAT,
        codec.MESSAGE_EXPIRY,
        codec.CONTENT_TYPE,
        codec.RESPONSE_TOPIC,
        codec.CORRELATION_DATA,
        codec.USER_PROPERTY,
    }
)
_PUBLISH_PROPS: Final = frozenset(
    {
        codec.PAYLOAD_FORMAT,
        codec.MESSAGE_EXPIRY,
        codec.CONTENT_TYPE,
        codec.RESPONSE_TOPIC,
        codec.CORRELATION_DATA,
        codec.TOPIC_ALIAS,
        codec.USER_PROPERTY,
    }
)
_ACK_PROPS: Final = frozenset({codec.REASON_STRING, codec.USER_PROPERTY})
_SUBSCRIBE_PROPS: Final = frozenset({codec.SUBSCRIPTION_ID, codec.USER_PROPERTY})
_DISCONNECT_PROPS: Final = frozenset(
    {codec.SESSION_EXPIRY, codec.REASON_STRING, codec.USER_PROPERTY, SERVER_REFERENCE}
)
# Reason codes a client may send (2.4): PUBACK/PUBREC (3.4.2.1), PUBREL/PUBCOMP (3.6.2.1),
# DISCONNECT from a client (3.14.2.1).
_PUBACK_REASONS: Final = frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99})
_PUBREL_REASONS: Final = frozenset({0x00, 0x92})
_CLIENT_DISCONNECT_REASONS: Final = frozenset(
    {0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x90, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99}
)
# What a client's reserved fixed-header flags must be (2.1.3): PUBREL, SUBSCRIBE and
# UNSUBSCRIBE 0b0010, the rest but PUBLISH 0.
_FLAGS: Final = {PUBREL: 2, SUBSCRIBE: 2, UNSUBSCRIBE: 2}

Chunking = Literal["whole", "bytes", "random"]


class Malformed(Exception):
    """A packet from the client that is not valid MQTT 5."""


@dataclass
class Packet:
    """One packet the client sent, decoded."""

    kind: int
    flags: int
    fields: dict[str, Any]
    raw: bytes
    at: float  # loop time it was read
    before_connack: bool  # read before the stub sent CONNACK

    @property
    def name(self) -> str:
        return NAMES.get(self.kind, f"type {self.kind}")

    @property
    def packet_id(self) -> int:
        value: int = self.fields.get("packet_id", 0)
        return value

    @property
    def props(self) -> dict[int, Any]:
        value: dict[int, Any] = self.fields.get("props", {})
        return value

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.fields.items() if k != "payload"}
        if "payload" in self.fields:
            shown["payload"] = self.fields["payload"][:40]
        return f"<{self.name} flags={self.flags:#x} {shown}>"


@dataclass
class Connack:
    """How the stub answers a CONNECT."""

    reason: int = 0
    session_present: bool = False
    props: dict[int, Any] = field(default_factory=dict)
    raw: bytes | None = None  # send exactly these bytes instead
    close_after_refusal: bool = True  # as the server must (MQTT-3.2.2-7)


# ---------------------------------------------------------------- decoding


class _Reader:
    """Strict reading of one packet body (1.5: data representation)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if self.left < n:
            raise Malformed(f"packet ends {n - self.left} byte(s) early")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def utf8(self, what: str) -> str:
        raw = self.take(self.u16())
        try:
            text = raw.decode()  # strict: refuses encoded surrogates too (MQTT-1.5.4-1)
        except UnicodeDecodeError as exc:
            raise Malformed(f"{what} is not UTF-8 (MQTT-1.5.4-1)") from exc
        if "\0" in text:
            raise Malformed(f"{what} contains U+0000 (MQTT-1.5.4-2)")
        return text

    def binary(self) -> bytes:
        return self.take(self.u16())

    def properties(self, allowed: frozenset[int], where: str) -> dict[int, Any]:
        start = self.pos
        value = 0
        for shift in (0, 7, 14, 21):
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
        else:
            raise Malformed("property length longer than four bytes")
        if self.pos - start > 1 and len(codec.varint(value)) < self.pos - start:
            raise Malformed("property length not in the fewest bytes (MQTT-1.5.5-1)")
        try:
            props, end = codec.read_properties(self.data, start)
        except (codec.ProtocolError, IndexError) as exc:
            raise Malformed(f"{where} properties: {exc}") from exc
        self.pos = end
        bad = set(props) - allowed
        if bad:
            raise Malformed(f"{where} may not carry propert(y/ies) {sorted(bad)}")
        return props


def topic_filter_problem(topic_filter: str) -> str | None:
    """Why ``topic_filter`` is not a valid MQTT topic filter (4.7, 4.8.2), or None."""
    if not topic_filter:
        return "empty topic filter (MQTT-4.7.3-1)"
    plain = topic_filter
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        if len(parts) < 3 or not parts[1] or not parts[2]:
            return "shared subscription without a share name or filter (MQTT-4.8.2-1)"
        if "+" in parts[1] or "#" in parts[1]:
            return "share name with a wildcard (MQTT-4.8.2-2)"
        plain = parts[2]
    levels = plain.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "'#' not alone in the last level (MQTT-4.7.1-1)"
        if "+" in level and level != "+":
            return "'+' not alone in its level (MQTT-4.7.1-2)"
    return None


def decode_client_packet(first: int, body: bytes) -> dict[str, Any]:
    """The fields of a client -> server packet; :class:`Malformed` for anything the
    standard forbids a client to send."""
    kind, flags = first >> 4, first & 0x0F
    if kind != PUBLISH and flags != _FLAGS.get(kind, 0):
        raise Malformed(
            f"{NAMES.get(kind, kind)} with fixed-header flags {flags:#06b} (MQTT-2.1.3-1)"
        )
    r = _Reader(body)
    fields: dict[str, Any]
    if kind == CONNECT:
        fields = _decode_connect(r)
    elif kind == PUBLISH:
        fields = _decode_publish(flags, r)
    elif kind in (PUBACK, PUBREC, PUBREL, PUBCOMP):
        fields = {"packet_id": r.u16(), "reason": 0, "props": {}}
        if fields["packet_id"] == 0:
            raise Malformed(f"{NAMES[kind]} with packet identifier 0 (MQTT-2.2.1-5)")
        if r.left:
            fields["reason"] = r.u8()
            allowed = _PUBACK_REASONS if kind in (PUBACK, PUBREC) else _PUBREL_REASONS
            if fields["reason"] not in allowed:
                raise Malformed(
                    f"{NAMES[kind]} reason {fields['reason']:#04x} is not one of its codes "
                    "(MQTT-3.4.2-1)"
                )
        if r.left:
            fields["props"] = r.properties(_ACK_PROPS, NAMES[kind])
    elif kind == SUBSCRIBE:
        fields = _decode_subscribe(r)
    elif kind == UNSUBSCRIBE:
        fields = {"packet_id": r.u16()}
        if fields["packet_id"] == 0:
            raise Malformed("UNSUBSCRIBE with packet identifier 0 (MQTT-2.2.1-3)")
        fields["props"] = r.properties(frozenset({codec.USER_PROPERTY}), "UNSUBSCRIBE")
        filters = []
        while r.left:
            filters.append(r.utf8("topic filter"))
        if not filters:
            raise Malformed("UNSUBSCRIBE without a topic filter (MQTT-3.10.3-2)")
        fields["filters"] = filters
    elif kind == PINGREQ:
        fields = {}
    elif kind == DISCONNECT:
        fields = {"reason": 0, "props": {}}
        if r.left:
            fields["reason"] = r.u8()
            if fields["reason"] not in _CLIENT_DISCONNECT_REASONS:
                raise Malformed(
                    f"DISCONNECT reason {fields['reason']:#04x} is not a client's (MQTT-3.14.2-1)"
                )
        if r.left:
            fields["props"] = r.properties(_DISCONNECT_PROPS, "DISCONNECT")
            if SERVER_REFERENCE in fields["props"]:
                raise Malformed("a client's DISCONNECT with a Server Reference")
    else:
        raise Malformed(f"a client may not send {NAMES.get(kind, f'packet type {kind}')}")
    if r.left:
        raise Malformed(f"{r.left} byte(s) after the end of {NAMES.get(kind, kind)}")
    return fields


def _decode_connect(r: _Reader) -> dict[str, Any]:
    name = r.utf8("protocol name")
    if name != "MQTT":
        raise Malformed(f"protocol name {name!r}, not 'MQTT' (MQTT-3.1.2-1)")
    level = r.u8()
    if level != 5:
        raise Malformed(f"protocol version {level}, not 5 (MQTT-3.1.2-2)")
    flags = r.u8()
    if flags & 0x01:
        raise Malformed("CONNECT reserved flag set (MQTT-3.1.2-3)")
    will, will_qos, will_retain = bool(flags & 0x04), flags >> 3 & 3, bool(flags & 0x20)
    if not will and (will_qos or will_retain):
        raise Malformed("Will QoS / Will Retain set without the Will Flag (MQTT-3.1.2-11/13)")
    if will_qos == 3:
        raise Malformed("Will QoS 3 (MQTT-3.1.2-12)")
    fields: dict[str, Any] = {
        "protocol": name,
        "level": level,
        "flags": flags,
        "clean_start": bool(flags & 0x02),
        "keepalive": r.u16(),
        "props": r.properties(_CONNECT_PROPS, "CONNECT"),
    }
    props = fields["props"]
    limits = (
        (codec.RECEIVE_MAXIMUM, "Receive Maximum"),
        (codec.MAXIMUM_PACKET_SIZE, "Maximum Packet Size"),
    )
    for ident, what in limits:
        if props.get(ident, 1) == 0:
            raise Malformed(f"{what} 0 (3.1.2.11)")
    fields["client_id"] = r.utf8("client identifier")  # MQTT-3.1.3-3/4
    fields["will"] = None
    if will:
        will_props = r.properties(_WILL_PROPS, "will")
        topic = r.utf8("will topic")  # MQTT-3.1.3-11
        if not topic or "+" in topic or "#" in topic:
            raise Malformed(f"will topic {topic!r} is not a topic name (MQTT-3.1.3-11)")
        fields["will"] = {
            "props": will_props,
            "topic": topic,
            "payload": r.binary(),
            "qos": will_qos,
            "retain": will_retain,
        }
    fields["username"] = r.utf8("user name") if flags & 0x80 else None  # MQTT-3.1.2-16/17
    fields["password"] = r.binary() if flags & 0x40 else None  # MQTT-3.1.2-18/19
    return fields


def _decode_publish(flags: int, r: _Reader) -> dict[str, Any]:
    qos, dup, retain = flags >> 1 & 3, bool(flags & 0x08), bool(flags & 0x01)
    if qos == 3:
        raise Malformed("PUBLISH with QoS 3 (MQTT-3.3.1-4)")
    if dup and not qos:
        raise Malformed("PUBLISH with DUP at QoS 0 (MQTT-3.3.1-2)")
    topic = r.utf8("topic name")  # MQTT-3.3.2-1
    if "+" in topic or "#" in topic:
        raise Malformed(f"topic name {topic!r} with a wildcard (MQTT-3.3.2-2)")
    packet_id = r.u16() if qos else 0
    if qos and not packet_id:
        raise Malformed("QoS>0 PUBLISH with packet identifier 0 (MQTT-2.2.1-3)")
    props = r.properties(_PUBLISH_PROPS | {codec.SUBSCRIPTION_ID}, "PUBLISH")
    if codec.SUBSCRIPTION_ID in props:
        raise Malformed("a client's PUBLISH with a Subscription Identifier (MQTT-3.3.4-6)")
    if props.get(codec.TOPIC_ALIAS) == 0:
        raise Malformed("Topic Alias 0 (MQTT-3.3.2-8)")
    if not topic and codec.TOPIC_ALIAS not in props:
        raise Malformed("empty topic name without a Topic Alias (MQTT-4.7.3-1)")
    response = props.get(codec.RESPONSE_TOPIC)
    if response is not None and (not response or "+" in response or "#" in response):
        raise Malformed(f"response topic {response!r} is not a topic name (MQTT-3.3.2-14)")
    payload = r.take(r.left)
    return {
        "topic": topic,
        "qos": qos,
        "dup": dup,
        "retain": retain,
        "packet_id": packet_id,
        "props": props,
        "payload": payload,
    }


def _decode_subscribe(r: _Reader) -> dict[str, Any]:
    packet_id = r.u16()
    if not packet_id:
        raise Malformed("SUBSCRIBE with packet identifier 0 (MQTT-2.2.1-3)")
    props = r.properties(_SUBSCRIBE_PROPS, "SUBSCRIBE")
    sub_ids = props.get(codec.SUBSCRIPTION_ID, [])
    if len(sub_ids) > 1 or any(not 1 <= i <= codec.MAX_REMAINING_LENGTH for i in sub_ids):
        raise Malformed(f"Subscription Identifier(s) {sub_ids} (3.8.2.1.2)")
    entries = []
    while r.left:
        topic_filter = r.utf8("topic filter")  # MQTT-3.8.3-1
        problem = topic_filter_problem(topic_filter)
        if problem is not None:
            raise Malformed(f"topic filter {topic_filter!r}: {problem}")
        options = r.u8()
        if options & 0xC0:
            raise Malformed("SUBSCRIBE options reserved bits set (MQTT-3.8.3-5)")
        qos, retain_handling = options & 3, options >> 4 & 3
        if qos == 3 or retain_handling == 3:
            raise Malformed(f"SUBSCRIBE options {options:#04x}: QoS 3 or Retain Handling 3")
        no_local = bool(options & 0x04)
        if no_local and topic_filter.startswith("$share/"):
            raise Malformed("No Local on a shared subscription (MQTT-3.8.3-4)")
        entries.append(
            {
                "filter": topic_filter,
                "qos": qos,
                "no_local": no_local,
                "retain_as_published": bool(options & 0x08),
                "retain_handling": retain_handling,
            }
        )
    if not entries:
        raise Malformed("SUBSCRIBE without a topic filter (MQTT-3.8.3-2)")
    return {
        "packet_id": packet_id,
        "props": props,
        "sub_id": sub_ids[0] if sub_ids else None,
        "entries": entries,
        "filters": [e["filter"] for e in entries],
    }


# ---------------------------------------------------------------- the server

Setup = Callable[["StubConnection"], None]


class StubConnection:
    """The server side of one client connection."""

    def __init__(
        self,
        broker: StubBroker,
        number: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.broker = broker
        self.number = number  # 0 for the first connection the stub accepted
        self._reader = reader
        self._writer = writer
        self._loop = asyncio.get_running_loop()
        self.packets: list[Packet] = []
        self.violations: list[str] = []
        self._consumed: set[int] = set()  # indexes handed out by expect()
        self._changed = asyncio.Condition()
        self._send_lock = asyncio.Lock()
        self._rng = random.Random(broker.seed * 1_000 + number)
        self.closed_by_client = self._loop.create_future()  # EOF or reset from the client
        self.connect: Packet | None = None
        self.connack_sent: Connack | None = None
        self.client_disconnect: Packet | None = None
        # The answers the stub gives by itself (a test changes them in ``setup``).
        self.connack: Connack | None = Connack()
        self.auto: set[int] = {PUBLISH, PUBREL, SUBSCRIBE, UNSUBSCRIBE, PINGREQ}
        self.pub_reason: Callable[[Packet], int] = lambda _p: 0
        self.suback_codes: Callable[[Packet], list[int]] = lambda p: [
            e["qos"] for e in p["entries"]
        ]
        self.after_connack: bytes | Literal["drop", "close"] | None = None
        # Packet identifiers the client has in flight: id -> "pub1" | "pub2" | "rec" |
        # "rel" | "sub" | "unsub"; "old-" prefixed when inherited from a session.
        self.inflight: dict[int, str] = {}
        self.max_inflight_seen = 0
        # Answers the client owes the server: (PUBACK | PUBREC | PUBCOMP, packet id) -> count.
        self.owed: Counter[tuple[int, int]] = Counter()
        self._out_buf = b""
        self.task: asyncio.Task[None] | None = None

    # --------------------------------------------------------------- reading

    async def _serve(self) -> None:
        buf = b""
        try:
            while True:
                try:
                    data = await self._reader.read(65536)
                except (ConnectionError, OSError):
                    data = b""
                if not data:
                    break
                buf += data
                try:
                    packets, used = codec.split_packets(buf)
                except codec.ProtocolError as exc:
                    self._violation(f"unreadable bytes from the client: {exc}")
                    break
                buf = buf[used:]
                for first, body in packets:
                    await self._received(first, body, bytes((first,)) + codec.varint(len(body)))
        finally:
            self._remember_session()
            if not self.closed_by_client.done():
                self.closed_by_client.set_result(None)
            async with self._changed:
                self._changed.notify_all()

    async def _received(self, first: int, body: bytes, header: bytes) -> None:
        kind = first >> 4
        raw = header + body
        try:
            fields = decode_client_packet(first, body)
        except Malformed as exc:
            self._violation(f"malformed {NAMES.get(kind, kind)}: {exc}")
            fields = {"error": str(exc)}
        pkt = Packet(kind, first & 0x0F, fields, raw, self._loop.time(), self.connack_sent is None)
        self._check(pkt)
        self.packets.append(pkt)
        async with self._changed:
            self._changed.notify_all()
        if "error" not in fields:
            await self._answer(pkt)

    def _violation(self, text: str) -> None:
        self.violations.append(f"connection {self.number}: {text}")

    def _check(self, pkt: Packet) -> None:
        """The rules that need the connection's history."""
        if self.client_disconnect is not None:
            self._violation(f"{pkt.name} after the client's DISCONNECT (MQTT-3.14.4-1)")
        if not self.packets and pkt.kind != CONNECT:
            self._violation(f"first packet is {pkt.name}, not CONNECT (MQTT-3.1.0-1)")
        if pkt.kind == CONNECT:
            if self.connect is not None:
                self._violation("a second CONNECT (MQTT-3.1.0-2)")
            self.connect = pkt
            return
        if "error" in pkt.fields:
            return
        connack = self.connack_sent
        limits = connack.props if connack is not None else {}
        max_size = limits.get(codec.MAXIMUM_PACKET_SIZE)
        if max_size and len(pkt.raw) > max_size:
            self._violation(
                f"{len(pkt.raw)}-byte {pkt.name} over the Maximum Packet Size {max_size} "
                "(MQTT-3.2.2-15)"
            )
        if pkt.kind == PUBLISH:
            self._check_publish(pkt, limits)
        elif pkt.kind in (SUBSCRIBE, UNSUBSCRIBE):
            if pkt.packet_id in self.inflight:
                self._violation(f"{pkt.name} reuses packet id {pkt.packet_id} (MQTT-2.2.1-3)")
            self.inflight[pkt.packet_id] = "sub" if pkt.kind == SUBSCRIBE else "unsub"
            if pkt.kind == SUBSCRIBE:
                self._check_subscribe(pkt, limits)
        elif pkt.kind == PUBREL:
            state = self.inflight.get(pkt.packet_id)
            if state not in ("rec", "old-rec", "rel", "old-rel", "old-pub2"):
                self._violation(
                    f"PUBREL for packet id {pkt.packet_id}, which has no PUBREC ({state}) "
                    "(MQTT-4.3.3-4)"
                )
            else:
                self.inflight[pkt.packet_id] = "rel"
        elif pkt.kind in (PUBACK, PUBREC, PUBCOMP):
            key = (pkt.kind, pkt.packet_id)
            if self.owed[key] > 0:
                self.owed[key] -= 1
            else:
                self._violation(
                    f"{pkt.name} for packet id {pkt.packet_id}, which the server sent no "
                    "packet to be answered so (MQTT-2.2.1-5)"
                )
        elif pkt.kind == DISCONNECT:
            self.client_disconnect = pkt
            sent = (self.connect.props if self.connect is not None else {}).get(
                codec.SESSION_EXPIRY, 0
            )
            if sent == 0 and pkt.props.get(codec.SESSION_EXPIRY, 0):
                self._violation("DISCONNECT sets a Session Expiry after CONNECT's 0 (3.14.2.2.2)")

    def _check_publish(self, pkt: Packet, limits: dict[int, Any]) -> None:
        qos = pkt["qos"]
        if qos > limits.get(codec.MAXIMUM_QOS, 2):
            self._violation(
                f"QoS {qos} PUBLISH over Maximum QoS {limits[codec.MAXIMUM_QOS]} (MQTT-3.2.2-11)"
            )
        if pkt["retain"] and limits.get(RETAIN_AVAILABLE, 1) == 0:
            self._violation("PUBLISH with RETAIN while Retain Available is 0 (MQTT-3.2.2-14)")
        alias = pkt.props.get(codec.TOPIC_ALIAS)
        if alias is not None and alias > limits.get(codec.TOPIC_ALIAS_MAXIMUM, 0):
            self._violation(f"Topic Alias {alias} over the server's maximum (MQTT-3.2.2-17/18)")
        if not qos:
            return
        pid = pkt.packet_id
        state = self.inflight.get(pid)
        if state is not None and not (pkt["dup"] and state == f"old-pub{qos}"):
            self._violation(f"PUBLISH reuses packet id {pid} in flight ({state}) (MQTT-2.2.1-3)")
        self.inflight[pid] = f"pub{qos}"
        in_flight = sum(1 for s in self.inflight.values() if s in ("pub1", "pub2", "rec", "rel"))
        self.max_inflight_seen = max(self.max_inflight_seen, in_flight)
        limit = limits.get(codec.RECEIVE_MAXIMUM, 65_535)
        if in_flight > limit:
            self._violation(
                f"{in_flight} QoS>0 publishes unacknowledged, over Receive Maximum {limit} "
                "(MQTT-3.3.4-7)"
            )

    def _check_subscribe(self, pkt: Packet, limits: dict[int, Any]) -> None:
        for entry in pkt["entries"]:
            topic_filter = entry["filter"]
            if limits.get(WILDCARD_AVAILABLE, 1) == 0 and (
                "+" in topic_filter or "#" in topic_filter
            ):
                self._violation(f"wildcard filter {topic_filter!r} while Wildcard Available is 0")
            if limits.get(SHARED_AVAILABLE, 1) == 0 and topic_filter.startswith("$share/"):
                self._violation(f"shared filter {topic_filter!r} while Shared Available is 0")
        if limits.get(SUB_ID_AVAILABLE, 1) == 0 and pkt["sub_id"] is not None:
            self._violation("Subscription Identifier while Subscription Identifiers Available is 0")

    async def _answer(self, pkt: Packet) -> None:
        kind = pkt.kind
        if kind == CONNECT:
            if self.connack is not None:
                await self.send_connack(self.connack)
                if self.connack.reason < 0x80 and self.connack.raw is None:
                    await self._after_connack()
            return
        if kind not in self.auto:
            return
        if kind == PUBLISH and pkt["qos"]:
            reason = self.pub_reason(pkt)
            await (self.puback(pkt, reason) if pkt["qos"] == 1 else self.pubrec(pkt, reason))
        elif kind == PUBREL:
            await self.pubcomp(pkt.packet_id)
        elif kind == SUBSCRIBE:
            await self.suback(pkt, self.suback_codes(pkt))
        elif kind == UNSUBSCRIBE:
            await self.unsuback(pkt)
        elif kind == PINGREQ:
            await self.send(b"\xd0\x00")

    async def _after_connack(self) -> None:
        then = self.after_connack
        if then == "drop":
            self.drop()
        elif then == "close":
            await self.close()
        elif then is not None:
            await self.send(then)

    # ----------------------------------------------------------- expectations

    def hold(self, *kinds: int) -> StubConnection:
        """Answer none of these packet kinds by itself (the test answers them)."""
        self.auto -= set(kinds)
        return self

    def of(self, kind: int) -> list[Packet]:
        return [p for p in self.packets if p.kind == kind]

    async def expect(
        self, kind: int, timeout: float = 5.0, where: Callable[[Packet], bool] | None = None
    ) -> Packet:
        """The next packet of ``kind`` (matching ``where``) not handed out before."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                while True:
                    for i, pkt in enumerate(self.packets):
                        if (
                            i not in self._consumed
                            and pkt.kind == kind
                            and (where is None or where(pkt))
                        ):
                            self._consumed.add(i)
                            return pkt
                    if self.closed_by_client.done():
                        break
                    await self._changed.wait()
        except TimeoutError:
            pass
        seen = ", ".join(repr(p) for p in self.packets[-8:])
        raise AssertionError(
            f"no {NAMES.get(kind, kind)} from the client on connection {self.number} "
            f"(closed: {self.closed_by_client.done()}; last packets: {seen})"
        )

    async def none_of(self, kind: int, within: float) -> None:
        """Assert the client sends no ``kind`` packet (beyond those already handed out)
        for ``within`` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within), self._changed:
                while True:
                    for i, pkt in enumerate(self.packets):
                        if i not in self._consumed and pkt.kind == kind:
                            raise AssertionError(f"unexpected {pkt!r} on connection {self.number}")
                    await self._changed.wait()

    async def wait_closed(self, timeout: float = 5.0) -> None:
        """Until the client has closed the TCP connection."""
        try:
            await asyncio.wait_for(asyncio.shield(self.closed_by_client), timeout)
        except TimeoutError:
            raise AssertionError(
                f"the client kept connection {self.number} open for {timeout:g}s"
            ) from None

    @property
    def closed(self) -> bool:
        return self.closed_by_client.done()

    # ---------------------------------------------------------------- writing

    async def send(self, data: bytes) -> None:
        """Write ``data`` to the client, cut as the broker's ``chunking`` says."""
        self._track_sent(data)
        async with self._send_lock:
            if self._writer.is_closing():
                return
            mode = self.broker.chunking
            try:
                if mode == "whole":
                    self._writer.write(data)
                    await self._writer.drain()
                    return
                pos = 0
                while pos < len(data):
                    size = 1 if mode == "bytes" else self._rng.choice((1, 1, 2, 3, 5, 8, 64, 700))
                    self._writer.write(data[pos : pos + size])
                    pos += size
                    await self._writer.drain()
                    await asyncio.sleep(0)  # let the client read this piece on its own
                    await asyncio.sleep(0)
            except (ConnectionError, OSError):
                pass

    def _track_sent(self, data: bytes) -> None:
        """Follow the packets the server sends, for the in-flight bookkeeping."""
        self._out_buf += data
        try:
            packets, used = codec.split_packets(self._out_buf)
        except codec.ProtocolError:
            self._out_buf = b""
            return
        self._out_buf = self._out_buf[used:]
        for first, body in packets:
            kind = first >> 4
            try:
                if kind == PUBLISH and first >> 1 & 3 in (1, 2):
                    try:
                        pid = codec.decode_publish(first, body).packet_id
                    except codec.InvalidPublish as exc:
                        pid = exc.packet_id
                    self.owed[(PUBACK if first >> 1 & 3 == 1 else PUBREC, pid)] += 1
                elif kind == PUBREL:
                    self.owed[(PUBCOMP, codec.decode_ack(body)[0])] += 1
                elif kind in (PUBACK, PUBREC, PUBCOMP):
                    pid, reason, _ = codec.decode_ack(body)
                    if kind == PUBREC and reason < 0x80:
                        if pid in self.inflight:
                            self.inflight[pid] = "rec"
                    else:
                        self.inflight.pop(pid, None)
                elif kind in (SUBACK, UNSUBACK):
                    self.inflight.pop(body[0] << 8 | body[1], None)
            except (codec.ProtocolError, IndexError):
                continue

    async def send_connack(self, connack: Connack) -> None:
        if connack.raw is not None:
            self.connack_sent = connack
            await self.send(connack.raw)
            return
        if connack.session_present:
            old = self.broker.sessions.get(self.connect["client_id"] if self.connect else "", {})
            self.inflight = {pid: "old-" + s.removeprefix("old-") for pid, s in old.items()}
        self.connack_sent = connack
        body = bytes((int(connack.session_present), connack.reason))
        await self.send(codec.packet(0x20, body + codec.encode_properties(connack.props)))
        if connack.reason >= 0x80 and connack.close_after_refusal:
            await self.close()  # MQTT-3.2.2-7: the server closes after a refusal

    async def puback(
        self, pkt: Packet | int, reason: int = 0, reason_string: str | None = None
    ) -> None:
        await self._ack(PUBACK, pkt, reason, reason_string)

    async def pubrec(
        self, pkt: Packet | int, reason: int = 0, reason_string: str | None = None
    ) -> None:
        await self._ack(PUBREC, pkt, reason, reason_string)

    async def pubrel(self, pkt: Packet | int, reason: int = 0) -> None:
        await self._ack(PUBREL, pkt, reason, None)

    async def pubcomp(self, pkt: Packet | int, reason: int = 0) -> None:
        await self._ack(PUBCOMP, pkt, reason, None)

    async def _ack(self, kind: int, pkt: Packet | int, reason: int, why: str | None) -> None:
        pid = pkt if isinstance(pkt, int) else pkt.packet_id
        if why is None:
            await self.send(codec.encode_ack(kind, pid, reason))
            return
        block = codec.encode_properties({codec.REASON_STRING: why})
        first = kind << 4 | (2 if kind == PUBREL else 0)
        await self.send(codec.packet(first, pid.to_bytes(2, "big") + bytes((reason,)) + block))

    async def suback(self, pkt: Packet, codes: Iterable[int] | None = None) -> None:
        codes = list(codes) if codes is not None else [e["qos"] for e in pkt["entries"]]
        await self.send(
            codec.packet(0x90, pkt.packet_id.to_bytes(2, "big") + b"\x00" + bytes(codes))
        )

    async def unsuback(self, pkt: Packet, codes: Iterable[int] | None = None) -> None:
        codes = list(codes) if codes is not None else [0] * len(pkt["filters"])
        await self.send(
            codec.packet(0xB0, pkt.packet_id.to_bytes(2, "big") + b"\x00" + bytes(codes))
        )

    async def publish(
        self,
        topic: str,
        payload: bytes = b"",
        *,
        qos: int = 0,
        packet_id: int = 0,
        retain: bool = False,
        dup: bool = False,
        props: dict[int, Any] | None = None,
    ) -> None:
        """A PUBLISH to the client (anything goes: the test may want it malformed)."""
        await self.send(
            codec.encode_publish(
                topic.encode(),
                payload,
                qos=qos,
                retain=retain,
                packet_id=packet_id if qos else 0,
                props=codec.encode_properties(props or {}),
                dup=dup,
            )
        )

    async def disconnect(self, reason: int = 0, *, reason_string: str | None = None) -> None:
        """DISCONNECT with ``reason``, then close the connection (3.14.4)."""
        props = {codec.REASON_STRING: reason_string} if reason_string else {}
        await self.send(codec.packet(0xE0, bytes((reason,)) + codec.encode_properties(props)))
        await self.close()

    def drop(self) -> None:
        """Cut the TCP connection without a word (RST)."""
        self._remember_session()
        transport = self._writer.transport
        transport.abort()

    async def close(self) -> None:
        """Close the TCP connection (FIN), after what was written."""
        self._remember_session()
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()

    def _remember_session(self) -> None:
        if self.connect is not None and "client_id" in self.connect.fields:
            keep = {p: s for p, s in self.inflight.items() if not s.endswith(("sub", "unsub"))}
            self.broker.sessions[self.connect["client_id"]] = keep


class StubBroker:
    """``async with StubBroker() as stub``: a scripted MQTT 5 server on a free port."""

    def __init__(
        self,
        setup: Setup | None = None,
        *,
        chunking: Chunking = "whole",
        seed: int = 0,
        strict: bool = True,
    ) -> None:
        self.setup = setup
        self.chunking: Chunking = chunking
        self.seed = seed
        self.strict = strict
        self.connections: list[StubConnection] = []
        self.sessions: dict[str, dict[int, str]] = {}  # client id -> in flight at the end
        self._handed = 0
        self._server: asyncio.Server | None = None
        self._arrived = asyncio.Condition()
        self.port = 0

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def violations(self) -> list[str]:
        return [v for c in self.connections for v in c.violations]

    async def __aenter__(self) -> StubBroker:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, exc_type: object, *_: object) -> None:
        await self.aclose()
        if exc_type is None and self.strict:
            self.assert_clean()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in self.connections:
            conn._writer.transport.abort()  # each reader sees the end and returns
        tasks = [c.task for c in self.connections if c.task is not None and not c.task.done()]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=2)
            for task in late:
                task.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()
            self._server = None

    def assert_clean(self) -> None:
        """Fail with every rule the client broke."""
        found = self.violations
        assert not found, "the client broke MQTT 5.0:\n" + "\n".join(found)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = StubConnection(self, len(self.connections), reader, writer)
        if self.setup is not None:
            self.setup(conn)
        self.connections.append(conn)
        conn.task = asyncio.current_task()
        async with self._arrived:
            self._arrived.notify_all()
        try:
            await conn._serve()
        finally:
            writer.transport.abort()

    async def next_connection(self, timeout: float = 5.0) -> StubConnection:
        """The next connection the client made (in the order accepted)."""
        try:
            async with asyncio.timeout(timeout), self._arrived:
                while len(self.connections) <= self._handed:
                    await self._arrived.wait()
        except TimeoutError:
            raise AssertionError(f"no new connection from the client in {timeout:g}s") from None
        conn = self.connections[self._handed]
        self._handed += 1
        return conn
