"""Messages shared by every family (errors), and the bounded field types of the wire.

Every string or collection that arrives from the network has a bound: names
that end up as dictionary keys, topic levels or log fields match a pattern;
labels and free text have a length limit; lists and maps a size limit.  A
payload outside them is refused by :func:`daemon.messages.decode` with the
path of the bad field.
"""

from __future__ import annotations

from typing import Annotated, Any, Final

from pydantic import Field

from daemon.messages import Message

# A name: node ids, hosted node names and types, backend names, boot ids, workflow
# names.  The shape of the config's names (daemon.config.NAME_RE), bounded, plus ':'
# and '+' (boot ids, backend variants).
NAME_RE: Final = r"^[A-Za-z0-9_][A-Za-z0-9_.:+-]{0,127}$"
# A machine-readable error code: bad_request, unavailable, worker_lost, ...
ERROR_CODE_RE: Final = r"^[a-z][a-z0-9_.-]{0,63}$"
# A label: printable text (no control characters), e.g. a model name or path, a version.
LABEL_RE: Final = r"^[^\x00-\x1f\x7f]*$"
MAX_LABEL: Final = 256
MAX_TEXT: Final = 4000  # error messages, reasons
MAX_ITEMS: Final = 512  # entries of a list or map field
MAX_ATTRS: Final = 64  # keys of an attrs / args map

Name = Annotated[str, Field(pattern=NAME_RE)]
ErrorCode = Annotated[str, Field(pattern=ERROR_CODE_RE)]
Label = Annotated[str, Field(pattern=LABEL_RE, max_length=MAX_LABEL)]
Text = Annotated[str, Field(max_length=MAX_TEXT)]
Attrs = Annotated[dict[str, Any], Field(max_length=MAX_ATTRS)]


class ErrorReply(Message):
    """The answer to a request that could not be accepted."""

    TYPE = "error"

    code: ErrorCode
    message: Text
    ref: Label | None = None
