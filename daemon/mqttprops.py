# mypy: disable-error-code="no-untyped-call"
"""MQTT 5 properties without paho's per-message overhead.

paho-mqtt's :class:`paho.mqtt.properties.Properties` rebuilds two dicts of 27
entries in every constructor and finds a property by scanning all names with
``str.replace`` on each access; every MQTT 5 PUBLISH, sent or received, builds
one.  In the orchestrator that was a fifth of its CPU per task.

:class:`FastProperties` is a drop-in subclass: the same attribute names, the
same validation, byte-identical ``pack``/``unpack`` — with the tables shared
and looked up by dict.  :func:`install` makes paho use it for the packets it
decodes (incoming PUBLISH, CONNACK, ...); ``daemon.bus`` builds its outgoing
properties with it.  ``tests/test_mqttprops.py`` checks it against paho's own
class, property by property.
"""

from __future__ import annotations

from typing import Any, Final

from paho.mqtt.exception import MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import (
    Properties,
    VariableByteIntegers,
    readBytes,
    readInt16,
    readInt32,
    readUTF,
    writeBytes,
    writeInt16,
    writeInt32,
    writeUTF,
)

_TEMPLATE: Final = Properties(PacketTypes.PUBLISH)
_NAMES: Final[dict[str, int]] = dict(_TEMPLATE.names)
_TABLE: Final[dict[int, tuple[int, list[int]]]] = dict(_TEMPLATE.properties)
_TYPES: Final[list[str]] = list(_TEMPLATE.types)
_PRIVATE: Final = frozenset({"packetType", "types", "names", "properties"})

# compressed name ("ResponseTopic") <-> identifier (8)
_IDENT: Final[dict[str, int]] = {name.replace(" ", ""): ident for name, ident in _NAMES.items()}
_NAME: Final[dict[int, str]] = {ident: name for name, ident in _IDENT.items()}
_ORDER: Final[tuple[str, ...]] = tuple(_IDENT)  # paho packs in this order
_MULTIPLE: Final = frozenset({11, 38})  # Subscription Identifier, User Property

_BYTE, _INT16, _INT32, _VBI, _BINARY, _UTF8, _PAIR = range(7)
_RANGES: Final[dict[str, tuple[int, int]]] = {
    "ReceiveMaximum": (1, 65535),
    "TopicAlias": (1, 65535),
    "TopicAliasMaximum": (0, 65535),
    "MaximumPacketSize": (1, 268435455),
    "SubscriptionIdentifier": (1, 268435455),
    "RequestResponseInformation": (0, 1),
    "RequestProblemInformation": (0, 1),
    "PayloadFormatIndicator": (0, 1),
}


