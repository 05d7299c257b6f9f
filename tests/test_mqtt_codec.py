"""daemon/mqtt/codec.py and websocket.py against the standard and against paho.

paho-mqtt 2 is the reference: it has no packet codec of its own outside its
client, so a paho ``Client`` is run over one end of a socketpair (:class:`Paho`):
what it writes is what paho encodes, and what is sent to it is decoded by
paho (its callbacks report what it read).  Where paho is more lenient than
the standard (it accepts wildcards, U+0000, an empty topic, packet id 0,
DUP at QoS 0 and Subscription Identifier 0 in a PUBLISH), the tests follow
the standard and say so.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import random
import socket
from collections.abc import Callable
from typing import Any
from unittest.mock import ANY

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt import _packet as paho_packet
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from daemon.broker import PrivateBroker, free_port
from daemon.mqtt import ConnectParams, codec, connect, websocket

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DIFF = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------ paho as a peer


class Paho:
    """A paho MQTT 5 client whose socket is one end of a socketpair."""

    def __init__(self, **connect: Any) -> None:
        self.wire, theirs = socket.socketpair()
        self._theirs = theirs
        self.wire.setblocking(False)
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id="paho", protocol=mqtt.MQTTv5
        )
        self.client._create_socket = lambda: theirs  # type: ignore[method-assign]
        self.events: list[tuple[str, Any]] = []
        c = self.client
        c.on_connect = lambda _c, _u, flags, rc, props: self.events.append(
            ("connect", (flags.session_present, rc.value, props))
        )
        c.on_message = lambda _c, _u, m: self.events.append(("message", m))
        c.on_publish = lambda _c, _u, mid, rc, props: self.events.append(
            ("publish", (mid, rc.value, props))
        )
        c.on_subscribe = lambda _c, _u, mid, rcs, props: self.events.append(
            ("subscribe", (mid, [rc.value for rc in rcs], props))
        )
        c.on_disconnect = lambda _c, _u, flags, rc, props: self.events.append(
            ("disconnect", (rc.value, props))
        )
        self.setup = connect.pop("setup", None)
        if self.setup:
            self.setup(c)
        c.connect("paho.invalid", 1883, **connect)
        self.connect_packet = self.written()

    def accept(self) -> Paho:
        """Answer paho's CONNECT with a plain CONNACK (success, no properties)."""
        self.feed(b"\x20\x03\x00\x00\x00")
        assert self.events.pop()[:2] == ("connect", (False, 0, ANY))
        return self

    def written(self) -> bytes:
        out = b""
        while True:
            try:
                chunk = self.wire.recv(1 << 20)
            except BlockingIOError:
                return out
            if not chunk:
                return out
            out += chunk

    def feed(self, data: bytes) -> None:
        self.wire.sendall(data)
        self.client.loop_read(max_packets=10)

    def close(self) -> None:
        self.wire.close()
        self._theirs.close()


def paho_props(packet_type: int, values: dict[int, Any]) -> PahoProperties:
    props = PahoProperties(packet_type)
    for ident, value in values.items():
        name = props.getNameFromIdent(ident).replace(" ", "")
        setattr(props, name, value)
    return props


def ours_from_paho(props: PahoProperties) -> dict[int, Any]:
    """What paho decoded, as our codec's dict (lists for the repeatable ones)."""
    out: dict[int, Any] = {}
    for name, ident in props.names.items():
        compressed = name.replace(" ", "")
        if hasattr(props, compressed):
            out[ident] = getattr(props, compressed)
    return out


def in_paho_order(values: dict[int, Any]) -> dict[int, Any]:
    """paho packs properties in its table's order: ours in that order match byte for byte."""
    order = list(PahoProperties(PacketTypes.PUBLISH).names.values())
    return {k: values[k] for k in sorted(values, key=order.index)}


# ------------------------------------------------------------------ strategies

