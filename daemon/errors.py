"""The project's exception hierarchy.

Foreign exceptions (aiomqtt, pydantic, OS errors) are converted at the
boundary with ``raise ... from`` so callers only ever catch these.
"""

from __future__ import annotations


class MtorError(Exception):
    """Base of every error M-TOR raises on purpose."""


class ConfigError(MtorError):
    """The configuration is invalid; the message names the bad key's path."""


class BusError(MtorError):
    """The MQTT bus could not do what was asked."""


class BusAuthError(BusError):
    """The broker refused our credentials or authorisation: fatal, never retried."""


class BusNotConnectedError(BusError):
    """An operation needed a live broker connection and there was none in time."""


class BusSubscribeError(BusError):
    """The broker refused a subscription (a SUBACK reason code >= 0x80), or would
    (a wildcard or shared subscription it says it lacks): it is not sent again."""


class BusPublishError(BusError):
    """A publish was refused: its topic is not a valid MQTT topic name, its payload or
    properties cannot be encoded, or the broker refused it (a reason code >= 0x80,
    or it closed the connection on it).  It is not sent again."""


class MessageError(MtorError):
    """A payload from the network failed validation (or a message could not be encoded).

    ``code`` is the machine-readable error code sent back in error replies.
    """

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code


class BrokerStartError(MtorError):
    """A private Mosquitto broker could not be started."""


class TaskError(MtorError):
    """A task failed; ``code`` is the machine-readable error code sent to the requester.

    Common codes: ``bad_input``, ``unavailable``, ``timeout``, ``backend_error``,
    ``rate_limited``, ``auth``, ``cancelled``, ``internal``.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