class FastProperties(Properties):
    """paho's Properties with shared tables and dict lookups (same behaviour)."""

    # Class-level, shared by every instance: paho's __init__ rebuilt them each time.
    types = _TYPES
    names = _NAMES
    properties = _TABLE

    def __init__(self, packetType: int) -> None:
        object.__setattr__(self, "packetType", packetType)

    def getIdentFromName(self, compressedName: str) -> int:
        return _IDENT.get(compressedName, -1)

    def getNameFromIdent(self, identifier: int) -> str | None:
        return _NAME.get(identifier)

    def allowsMultiple(self, compressedName: str) -> bool:
        return _IDENT.get(compressedName) in _MULTIPLE

    def __setattr__(self, name: str, value: Any) -> None:
        name = name.replace(" ", "")
        if name in _PRIVATE:
            object.__setattr__(self, name, value)
            return
        ident = _IDENT.get(name)
        if ident is None:
            raise MQTTException(f"Property name must be one of {_NAMES.keys()}")
        if self.packetType not in _TABLE[ident][1]:
            raise MQTTException(
                f"Property {name} does not apply to packet type "
                f"{PacketTypes.Names[self.packetType]}"
            )
        if not isinstance(value, list):
            bounds = _RANGES.get(name)
            if bounds is not None and not bounds[0] <= value <= bounds[1]:
                raise MQTTException(
                    f"{name} property value must be in the range {bounds[0]}-{bounds[1]}"
                )
        if ident in _MULTIPLE:
            if not isinstance(value, list):
                value = [value]
            if name in self.__dict__:
                value = self.__dict__[name] + value
        object.__setattr__(self, name, value)

    def _present(self) -> list[str]:
        attrs = self.__dict__
        return [name for name in _ORDER if name in attrs]

    def isEmpty(self) -> bool:
        return not self._present()

    def clear(self) -> None:
        for name in self._present():
            object.__delattr__(self, name)

    def writeProperty(self, identifier: int, type: int, value: Any) -> bytes:
        head: bytes = VariableByteIntegers.encode(identifier)
        if type == _BYTE:
            return head + bytes([value])
        if type == _INT16:
            return head + writeInt16(value)  # type: ignore[no-any-return]
        if type == _INT32:
            return head + writeInt32(value)  # type: ignore[no-any-return]
        if type == _VBI:
            return head + VariableByteIntegers.encode(value)  # type: ignore[no-any-return]
        if type == _BINARY:
            return head + writeBytes(value)  # type: ignore[no-any-return]
        if type == _UTF8:
            return head + writeUTF(value)  # type: ignore[no-any-return]
        if type == _PAIR:
            return head + writeUTF(value[0]) + writeUTF(value[1])  # type: ignore[no-any-return]
        return head

    def pack(self) -> bytes:
        parts: list[bytes] = []
        attrs = self.__dict__
        for name in self._present():
            ident = _IDENT[name]
            attr_type = _TABLE[ident][0]
            if ident in _MULTIPLE:
                parts.extend(self.writeProperty(ident, attr_type, v) for v in attrs[name])
            else:
                parts.append(self.writeProperty(ident, attr_type, attrs[name]))
        buffer = b"".join(parts)
        return VariableByteIntegers.encode(len(buffer)) + buffer  # type: ignore[no-any-return]

    def readProperty(self, buffer: bytes, type: int, propslen: int) -> tuple[Any, int]:
        if type == _BYTE:
            return buffer[0], 1
        if type == _INT16:
            return readInt16(buffer), 2
        if type == _INT32:
            return readInt32(buffer), 4
        if type == _VBI:
            return VariableByteIntegers.decode(buffer)  # type: ignore[no-any-return]
        if type == _BINARY:
            return readBytes(buffer, propslen)  # type: ignore[no-any-return]
        if type == _UTF8:
            return readUTF(buffer, propslen)  # type: ignore[no-any-return]
        if type == _PAIR:
            first, n1 = readUTF(buffer, propslen)
            second, n2 = readUTF(buffer[n1:], propslen - n1)
            return (first, second), n1 + n2
        raise MQTTException(f"unknown property type {type}")

    def unpack(self, buffer: bytes) -> tuple[FastProperties, int]:
        self.clear()
        propslen, vbilen = VariableByteIntegers.decode(buffer)
        buffer = buffer[vbilen:]
        left = propslen
        while left > 0:
            ident, idlen = VariableByteIntegers.decode(buffer)
            buffer = buffer[idlen:]
            left -= idlen
            entry = _TABLE.get(ident)
            if entry is None:
                raise MQTTException(f"unknown property identifier {ident}")
            value, valuelen = self.readProperty(buffer, entry[0], left)
            buffer = buffer[valuelen:]
            left -= valuelen
            name = _NAME[ident]
            if ident not in _MULTIPLE and name in self.__dict__:
                raise MQTTException(f"Property '{name}' must not exist more than once")
            setattr(self, name, value)
        return self, propslen + vbilen


def install() -> bool:
    """Make paho decode packets into :class:`FastProperties` (idempotent).

    paho looks ``Properties`` up as a module global of its ``client`` and
    ``_packet`` modules at call time; where a paho version has no such global
    nothing is changed (and paho's own class keeps working, only slower).
    """
    import paho.mqtt.client as paho_client

    done = False
    modules: list[Any] = [paho_client, _paho_packet()]
    for module in modules:
        if module is not None and getattr(module, "Properties", None) in (
            Properties,
            FastProperties,
        ):
            module.Properties = FastProperties
            done = True
    return done


def _paho_packet() -> Any:
    try:
        import paho.mqtt._packet as packet
    except ImportError:  # older paho: decoding lives in client.py
        return None
    return packet


__all__ = ["FastProperties", "install"]