_TEXT = st.characters(blacklist_categories=("Cs",), blacklist_characters="\0")
text = st.text(_TEXT, max_size=12)
topics = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\0+#"),
    min_size=1,
    max_size=20,
)
filters = st.one_of(topics, topics.map(lambda t: t + "/#"), topics.map(lambda t: "+/" + t))
u16 = st.integers(1, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
publish_props = st.fixed_dictionaries(
    {},
    optional={
        codec.PAYLOAD_FORMAT: st.integers(0, 1),
        codec.MESSAGE_EXPIRY: u32,
        codec.CONTENT_TYPE: text,
        codec.RESPONSE_TOPIC: topics,
        codec.CORRELATION_DATA: st.binary(max_size=16),
        codec.USER_PROPERTY: st.lists(st.tuples(text, text), min_size=1, max_size=3),
    },
)
sub_ids = st.lists(st.integers(1, codec.MAX_REMAINING_LENGTH), min_size=1, max_size=3)


# --------------------------------------------------- differential: PUBLISH


@DIFF
@given(
    topic=topics,
    payload=st.binary(max_size=300),
    qos=st.integers(0, 2),
    retain=st.booleans(),
    dup=st.booleans(),
    packet_id=u16,
    values=publish_props,
    subscription_ids=st.one_of(st.none(), sub_ids),
)
def test_paho_reads_our_publish(
    *,
    topic: str,
    payload: bytes,
    qos: int,
    retain: bool,
    dup: bool,
    packet_id: int,
    values: dict[int, Any],
    subscription_ids: list[int] | None,
) -> None:
    """What a broker would send us, encoded by us, read by paho: same values."""
    if subscription_ids:
        values = {**values, codec.SUBSCRIPTION_ID: subscription_ids}
    dup = dup and qos > 0
    wire = codec.encode_publish(
        topic.encode(),
        payload,
        qos=qos,
        retain=retain,
        packet_id=packet_id,
        props=codec.encode_properties(values),
        dup=dup,
    )
    paho = Paho().accept()
    try:
        paho.feed(wire)
        acks = paho.written()  # paho's acknowledgement, read by us
        if qos == 2:  # paho delivers a QoS 2 message on PUBREL (4.3.3 method B)
            assert paho.events == []
            paho.feed(codec.encode_ack(codec.PUBREL, packet_id))
            acks += paho.written()
        kind, message = paho.events.pop()
        assert kind == "message"
        assert (message.topic, message.payload, message.qos, message.retain, message.dup) == (
            topic,
            payload,
            qos,
            retain,
            dup,
        )
        if qos:
            assert message.mid == packet_id
        assert ours_from_paho(message.properties) == values
        expected = {0: [], 1: [codec.PUBACK], 2: [codec.PUBREC, codec.PUBCOMP]}[qos]
        packets, used = codec.split_packets(acks)
        assert used == len(acks)
        assert [(first >> 4, codec.decode_ack(body)) for first, body in packets] == [
            (kind, (packet_id, 0, {})) for kind in expected
        ]
        # and ours read our own bytes the same way.
        first, body = codec.split_packets(wire)[0][0]
        ours = codec.decode_publish(first, body)
        assert (ours.topic, ours.payload, ours.qos, ours.retain, ours.properties) == (
            topic,
            payload,
            qos,
            retain,
            values,
        )
    finally:
        paho.close()


@DIFF
@given(
    topic=topics,
    payload=st.binary(max_size=300),
    qos=st.integers(0, 2),
    retain=st.booleans(),
    values=publish_props,
)
def test_we_read_paho_publish_and_write_the_same_bytes(
    *, topic: str, payload: bytes, qos: int, retain: bool, values: dict[int, Any]
) -> None:
    paho = Paho().accept()
    try:
        info = paho.client.publish(
            topic,
            payload,
            qos=qos,
            retain=retain,
            properties=paho_props(PacketTypes.PUBLISH, values) if values else None,
        )
        wire = paho.written()
    finally:
        paho.close()
    [(first, body)], used = codec.split_packets(wire)
    assert used == len(wire)
    message = codec.decode_publish(first, body)
    assert (message.topic, message.payload, message.qos, message.retain) == (
        topic,
        payload,
        qos,
        retain,
    )
    assert message.packet_id == (info.mid if qos else 0)
    assert message.properties == values
    ours = codec.encode_publish(
        topic.encode(),
        payload,
        qos=qos,
        retain=retain,
        packet_id=info.mid,
        props=codec.encode_properties(in_paho_order(values)),
    )
    assert ours == wire


@DIFF
@given(
    content_type=st.one_of(st.none(), text.filter(bool)),
    response_topic=st.one_of(st.none(), topics),
    correlation_data=st.one_of(st.none(), st.binary(min_size=1, max_size=16)),
    expiry=st.one_of(st.none(), st.floats(0.001, 1e6)),
    user=st.one_of(st.none(), st.dictionaries(text, text, min_size=1, max_size=3)),
)
def test_publish_properties_read_by_paho(
    *,
    content_type: str | None,
    response_topic: str | None,
    correlation_data: bytes | None,
    expiry: float | None,
    user: dict[str, str] | None,
) -> None:
    """The bus's own property builder: what paho reads is what was asked for."""
    block = codec.publish_properties(
        content_type=content_type,
        response_topic=response_topic,
        correlation_data=correlation_data,
        expiry=expiry,
        user_properties=user,
    )
    theirs, used = PahoProperties(PacketTypes.PUBLISH).unpack(block)
    assert used == len(block)
    assert getattr(theirs, "ContentType", None) == content_type
    assert getattr(theirs, "ResponseTopic", None) == response_topic
    assert getattr(theirs, "CorrelationData", None) == correlation_data
    assert getattr(theirs, "UserProperty", None) == (list(user.items()) if user else None)
    if expiry:  # whole seconds, rounded up: never 0 (which would mean "no expiry")
        assert theirs.MessageExpiryInterval == max(1, int(expiry + 0.999))
    else:
        assert not hasattr(theirs, "MessageExpiryInterval")


# --------------------------------------------------- differential: CONNECT


@DIFF
@given(
    client_id=text,
    keepalive=st.integers(0, 0xFFFF),
    clean_start=st.booleans(),
    credentials=st.one_of(st.none(), st.tuples(text, st.one_of(st.none(), text))),
    will=st.one_of(
        st.none(),
        st.builds(codec.Will, topics, st.binary(max_size=50), st.integers(0, 2), st.booleans()),
    ),
    session_expiry=st.one_of(st.none(), u32),
    receive_maximum=st.one_of(st.none(), u16),
    # paho refuses values over 268,435,455 (the standard allows any four-byte value but 0)
    max_packet_size=st.one_of(st.none(), st.integers(1, codec.MAX_REMAINING_LENGTH)),
)
def test_connect_is_byte_for_byte_paho(
    *,
    client_id: str,
    keepalive: int,
    clean_start: bool,
    credentials: tuple[str, str | None] | None,
    will: codec.Will | None,
    session_expiry: int | None,
    receive_maximum: int | None,
    max_packet_size: int | None,
) -> None:
    values: dict[int, Any] = {}
    if session_expiry is not None:
        values[codec.SESSION_EXPIRY] = session_expiry
    if receive_maximum is not None:
        values[codec.RECEIVE_MAXIMUM] = receive_maximum
    if max_packet_size is not None:
        values[codec.MAXIMUM_PACKET_SIZE] = max_packet_size

    def setup(c: mqtt.Client) -> None:
        c._client_id = client_id.encode()
        if credentials is not None:
            c.username_pw_set(*credentials)
        if will is not None:
            c.will_set(will.topic, will.payload, will.qos, will.retain)

    paho = Paho(
        setup=setup,
        keepalive=keepalive,
        clean_start=clean_start,
        properties=paho_props(PacketTypes.CONNECT, values) if values else None,
    )
    paho.close()
    ours = codec.encode_connect(
        client_id,
        keepalive=keepalive,
        clean_start=clean_start,
        username=credentials[0] if credentials else None,
        password=credentials[1] if credentials else None,
        will=will,
        properties=in_paho_order(values),
    )
    assert ours == paho.connect_packet


# ----------------------------------------- differential: SUBSCRIBE, UNSUBSCRIBE


@DIFF
@given(
    topic_filter=filters,
    qos=st.integers(0, 2),
    no_local=st.booleans(),
    retain_as_published=st.booleans(),
    retain_handling=st.integers(0, 2),
    sub_id=st.integers(0, codec.MAX_REMAINING_LENGTH),
    granted=st.sampled_from([0, 1, 2, 0x80, 0x87, 0x8F, 0x97, 0x9E, 0xA1, 0xA2]),
)
def test_subscribe_and_unsubscribe_are_byte_for_byte_paho(
    *,
    topic_filter: str,
    qos: int,
    no_local: bool,
    retain_as_published: bool,
    retain_handling: int,
    sub_id: int,
    granted: int,
) -> None:
    paho = Paho().accept()
    try:
        options = SubscribeOptions(qos, no_local, retain_as_published, retain_handling)
        props = (
            paho_props(PacketTypes.SUBSCRIBE, {codec.SUBSCRIPTION_ID: sub_id}) if sub_id else None
        )
        _rc, mid = paho.client.subscribe(topic_filter, options=options, properties=props)
        assert mid is not None
        wire = paho.written()
        ours_options = codec.subscribe_options(
            qos,
            no_local=no_local,
            retain_as_published=retain_as_published,
            retain_handling=retain_handling,
        )
        assert codec.encode_subscribe(mid, topic_filter, ours_options, sub_id) == wire
        # A SUBACK as a broker would send it: paho and we read the same.
        suback = codec.packet(0x90, mid.to_bytes(2, "big") + b"\x00" + bytes((granted,)))
        paho.feed(suback)
        assert paho.events.pop()[:2] == ("subscribe", (mid, [granted], ANY))
        assert codec.decode_suback(codec.split_packets(suback)[0][0][1])[:2] == (mid, [granted])

        _rc, mid = paho.client.unsubscribe(topic_filter)
        assert mid is not None
        assert codec.encode_unsubscribe(mid, topic_filter) == paho.written()
    finally:
        paho.close()


# ------------------------------------------------ differential: acknowledgements

# The reason codes each acknowledgement may carry (3.4.2.1, 3.5.2.1, 3.6.2.1, 3.7.2.1).
PUBACK_REASONS = [0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99]
ACK_REASONS = {
    codec.PUBACK: PUBACK_REASONS,
    codec.PUBREC: PUBACK_REASONS,
    codec.PUBREL: [0x00, 0x92],
    codec.PUBCOMP: [0x00, 0x92],
}


PAHO_ACK_DECODERS = {
    codec.PUBACK: paho_packet.decode_puback,
    codec.PUBREC: paho_packet.decode_pubrec,
    codec.PUBREL: paho_packet.decode_pubrel,
    codec.PUBCOMP: paho_packet.decode_pubcomp,
}


@pytest.mark.parametrize(
    ("kind", "reason"), [(kind, reason) for kind, codes in ACK_REASONS.items() for reason in codes]
)
@pytest.mark.parametrize("packet_id", [1, 0x1234, 0xFFFF])
def test_paho_reads_our_acknowledgements(kind: int, reason: int, packet_id: int) -> None:
    """PUBACK / PUBREC / PUBREL / PUBCOMP with each reason, read by paho's decoders."""
    [(first, body)], _ = codec.split_packets(codec.encode_ack(kind, packet_id, reason))
    codec.check_flags(first)
    theirs = PAHO_ACK_DECODERS[kind](first, body, mqtt.MQTTv5)
    assert (theirs.mid, theirs.reason.value) == (packet_id, reason)
    assert codec.decode_ack(body) == (packet_id, reason, {})


def test_a_publish_exchange_with_paho() -> None:
    """paho publishes at QoS 1 and 2; we acknowledge as a broker would; paho's
    PUBREL is ours byte for byte and our PUBACK / PUBCOMP complete its publishes."""
    paho = Paho().accept()
    try:
        mid = paho.client.publish("t", b"x", qos=1).mid
        paho.written()
        paho.feed(codec.encode_ack(codec.PUBACK, mid, 0x10))
        assert paho.events.pop()[:2] == ("publish", (mid, 0x10, ANY))
        mid = paho.client.publish("t", b"x", qos=2).mid
        paho.written()
        paho.feed(codec.encode_ack(codec.PUBREC, mid))
        wire = paho.written()
        assert wire == codec.encode_ack(codec.PUBREL, mid)
        [(first, body)], _ = codec.split_packets(wire)
        codec.check_flags(first)
        assert codec.decode_ack(body) == (mid, 0, {})
        paho.feed(codec.encode_ack(codec.PUBCOMP, mid))
        assert paho.events.pop()[:2] == ("publish", (mid, 0, ANY))
    finally:
        paho.close()


def test_paho_answers_our_pubrel_with_a_pubcomp_we_read() -> None:
    paho = Paho().accept()
    try:
        paho.feed(codec.encode_publish(b"q2", b"", qos=2, retain=False, packet_id=77, props=b"\0"))
        assert paho.written() == codec.encode_ack(codec.PUBREC, 77)
        paho.feed(codec.encode_ack(codec.PUBREL, 77))
        [(first, body)], _ = codec.split_packets(paho.written())
        assert first >> 4 == codec.PUBCOMP
        assert codec.decode_ack(body) == (77, 0, {})
    finally:
        paho.close()


def test_acknowledgement_with_properties_read_both_ways() -> None:
    reason_string = PahoProperties(PacketTypes.PUBACK)
    reason_string.ReasonString = "quota"
    reason_string.UserProperty = [("k", "v")]
    body = (5).to_bytes(2, "big") + b"\x97" + reason_string.pack()
    assert codec.decode_ack(body) == (
        5,
        0x97,
        {codec.REASON_STRING: "quota", codec.USER_PROPERTY: [("k", "v")]},
    )
    with pytest.raises(codec.ProtocolError, match="after the end") as caught:
        codec.decode_ack(body + b"x")
    assert caught.value.reason == codec.MALFORMED_PACKET


# ----------------------------------------------------- differential: DISCONNECT


@pytest.mark.parametrize("reason", [0x00, 0x04, 0x81, 0x82, 0x8E, 0x94, 0x98])
@pytest.mark.parametrize("why", [None, "topic alias 1 was never announced", "é" * 300])
def test_disconnect_both_ways(reason: int, why: str | None) -> None:
    ours = codec.encode_disconnect(reason, why)
    [(first, body)], used = codec.split_packets(ours)
    assert (first, used) == (0xE0, len(ours))
    expected = {codec.REASON_STRING: why[: codec.MAX_REASON_STRING]} if why else {}
    assert codec.decode_disconnect(body) == (reason, expected)
    # paho reads ours (as a client reading the server's: the same packet).
    paho = Paho().accept()
    try:
        paho.feed(ours)
        kind, (paho_reason, props) = paho.events.pop()
        assert (kind, paho_reason) == ("disconnect", reason)
        assert ours_from_paho(props) == expected
    finally:
        paho.close()
    # paho writes what we read; byte for byte but for reason 0 without a string,
    # which paho writes as e0 01 00 and we as e0 00 (both mean the same: 3.14.2.1).
    paho = Paho().accept()
    try:
        props = paho_props(PacketTypes.DISCONNECT, expected) if why else None
        paho.client.disconnect(
            reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=reason), properties=props
        )
        theirs = paho.written()
    finally:
        paho.close()
    [(first, body)], _ = codec.split_packets(theirs)
    assert codec.decode_disconnect(body) == (reason, expected)
    if reason or why:
        assert theirs == ours
    else:
        assert (theirs, ours) == (b"\xe0\x01\x00", codec.DISCONNECT_PACKET)


