"""Messages shared by every family: errors."""

from __future__ import annotations

from daemon.messages import Message


class ErrorReply(Message):
    """The answer to a request that could not be accepted."""

    TYPE = "error"

    code: str
    message: str
    ref: str | None = None
