"""Typed wire messages: one pydantic model per message type, one generic codec.

Every payload is compact JSON carrying ``type`` (the registered name) and
``v`` (its schema version).  A receiver validates what it gets with
:func:`decode`; a malformed payload raises :class:`~daemon.errors.MessageError`
whose text says which field is wrong.  Binary data (audio, images) never goes
into JSON: it travels on ``media/...`` topics with an MQTT 5 content type.

Message families live in their own modules (``daemon.protocol.*``) and
register themselves by subclassing :class:`Message`.
"""

from __future__ import annotations

import json
import time
from typing import Any, ClassVar, Final, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import PydanticSerializationError

from daemon.errors import MessageError
from daemon.textcheck import MAX_NESTING, json_too_deep, lone_surrogate_escape

MAX_PAYLOAD_BYTES: Final = 1 << 20  # JSON control messages are small; media has its own topics

_REGISTRY: dict[str, type[Message]] = {}

M = TypeVar("M", bound="Message")


class Message(BaseModel):
    """Base of every wire message.

    Subclasses set ``TYPE`` (a dotted name, unique) and ``VERSION``; both are
    written into each payload as ``type`` and ``v``.
    """

    model_config = ConfigDict(extra="forbid", frozen=False, populate_by_name=True)

    TYPE: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if not cls.TYPE:
            return  # an abstract intermediate class
        other = _REGISTRY.get(cls.TYPE)
        if other is not None and other.__qualname__ != cls.__qualname__:
            raise TypeError(f"message type {cls.TYPE!r} registered twice")
        _REGISTRY[cls.TYPE] = cls


class Part(BaseModel):
    """A typed object embedded inside a message (not sent on its own)."""

    model_config = ConfigDict(extra="forbid")


def registered_types() -> dict[str, type[Message]]:
    """All registered message types, by name (for docs and tests)."""
    return dict(_REGISTRY)


def now() -> float:
    """Wall-clock timestamp used in payloads (seconds since the epoch)."""
    return round(time.time(), 3)


# Per message class: b'{"type":"<TYPE>","v":<VERSION>' — what encode() writes first.
_HEADS: dict[type[Message], bytes] = {}


def _head(cls: type[Message]) -> bytes:
    head = _HEADS.get(cls)
    if head is None:
        head = _HEADS[cls] = f'{{"type":"{cls.TYPE}","v":{cls.VERSION}'.encode()
    return head


def encode(msg: Message) -> bytes:
    """Compact JSON with ``type`` and ``v`` first; ``None`` fields are left out.

    A value that has no JSON form (a str holding a lone surrogate, an object of
    no JSON type) raises :class:`MessageError` with code ``unencodable``.
    """
    try:
        body = msg.__pydantic_serializer__.to_json(msg, exclude_none=True)
    except PydanticSerializationError as exc:
        raise MessageError(f"cannot encode {msg.TYPE}: {exc}", code="unencodable") from exc
    head = _head(type(msg))
    return head + b"," + body[1:] if body != b"{}" else head + b"}"


def _fast(data: bytes | bytearray | str, cls: type[M]) -> M | None:
    """Validate a payload that starts the way :func:`encode` writes ``cls``
    (type, then the current version) in one pass of pydantic's JSON parser;
    None when it does not, or when it is invalid (the caller's full path then
    produces the error with its usual text)."""
    if isinstance(data, str) or len(data) > MAX_PAYLOAD_BYTES:
        return None
    head = _head(cls)
    n = len(head)
    if not data.startswith(head) or data[n : n + 1] != b"," or json_too_deep(data):
        return None
    try:
        return cls.model_validate_json(b"{" + data[n + 1 :])
    except ValidationError:
        return None


def decode(data: bytes | bytearray | str, expected: type[M]) -> M:
    """Validate ``data`` as a message of type ``expected``.

    ``type`` may be omitted by hand-written clients; when present it must
    match.  ``v`` may be omitted (meaning the current version); a newer
    version than we understand is refused with code ``unsupported_version``.
    """
    msg = _fast(data, expected)
    if msg is not None:
        return msg
    raw = _load(data)
    _check_header(raw, expected)
    try:
        return expected.model_validate(raw)
    except ValidationError as exc:
        raise MessageError(f"invalid {expected.TYPE}: {_explain(exc)}") from exc


def decode_any(data: bytes | bytearray | str) -> Message:
    """Validate a payload of whatever registered type its ``type`` field names."""
    if isinstance(data, bytes | bytearray) and data.startswith(b'{"type":"'):
        end = data.find(b'"', 9, 9 + 128)
        fast_cls = _REGISTRY.get(data[9:end].decode("ascii", "replace")) if end > 0 else None
        if fast_cls is not None:
            msg = _fast(data, fast_cls)
            if msg is not None:
                return msg
    raw = _load(data)
    name = raw.get("type")
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise MessageError(f"unknown message type {name!r}", code="unknown_type")
    return decode_dict(raw, cls)


def decode_dict(raw: dict[str, Any], expected: type[M]) -> M:
    """Like :func:`decode` for an already parsed JSON object."""
    raw = dict(raw)
    _check_header(raw, expected)
    try:
        return expected.model_validate(raw)
    except ValidationError as exc:
        raise MessageError(f"invalid {expected.TYPE}: {_explain(exc)}") from exc


def load_json(data: bytes | bytearray | str) -> Any:
    """Parse a JSON payload from the network, refusing what could hurt a receiver.

    Strict: the bytes must be UTF-8 (no encoded surrogates), no ``\\uD800``-style
    escape may leave a lone surrogate in a string, nesting is bounded
    (:data:`~daemon.textcheck.MAX_NESTING`), and so is the size
    (:data:`MAX_PAYLOAD_BYTES`).  Anything else raises :class:`MessageError`.
    """
    if len(data) > MAX_PAYLOAD_BYTES:
        raise MessageError(
            f"payload of {len(data)} bytes exceeds {MAX_PAYLOAD_BYTES}", code="too_large"
        )
    try:
        raw = data.encode() if isinstance(data, str) else bytes(data)
        text = raw.decode()  # strict: Python's json would take encoded surrogates as text
    except UnicodeError as exc:
        raise MessageError(f"payload is not valid UTF-8: {exc}") from exc
    if json_too_deep(raw):
        raise MessageError(f"payload nests deeper than {MAX_NESTING} levels", code="too_deep")
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise MessageError(f"payload is not valid JSON: {exc}") from exc
    if lone_surrogate_escape(raw):  # pairs are fine; a lone half is not a character
        try:
            json.dumps(value, ensure_ascii=False).encode()
        except UnicodeEncodeError as exc:
            raise MessageError(
                "payload is not valid JSON: a \\u escape encodes a lone surrogate, "
                "which is not a Unicode character"
            ) from exc
    return value


def _load(data: bytes | bytearray | str) -> dict[str, Any]:
    raw = load_json(data)
    if not isinstance(raw, dict):
        raise MessageError("payload must be a JSON object")
    return raw


def _check_header(raw: dict[str, Any], expected: type[Message]) -> None:
    name = raw.pop("type", expected.TYPE)
    if name != expected.TYPE:
        raise MessageError(f"expected message type {expected.TYPE!r}, got {name!r}")
    version = raw.pop("v", expected.VERSION)
    if not isinstance(version, int) or isinstance(version, bool):
        raise MessageError(f"'v' must be an integer, got {version!r}")
    if version > expected.VERSION or version < 1:
        raise MessageError(
            f"{expected.TYPE} schema version {version} is not supported "
            f"(this node speaks v{expected.VERSION})",
            code="unsupported_version",
        )


def _explain(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}")
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")