# -------------------------------------------------------- differential: CONNACK

connack_props = st.fixed_dictionaries(
    {},
    optional={
        codec.SESSION_EXPIRY: u32,
        codec.RECEIVE_MAXIMUM: u16,
        codec.MAXIMUM_QOS: st.integers(0, 1),
        0x25: st.integers(0, 1),  # Retain Available
        codec.MAXIMUM_PACKET_SIZE: st.integers(1, codec.MAX_REMAINING_LENGTH),
        codec.ASSIGNED_CLIENT_ID: text,
        codec.TOPIC_ALIAS_MAXIMUM: st.integers(0, 0xFFFF),
        codec.REASON_STRING: text,
        codec.USER_PROPERTY: st.lists(st.tuples(text, text), min_size=1, max_size=2),
        0x28: st.integers(0, 1),  # Wildcard Subscription Available
        0x29: st.integers(0, 1),  # Subscription Identifiers Available
        0x2A: st.integers(0, 1),  # Shared Subscription Available
        codec.SERVER_KEEP_ALIVE: st.integers(0, 0xFFFF),
        0x1C: text,  # Server Reference
    },
)


@DIFF
@given(
    session_present=st.booleans(),
    reason=st.sampled_from([0, 0x80, 0x84, 0x85, 0x86, 0x87, 0x88, 0x8A, 0x95, 0x9C, 0x9F]),
    values=connack_props,
)
def test_connack_read_like_paho(
    *, session_present: bool, reason: int, values: dict[int, Any]
) -> None:
    session_present = session_present and reason < 0x80
    props = paho_props(PacketTypes.CONNACK, values).pack()
    wire = codec.packet(0x20, bytes((session_present, reason)) + props)
    [(_first, body)], _ = codec.split_packets(wire)
    assert codec.decode_connack(body) == (session_present, reason, values)
    paho = Paho()
    try:
        paho.feed(wire)
        kind, (present, paho_reason, paho_values) = paho.events[0]
        assert (kind, present, paho_reason) == ("connect", session_present, reason)
        assert ours_from_paho(paho_values) == values
    finally:
        paho.close()


