"""What a connection is opened with (:class:`ConnectParams`), and the bounds of
its inbox those default to."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Final, Literal

from daemon.mqtt.codec import Will

# Past this many undispatched incoming messages the socket stops being read.
MAX_QUEUED_INCOMING: Final = 50_000

# Payload bytes waiting for dispatch past which an arriving message over
# LARGE_INCOMING is dropped (acknowledged, counted, logged), and past twice which any
# is: a flood of large messages (1 MiB each is legal) would otherwise hold tens of GB
# before the count bound is reached.  Dropping, not pausing: the broker's
# acknowledgements of our own publishes arrive behind what it queued for us, so a
# paused socket stalls every handler that publishes (it did: 30 s echo round trips).
MAX_QUEUED_INCOMING_BYTES: Final = 32 * 1024 * 1024
LARGE_INCOMING: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class ConnectParams:
    host: str  # the socket path for transport "unix"
    port: int
    client_id: str
    transport: Literal["tcp", "websockets", "unix"] = "tcp"
    websocket_path: str = "/"
    tls: ssl.SSLContext | None = None
    username: str | None = None
    password: str | None = None
    keepalive: int = 30
    clean_start: bool = True
    session_expiry: int = 0
    will: Will | None = None
    receive_maximum: int = 65_535
    max_packet_size: int = 64 * 1024 * 1024  # the largest packet the broker may send us
    max_inflight: int = 65_535  # our own cap on unacknowledged QoS>0 publishes
    connect_timeout: float = 5.0
    max_queued_incoming: int = MAX_QUEUED_INCOMING
    max_queued_incoming_bytes: int = MAX_QUEUED_INCOMING_BYTES
