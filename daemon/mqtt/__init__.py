"""The project's MQTT 5 client: wire format (:mod:`.codec`), one connection
(:mod:`.connection`, built in layers: :mod:`.wire`, :mod:`.publishing`,
:mod:`.handshake`, :mod:`.reading`), the session that outlives it
(:mod:`.session`), its parameters (:mod:`.params`) and errors (:mod:`.errors`), and
the websocket transport (:mod:`.websocket`).

:class:`daemon.bus.Bus` is the only user; everything else talks to the bus.
"""

from daemon.mqtt.codec import Publish, Will
from daemon.mqtt.connection import (
    Connection,
    ConnectionLost,
    ConnectParams,
    ConnectRefused,
    MqttError,
    Outgoing,
    PublishRejected,
    Session,
    SessionFull,
    SubscribeRefused,
    connect,
)

__all__ = [
    "ConnectParams",
    "ConnectRefused",
    "Connection",
    "ConnectionLost",
    "MqttError",
    "Outgoing",
    "Publish",
    "PublishRejected",
    "Session",
    "SessionFull",
    "SubscribeRefused",
    "Will",
    "connect",
]