# ---------------------------------------------------------------- CONNACK rules


@pytest.mark.parametrize(
    ("code", "name"), [*sorted(codec.LEGACY_RETURN_CODES.items()), (9, "unknown return code 9")]
)
def test_a_3_1_1_connack_says_the_broker_lacks_mqtt_5(code: int, name: str) -> None:
    with pytest.raises(codec.LegacyConnack) as caught:
        codec.decode_connack(bytes((0, code)))
    assert caught.value.return_code == code
    assert isinstance(caught.value, codec.ProtocolError)
    assert str(caught.value).startswith("the broker speaks MQTT 3.1.1, not MQTT 5 (")
    assert name in str(caught.value)


def test_the_3_1_1_refusal_of_an_mqtt_5_connect() -> None:
    """What a 3.1.1-only broker (e.g. Mosquitto 1.4) answers our CONNECT: 20 02 00 01."""
    [(first, body)], _ = codec.split_packets(bytes.fromhex("20020001"))
    assert first >> 4 == codec.CONNACK
    with pytest.raises(codec.LegacyConnack) as caught:
        codec.decode_connack(body)
    assert str(caught.value) == (
        "the broker speaks MQTT 3.1.1, not MQTT 5 "
        "(it refused our MQTT 5 CONNECT: unacceptable protocol version)"
    )


