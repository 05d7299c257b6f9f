"""Realm state: small named values the whole realm shares (``armed``, ``mode``, ...).

``state/<key>`` carries the current value, retained, so every node and the
orchestrator learn it on subscribe and keep it while the orchestrator is away
(a camera keeps honouring ``armed``).  Anyone allowed to change it publishes a
:class:`StateSet` on ``state/<key>/set``; the orchestrator validates it and
publishes the new retained :class:`RealmState`; a request that carries an
MQTT 5 response topic is answered with a :class:`StateReply` (the applied
value, or why it was refused).
"""

from __future__ import annotations

import re
from typing import Any, Final

from pydantic import Field

from daemon.messages import Message, now
from daemon.protocol.task import ErrorInfo

STATE_KEY_RE: Final = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class RealmState(Message):
    """The current value of one realm state key (retained on ``state/<key>``)."""

    TYPE = "state"

    value: Any = None
    by: str = Field(
        default="", max_length=128, description="Who set it: an account, or a workflow run."
    )
    ts: float = Field(default_factory=now)


class StateSet(Message):
    """A request to change a realm state key (``state/<key>/set/<account>``).

    Who asks is the topic's account (authenticated by the broker's ACL), never ``by``:
    that field is ignored and kept only so older clients' payloads still validate."""

    TYPE = "state.set"

    value: Any = None
    by: str = Field(default="", max_length=64)
    code: str | None = Field(
        default=None, max_length=64, description="The alarm code, where disarming needs one."
    )


class StateReply(Message):
    """The answer to a ``state/<key>/set`` request that asked for one."""

    TYPE = "state.reply"

    ok: bool
    key: str = Field(max_length=64)
    value: Any = None
    error: ErrorInfo | None = None


def valid_state_key(key: str) -> bool:
    return STATE_KEY_RE.match(key) is not None
