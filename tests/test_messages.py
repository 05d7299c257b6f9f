"""Every registered message type round-trips through the generic codec."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel

import daemon.protocol  # noqa: F401  (registers every message type)
from daemon.errors import MessageError
from daemon.messages import Message, Part, decode, decode_any, encode, registered_types
from daemon.protocol.node import Event, NodeState


def _sample_value(annotation: Any, name: str) -> Any:
    """A valid value for a required field (enough for the current schemas)."""
    import types
    import typing

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return args[0]
    if origin in (typing.Union, types.UnionType):
        return _sample_value(next(a for a in args if a is not type(None)), name)
    if origin is typing.Annotated:
        return _sample_value(args[0], name)
    if origin in (list, tuple):
        return [] if origin is list else tuple(_sample_value(a, name) for a in args)
    if origin is dict:
        return {}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _sample(annotation)
    if annotation is str:
        return f"{name}-x"
    if annotation is int:
        return 1
    if annotation is float:
        return 1.5
    if annotation is bool:
        return True
    if annotation is bytes:
        return b"x"
    return None


def _sample(cls: type[BaseModel]) -> BaseModel:
    values = {
        name: _sample_value(field.annotation, name)
        for name, field in cls.model_fields.items()
        if field.is_required()
    }
    return cls(**values)


@pytest.mark.parametrize("name", sorted(registered_types()))
def test_every_registered_type_roundtrips(name: str) -> None:
    cls = registered_types()[name]
    msg = _sample(cls)
    assert isinstance(msg, Message)
    data = encode(msg)
    raw = json.loads(data)
    assert raw["type"] == name
    assert raw["v"] == cls.VERSION
    assert b" " not in data.split(b'"')[0]  # compact separators
    back = decode(data, cls)
    assert back == msg
    assert decode_any(data) == msg


def test_registry_is_populated() -> None:
    types = registered_types()
    assert {"node.state", "node.info", "node.health", "event", "error"} <= set(types)
    assert all(not issubclass(t, Part) for t in types.values())


def test_decode_explains_errors() -> None:
    with pytest.raises(MessageError, match="not valid JSON"):
        decode(b"{nope", NodeState)
    with pytest.raises(MessageError, match="JSON object"):
        decode(b"[1,2]", NodeState)
    with pytest.raises(MessageError, match=r"state: Input should be 'online' or 'offline'"):
        decode(b'{"state":"maybe","boot_id":"b"}', NodeState)
    with pytest.raises(MessageError, match="boot_id: Field required"):
        decode(b'{"state":"online"}', NodeState)
    with pytest.raises(MessageError, match="expected message type"):
        decode(b'{"type":"event"}', NodeState)
    with pytest.raises(MessageError) as info:
        decode(b'{"v":99,"state":"online","boot_id":"b"}', NodeState)
    assert info.value.code == "unsupported_version"
    with pytest.raises(MessageError, match="Extra inputs are not permitted"):
        decode(b'{"state":"online","boot_id":"b","surprise":1}', NodeState)
    with pytest.raises(MessageError) as info:
        decode_any(b'{"type":"no.such"}')
    assert info.value.code == "unknown_type"
    with pytest.raises(MessageError) as info:
        decode(b"{" + b" " * (2 << 20) + b"}", Event)
    assert info.value.code == "too_large"


def test_type_and_version_optional_for_hand_written_clients() -> None:
    msg = decode(b'{"value": 3, "unit": "C"}', Event)
    assert msg.value == 3
    assert msg.unit == "C"


@pytest.mark.parametrize("name", sorted(registered_types()))
def test_fast_path_agrees_with_the_full_path(name: str) -> None:
    """decode() validates what encode() wrote in one pass of pydantic's JSON parser;
    the result must equal validating the parsed dict (the full path)."""
    cls = registered_types()[name]
    msg = _sample(cls)
    data = encode(msg)
    raw = json.loads(data)
    assert raw.pop("type") == name and raw.pop("v") == cls.VERSION
    assert decode(data, cls) == cls.model_validate(raw)
    assert decode(json.dumps({"type": name, "v": cls.VERSION, **raw}).encode(), cls) == msg


def test_fast_path_errors_read_like_the_full_path() -> None:
    """A payload with our header but a bad body is still refused with the usual text."""
    with pytest.raises(MessageError, match=r"state: Input should be 'online' or 'offline'"):
        decode(b'{"type":"node.state","v":1,"state":"maybe","boot_id":"b"}', NodeState)
    with pytest.raises(MessageError, match="not valid JSON"):
        decode(b'{"type":"node.state","v":1,"state":', NodeState)
    with pytest.raises(MessageError, match="Extra inputs are not permitted"):
        decode_any(b'{"type":"node.state","v":1,"state":"online","boot_id":"b","x":1}')
    with pytest.raises(MessageError) as info:
        decode(b'{"type":"node.state","v":10,"state":"online","boot_id":"b"}', NodeState)
    assert info.value.code == "unsupported_version"
    with pytest.raises(MessageError, match="expected message type"):
        decode(b'{"type":"node.state","v":1,"type":"event"}', NodeState)