@pytest.mark.parametrize(
    ("body", "reason", "match"),
    [
        (b"\x02\x00\x00", codec.MALFORMED_PACKET, "reserved flags"),
        (b"\x81\x00\x00", codec.MALFORMED_PACKET, "reserved flags"),
        (b"\x01\x87\x00", codec.PROTOCOL_ERROR, "Session Present"),
        (b"\x01\x80\x00", codec.PROTOCOL_ERROR, "Session Present"),
        (b"\x00\x00\x00\x00", codec.MALFORMED_PACKET, "after the end"),
        (b"\x00\x00\x02\x24", codec.MALFORMED_PACKET, "run past the packet"),
        (b"\x00\x00\x01\x24", codec.MALFORMED_PACKET, "runs past the properties"),
        (b"\x00", codec.MALFORMED_PACKET, "too short"),
    ],
)
def test_connack_rules(body: bytes, reason: int, match: str) -> None:
    with pytest.raises(codec.ProtocolError, match=match) as caught:
        codec.decode_connack(body)
    assert caught.value.reason == reason
    assert not isinstance(caught.value, codec.LegacyConnack)


def test_a_good_connack_with_session_present() -> None:
    assert codec.decode_connack(b"\x01\x00\x00") == (True, 0, {})
    assert codec.decode_connack(b"\x01\x00\x02\x24\x01") == (True, 0, {codec.MAXIMUM_QOS: 1})


# ------------------------------------------------------- incoming PUBLISH rules


def _publish(
    topic: bytes = b"a/b",
    *,
    qos: int = 1,
    packet_id: int = 9,
    props: dict[int, Any] | None = None,
    first: int | None = None,
) -> tuple[int, bytes]:
    wire = codec.encode_publish(
        topic,
        b"payload",
        qos=qos,
        retain=False,
        packet_id=packet_id,
        props=codec.encode_properties(props or {}),
    )
    [(encoded_first, body)], _ = codec.split_packets(wire)
    return (encoded_first if first is None else first), body


@pytest.mark.parametrize(
    ("topic", "props", "match"),
    [
        (b"a/+/b", None, "wildcard"),  # MQTT-3.3.2-2
        (b"a/#", None, "wildcard"),
        (b"+", None, "wildcard"),
        (b"a\x00b", None, "U\\+0000"),
        (b"a/\xff", None, "not UTF-8"),
        (b"a/\xed\xa0\x80", None, "not UTF-8"),  # an encoded surrogate (1.5.4)
        (b"a/b", {codec.CONTENT_TYPE: "x"}, None),  # valid: the control case
    ],
)
@pytest.mark.parametrize(("qos", "packet_id"), [(0, 0), (1, 300), (2, 65535)])
def test_a_bad_topic_drops_that_message(
    topic: bytes, props: dict[int, Any] | None, match: str | None, qos: int, packet_id: int
) -> None:
    first, body = _publish(topic, qos=qos, packet_id=packet_id, props=props)
    if match is None:
        message = codec.decode_publish(first, body)
        assert (message.topic, message.qos, message.packet_id) == ("a/b", qos, packet_id)
        return
    with pytest.raises(codec.InvalidPublish, match=match) as caught:
        codec.decode_publish(first, body)
    assert (caught.value.qos, caught.value.packet_id) == (qos, packet_id)
    assert caught.value.reason == codec.TOPIC_NAME_INVALID


def test_a_bad_string_property_drops_that_message() -> None:
    block = b"\x04\x03\x00\x01\xff"  # Content Type "\xff"
    body = b"\x00\x01t" + b"\x00\x05" + block + b"payload"
    with pytest.raises(codec.InvalidPublish, match="not UTF-8") as caught:
        codec.decode_publish(0x32, body)
    assert (caught.value.qos, caught.value.packet_id) == (1, 5)


@pytest.mark.parametrize(
    ("packet", "reason", "match"),
    [
        (_publish(first=0x36), codec.MALFORMED_PACKET, "QoS 3"),
        (_publish(qos=1, packet_id=0), codec.PROTOCOL_ERROR, "packet identifier 0"),
        (_publish(qos=2, packet_id=0), codec.PROTOCOL_ERROR, "packet identifier 0"),
        (_publish(qos=0, packet_id=0, first=0x38), codec.PROTOCOL_ERROR, "DUP"),  # 3.3.1-2
        (_publish(b""), codec.PROTOCOL_ERROR, "empty topic"),  # 3.3.2-1
        (_publish(b"", props={codec.TOPIC_ALIAS: 1}), codec.TOPIC_ALIAS_INVALID, "Topic Alias"),
        (_publish(props={codec.TOPIC_ALIAS: 3}), codec.TOPIC_ALIAS_INVALID, "Topic Alias"),
        (_publish(props={codec.SUBSCRIPTION_ID: [4, 0]}), codec.PROTOCOL_ERROR, "Identifier 0"),
        (_publish(props={codec.SESSION_EXPIRY: 1}), codec.MALFORMED_PACKET, "0x11"),
        ((0x30, b"\x00"), codec.MALFORMED_PACKET, "too short"),
        ((0x30, b"\x00\x05abc"), codec.MALFORMED_PACKET, "runs past"),
        ((0x32, b"\x00\x01a\x00"), codec.MALFORMED_PACKET, "cut short"),
        ((0x30, b"\x00\x01a"), codec.MALFORMED_PACKET, "property length"),
    ],
)
def test_a_broken_publish_is_a_protocol_error(
    packet: tuple[int, bytes], reason: int, match: str
) -> None:
    with pytest.raises(codec.ProtocolError, match=match) as caught:
        codec.decode_publish(*packet)
    assert not isinstance(caught.value, codec.InvalidPublish)
    assert caught.value.reason == reason
    assert codec.reason_text(reason) != f"0x{reason:02x} unknown reason"


