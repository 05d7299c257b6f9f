"""What the bus hands its users and takes from them: :class:`Inbound` messages,
handler and hook types, payloads, and payloads cut for log lines."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from daemon.messages import Message, encode

# Payloads in log lines are cut to this many bytes.
LOG_PAYLOAD_BYTES: Final = 200


Payload = bytes | str | Message


@dataclass(frozen=True, slots=True)
class Inbound:
    """An incoming message, decoupled from the MQTT library."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    response_topic: str | None = None
    correlation_data: bytes | None = None
    content_type: str | None = None
    user_properties: tuple[tuple[str, str], ...] = ()

    def preview(self) -> str:
        return truncate(self.payload)


Handler = Callable[[Inbound], Awaitable[None]]
Hook = Callable[[], Awaitable[None]]


_SECRET_FIELD = re.compile(r'("(?:token|password|api_key|secret)"\s*:\s*)"[^"]*"?')


def truncate(payload: bytes, limit: int = LOG_PAYLOAD_BYTES) -> str:
    """A payload for a log line: cut to ``limit`` bytes, secrets masked."""
    text = _SECRET_FIELD.sub(r'\1"***"', payload[:limit].decode("utf-8", errors="replace"))
    return text + (f"...(+{len(payload) - limit} bytes)" if len(payload) > limit else "")


def to_bytes(payload: Payload) -> bytes:
    if isinstance(payload, Message):
        return encode(payload)
    return payload.encode() if isinstance(payload, str) else payload
