"""The MQTT client's exceptions (all :class:`daemon.errors.BusError`)."""

from __future__ import annotations

from typing import Final

from daemon.errors import BusError
from daemon.mqtt.codec import reason_text


class MqttError(BusError):
    """The connection failed or was lost."""


class ConnectionLost(MqttError):
    """The connection is gone (closed by either side, or unreachable)."""


class PublishRejected(MqttError):
    """The broker will never take this publish (a reason code >= 0x80, or it closed
    the connection on it), or it cannot be sent at all: it is not sent again."""

    def __init__(self, message: str, reason: int) -> None:
        super().__init__(message)
        self.reason = reason


class SessionFull(MqttError):
    """The session holds as many unacknowledged publishes (or bytes) as it may."""


# Why a subscription is refused here, before the broker sees it.
_LOCAL_REFUSALS: Final = {
    0xA2: "the broker has no wildcard subscriptions",
    0x9E: "the broker has no shared subscriptions",
    0x95: "over the broker's Maximum Packet Size",
}


class SubscribeRefused(MqttError):
    """A subscription the broker refused (SUBACK >= 0x80) or would refuse."""

    def __init__(self, topic_filter: str, reason: int) -> None:
        text = _LOCAL_REFUSALS.get(reason) or f"refused by the broker ({reason_text(reason)})"
        super().__init__(f"subscription to {topic_filter[:200]!r}: {text}")
        self.reason = reason


class ConnectRefused(MqttError):
    """The broker answered CONNECT with a failure reason code (``legacy``: it
    answered as an MQTT 3.1.1 broker)."""

    def __init__(self, code: int, reason: str | None = None) -> None:
        text = reason_text(code) + (f": {reason}" if reason else "")
        super().__init__(f"connection refused ({text})")
        self.code = code
        self.legacy = False