def test_what_is_valid_stays_valid() -> None:
    """DUP at QoS 1/2, several Subscription Identifiers, '$' topics, a one-byte topic."""
    message = codec.decode_publish(*_publish(qos=2, first=0x3D))
    assert (message.qos, message.retain, message.packet_id) == (2, True, 9)
    ids = [1, codec.MAX_REMAINING_LENGTH]
    message = codec.decode_publish(*_publish(b"$SYS/x", props={codec.SUBSCRIPTION_ID: ids}))
    assert (message.topic, message.properties) == ("$SYS/x", {codec.SUBSCRIPTION_ID: ids})
    assert codec.decode_publish(*_publish(b"/", qos=0, packet_id=0)).topic == "/"


def test_encode_disconnect_forms() -> None:
    assert codec.encode_disconnect(0) == b"\xe0\x00"
    assert codec.encode_disconnect(0x94) == b"\xe0\x01\x94"
    assert codec.encode_disconnect(0x82, "x") == b"\xe0\x06\x82\x04\x1f\x00\x01x"


@pytest.mark.parametrize(
    ("first", "ok"),
    [(0x40, True), (0x41, False), (0x62, True), (0x60, False), (0x82, True), (0x80, False),
     (0xA2, True), (0xE0, True), (0xE8, False), (0x20, True), (0x2F, False), (0x3F, True)],
)  # fmt: skip
def test_fixed_header_flags(first: int, ok: bool) -> None:
    if ok:
        codec.check_flags(first)
    else:
        with pytest.raises(codec.ProtocolError, match="flags") as caught:
            codec.check_flags(first)
        assert caught.value.reason == codec.MALFORMED_PACKET


# ------------------------------------------------------------------ reason codes

# Where our name follows the standard's table (2.4) and paho's words differ.
SPEC_WORDING = {
    0x11: ("no subscription existed", "no subscription found"),
    0x9E: ("shared subscriptions not supported", "shared subscription not supported"),
    0xA2: ("wildcard subscriptions not supported", "wildcard subscription not supported"),
}


def test_every_reason_code_of_the_standard_has_its_name() -> None:
    paho = ReasonCode.names
    assert set(codec.REASONS) == set(paho)
    for code, names in paho.items():
        ours = {
            codec.reason_text(code, packet_type).split(" ", 1)[1].lower()
            for name, packet_types in names.items()
            for packet_type in packet_types
        }
        theirs = {name.lower() for name in names}
        if code in SPEC_WORDING:
            assert (ours, theirs) == ({SPEC_WORDING[code][0]}, {SPEC_WORDING[code][1]})
        else:
            assert ours == theirs, hex(code)
    assert codec.reason_text(0x00, codec.DISCONNECT) == "0x00 normal disconnection"
    assert codec.reason_text(0x00, codec.SUBACK) == "0x00 granted QoS 0"
    assert codec.reason_text(0x00) == "0x00 success"
    assert codec.reason_text(0x03) == "0x03 unknown reason"


# ------------------------------------------------------------- hostile input

DECODERS: dict[str, Callable[[bytes], object]] = {
    "ack": codec.decode_ack,
    "suback": codec.decode_suback,
    "connack": codec.decode_connack,
    "disconnect": codec.decode_disconnect,
    "properties": lambda data: codec.read_properties(data, 0),
    "varint": lambda data: codec.read_varint(data, 0),
    "packet_size": codec.packet_size,
}


def _valid_bodies() -> list[tuple[int, bytes]]:
    props = codec.encode_properties(
        {codec.CONTENT_TYPE: "t", codec.USER_PROPERTY: [("k", "v")], codec.SUBSCRIPTION_ID: [3]}
    )
    stream = b"".join(
        [
            codec.encode_publish(b"a/b", b"p", qos=1, retain=True, packet_id=2, props=props),
            codec.encode_ack(codec.PUBACK, 3, 0x87),
            codec.packet(0x20, b"\x00\x00\x05\x24\x01\x21\x00\x0a"),
            codec.packet(0x90, b"\x00\x04\x00\x01"),
            codec.encode_disconnect(0x8E, "taken"),
        ]
    )
    return codec.split_packets(stream)[0]


VALID = _valid_bodies()


def _only_protocol_errors(call: Callable[[], object]) -> None:
    try:
        call()
    except codec.ProtocolError as exc:
        assert 0x80 <= exc.reason <= 0xA2
        assert exc.reason in codec.REASONS


@FUZZ
@given(first=st.integers(0x30, 0x3F), data=st.binary(max_size=64))
def test_decode_publish_on_random_bytes(first: int, data: bytes) -> None:
    _only_protocol_errors(lambda: codec.decode_publish(first, data))


