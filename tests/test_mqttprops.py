"""FastProperties must behave exactly like paho's Properties (it replaces it on the hot path)."""

from __future__ import annotations

from typing import Any

import paho.mqtt.client as paho_client
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import MQTTException, Properties

from daemon.mqttprops import FastProperties, install

PUBLISH_VALUES: dict[str, Any] = {
    "PayloadFormatIndicator": 1,
    "MessageExpiryInterval": 3600,
    "ContentType": "audio/L16;rate=16000",
    "ResponseTopic": "mtor/home/reply/cli-1/x",
    "CorrelationData": b"\x00\x01corr\xff",
    "SubscriptionIdentifier": 268435455,
    "TopicAlias": 7,
    "UserProperty": [("a", "1"), ("ü", "ß")],
}


def _fill(cls: type[Properties], packet_type: int, values: dict[str, Any]) -> Properties:
    props = cls(packet_type)
    for name, value in values.items():
        setattr(props, name, value)
    return props


def test_pack_is_byte_identical_to_paho() -> None:
    slow = _fill(Properties, PacketTypes.PUBLISH, PUBLISH_VALUES)
    fast = _fill(FastProperties, PacketTypes.PUBLISH, PUBLISH_VALUES)
    assert fast.pack() == slow.pack()
    assert fast.json() == slow.json()
    assert str(fast) == str(slow)


@pytest.mark.parametrize(
    ("packet_type", "values"),
    [
        (PacketTypes.PUBLISH, PUBLISH_VALUES),
        (PacketTypes.PUBLISH, {}),
        (PacketTypes.SUBSCRIBE, {"SubscriptionIdentifier": 42}),
        (
            PacketTypes.CONNACK,
            {
                "SessionExpiryInterval": 0,
                "ReceiveMaximum": 20,
                "MaximumQoS": 1,
                "RetainAvailable": 1,
                "AssignedClientIdentifier": "auto-1",
                "ServerKeepAlive": 60,
                "TopicAliasMaximum": 10,
                "ReasonString": "ok",
                "SharedSubscriptionAvailable": 1,
            },
        ),
    ],
)
def test_unpack_reads_what_paho_wrote(packet_type: int, values: dict[str, Any]) -> None:
    wire = _fill(Properties, packet_type, values).pack()
    fast, used = FastProperties(packet_type).unpack(wire + b"payload")
    slow, used_slow = Properties(packet_type).unpack(wire + b"payload")
    assert used == used_slow == len(wire)
    assert fast.json() == slow.json()
    assert fast.isEmpty() == slow.isEmpty() == (not values)


def test_validation_is_paho_s() -> None:
    props = FastProperties(PacketTypes.PUBLISH)
    with pytest.raises(MQTTException, match="must be one of"):
        props.NoSuchProperty = 1
    with pytest.raises(MQTTException, match="does not apply"):
        props.SessionExpiryInterval = 1
    with pytest.raises(MQTTException, match="range 1-65535"):
        props.TopicAlias = 0
    with pytest.raises(MQTTException, match="more than once"):
        # two Message Expiry Interval properties in one packet
        wire = bytes([10]) + b"\x02\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x02"
        FastProperties(PacketTypes.PUBLISH).unpack(wire)
    props.UserProperty = ("k", "v")
    props.UserProperty = ("k", "w")
    assert props.UserProperty == [("k", "v"), ("k", "w")]
    props.clear()
    assert props.isEmpty()


def test_install_makes_paho_decode_with_it() -> None:
    assert install()
    assert paho_client.Properties is FastProperties
    assert install()  # idempotent