@FUZZ
@given(name=st.sampled_from(sorted(DECODERS)), data=st.binary(max_size=64))
def test_decoders_on_random_bytes(name: str, data: bytes) -> None:
    _only_protocol_errors(lambda: DECODERS[name](data))


@FUZZ
@given(
    index=st.integers(0, len(VALID) - 1),
    cut=st.integers(0, 40),
    flips=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4),
)
def test_decoders_on_damaged_packets(index: int, cut: int, flips: list[tuple[int, int]]) -> None:
    """Valid packets, cut short and with bytes changed: closer to the edge than noise."""
    first, body = VALID[index]
    damaged = bytearray(body[: len(body) - cut] if cut < len(body) else b"")
    for at, value in flips:
        if damaged:
            damaged[at % len(damaged)] = value
    data = bytes(damaged)
    kind = first >> 4
    if kind == codec.PUBLISH:
        _only_protocol_errors(lambda: codec.decode_publish(first, data))
    for decode in DECODERS.values():
        _only_protocol_errors(lambda decode=decode: decode(data))  # type: ignore[misc]


@FUZZ
@given(
    chunks=st.lists(
        st.one_of(st.binary(max_size=20), st.sampled_from([b for _, b in VALID])), max_size=8
    ),
    cuts=st.lists(st.integers(0, 400), max_size=5),
)
def test_split_packets_on_random_streams_at_random_cuts(
    chunks: list[bytes], cuts: list[int]
) -> None:
    """Whatever the bytes, split_packets raises only ProtocolError, and where the
    stream is cut does not change the packets it finds."""
    stream = b"".join(chunks)
    try:
        whole, used_whole = codec.split_packets(stream)
    except codec.ProtocolError:
        return
    got: list[tuple[int, bytes]] = []
    buffer = b""
    points = sorted({min(c, len(stream)) for c in cuts} | {len(stream)})
    start = 0
    for point in points:
        buffer += stream[start:point]
        start = point
        packets, used = codec.split_packets(buffer)
        got += packets
        buffer = buffer[used:]
    assert got == whole
    assert len(buffer) == len(stream) - used_whole


# ------------------------------------------------------------------- websocket


class _Inner:
    """The MQTT connection's side of the websocket protocol: what it is handed."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.calls = 0
        self.lost = False

    def connection_made(self, transport: object) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        self.received += data
        self.calls += 1

    def connection_lost(self, exc: object) -> None:
        self.lost = True


class _Raw(asyncio.Transport):
    """The socket under the websocket: what the protocol writes to it."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closed = self.aborted = False

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted


def _server_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = False) -> bytes:
    n = len(payload)
    second = 0x80 if mask else 0
    if n < 126:
        head = bytes((opcode | (0x80 if fin else 0), second | n))
    elif n < 65_536:
        head = bytes((opcode | (0x80 if fin else 0), second | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((opcode | (0x80 if fin else 0), second | 127)) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def _upgraded() -> tuple[websocket.WebSocketProtocol, _Inner, _Raw]:
    inner, raw = _Inner(), _Raw()
    ws = websocket.WebSocketProtocol(inner, "h", 1, "/")  # type: ignore[arg-type]
    ws.connection_made(raw)
    accept = base64.b64encode(hashlib.sha1(ws._key + websocket._GUID).digest())
    ws.data_received(
        b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    assert ws.ready.done() and ws.ready.exception() is None
    raw.written.clear()
    return ws, inner, raw


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    sizes=st.lists(st.integers(0, 70_000), min_size=1, max_size=8),
)
async def test_websocket_frames_at_random_reads(seed: int, sizes: list[int]) -> None:
    """Random payloads in random frames (continuations, masked ones, pings between
    them) delivered in random reads: the connection gets exactly the bytes, each
    in the read that brought it (nothing is held back, so nothing is re-joined)."""
    rng = random.Random(seed)
    ws, inner, raw = await _upgraded()
    stream = bytearray()
    expected = bytearray()
    ends: list[int] = []  # stream offset where each payload byte is complete
    pings: list[bytes] = []
    for size in sizes:
        payload = rng.randbytes(size)
        opcode = websocket._OP_BINARY
        while True:
            cut = rng.randint(min(1, len(payload)), len(payload))
            piece, payload = payload[:cut], payload[cut:]
            last = not payload
            frame = _server_frame(opcode, piece, fin=last, mask=rng.random() < 0.2)
            header = len(frame) - len(piece)
            ends += range(len(stream) + header + 1, len(stream) + len(frame) + 1)
            stream += frame
            expected += piece
            opcode = websocket._OP_CONTINUATION
            if rng.random() < 0.3:
                ping = rng.randbytes(rng.randint(0, 125))
                pings.append(ping)
                stream += _server_frame(websocket._OP_PING, ping)
            if last:
                break
    pos = 0
    while pos < len(stream):
        step = rng.choice([1, 2, 3, 7, 100, 4096, 65_536, 200_000])
        ws.data_received(bytes(stream[pos : pos + step]))
        pos += step
        complete = sum(1 for end in ends if end <= min(pos, len(stream)))
        assert len(inner.received) == complete  # every payload byte read is passed on
    assert inner.received == expected
    assert not raw.aborted
    pongs = [w for w in raw.written if w[0] == 0x80 | websocket._OP_PONG]
    assert [_unmask_client_frame(p) for p in pongs] == pings


def _unmask_client_frame(frame: bytes) -> bytes:
    n = frame[1] & 0x7F
    at = 2 + (2 if n == 126 else 8 if n == 127 else 0)
    key, payload = frame[at : at + 4], frame[at + 4 :]
    assert frame[1] & 0x80  # a client masks every frame (RFC 6455 5.1)
    return bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def test_a_40_mb_frame_is_passed_on_read_by_read() -> None:
    """The frame that was quadratic: each 64 KiB read reaches the connection as it
    comes (one call per read) instead of being appended to a growing buffer."""
    ws, inner, _raw = await _upgraded()
    payload = os.urandom(40_000_000)
    stream = _server_frame(websocket._OP_BINARY, payload)
    reads = 0
    for pos in range(0, len(stream), 65_536):
        ws.data_received(stream[pos : pos + 65_536])
        reads += 1
    assert inner.received == payload
    assert inner.calls == reads  # the first read's 10 header bytes come with payload too


@pytest.mark.parametrize(
    ("frames", "delivered"),
    [
        (_server_frame(websocket._OP_TEXT, b"\x30\x00"), b""),  # MQTT-6.0.0-1
        (_server_frame(0x3, b"x"), b""),  # a reserved opcode
        (b"\xc2\x01x", b""),  # RSV1 set without an extension
        (_server_frame(websocket._OP_PING, b"x" * 126), b""),
        (_server_frame(websocket._OP_PING, b"x", fin=False), b""),
        (_server_frame(websocket._OP_BINARY, b"ok") + _server_frame(0xB, b""), b"ok"),
    ],
)
async def test_websocket_refuses_what_rfc_6455_and_mqtt_refuse(
    frames: bytes, delivered: bytes
) -> None:
    ws, inner, raw = await _upgraded()
    ws.data_received(frames)
    assert raw.aborted
    assert bytes(inner.received) == delivered


async def test_websocket_close_frame_is_answered_and_ends_reading() -> None:
    ws, inner, raw = await _upgraded()
    ws.data_received(
        _server_frame(websocket._OP_BINARY, b"a")
        + _server_frame(websocket._OP_CLOSE, (1001).to_bytes(2, "big") + b"going away")
        + _server_frame(websocket._OP_BINARY, b"late")
    )
    assert bytes(inner.received) == b"a"
    assert raw.closed
    assert [_unmask_client_frame(w) for w in raw.written] == [(1001).to_bytes(2, "big")]
    ws.data_received(_server_frame(websocket._OP_BINARY, b"later"))
    assert bytes(inner.received) == b"a"


# ---------------------------------------------- 40 MB through real websockets


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, broker: int) -> None:
    """A websocket endpoint in front of Mosquitto's TCP listener that sends each MQTT
    packet from the broker as one binary frame (a 40 MB message: one 40 MB frame).

    Mosquitto 2.0.11's own websocket listener sends ~40 kB/s to a client (a 4 kB
    write per turn of its main loop, paho's client sees the same): a 40 MB message
    would take 15 minutes that way, so the broker's side of the delivery is this
    RFC 6455 server, written here from the RFC, not from daemon/mqtt/websocket.py.
    """
    request = await reader.readuntil(b"\r\n\r\n")
    key = next(
        line.split(b":", 1)[1].strip()
        for line in request.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    )
    accept = base64.b64encode(hashlib.sha1(key + websocket._GUID).digest())
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Protocol: mqtt\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", broker)

    async def client_to_broker() -> None:
        try:
            await _client_frames_to(reader, up_writer)
        finally:
            up_writer.close()  # the broker closes its side: broker_to_client ends

    async def broker_to_client() -> None:
        while True:
            head = await up_reader.readexactly(2)
            while head[-1] & 0x80:
                head += await up_reader.readexactly(1)
            body = await up_reader.readexactly(codec.read_varint(head, 1)[0])
            writer.write(_server_frame(websocket._OP_BINARY, head + body))
            await writer.drain()

    try:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(client_to_broker())
            tasks.create_task(broker_to_client())
    except* (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        up_writer.close()
        writer.close()


async def _client_frames_to(reader: asyncio.StreamReader, out: asyncio.StreamWriter) -> None:
    """Unmask the client's frames onto ``out`` until its close frame."""
    while True:
        b0, b1 = await reader.readexactly(2)
        n = b1 & 0x7F
        if n >= 126:
            n = int.from_bytes(await reader.readexactly(2 if n == 126 else 8), "big")
        mask = await reader.readexactly(4)
        data = await reader.readexactly(n)
        if b0 & 0x0F == websocket._OP_CLOSE:
            return
        out.write(websocket._mask(data, mask))


@pytest.mark.slow
async def test_a_40_mb_message_round_trip_over_websockets(realm: str) -> None:
    """Published over Mosquitto's websocket listener (one 40 MB masked frame from
    us), delivered over websockets (one 40 MB frame to us), intact."""
    ws_port = free_port()
    payload = os.urandom(40_000_000)
    topic = f"mtor/{realm}/ws40"
    with PrivateBroker(extra_config=f"listener {ws_port} 127.0.0.1\nprotocol websockets\n") as b:
        relay = await asyncio.start_server(lambda r, w: _relay(r, w, b.port), "127.0.0.1", 0)
        relay_port = relay.sockets[0].getsockname()[1]
        async with relay:
            sub = await connect(
                ConnectParams("127.0.0.1", relay_port, f"ws-sub-{realm}", transport="websockets")
            )
            pub = await connect(
                ConnectParams("127.0.0.1", ws_port, f"ws-pub-{realm}", transport="websockets")
            )
            try:
                await sub.subscribe(topic, codec.subscribe_options(1))
                pub.publish(topic, payload, qos=1)
                async with asyncio.timeout(120):
                    await sub.wait_message()
                message = sub.inbox.popleft()
            finally:
                await pub.close()
                await sub.close()
    assert message.topic == topic
    assert len(message.payload) == len(payload)
    assert message.payload == payload
