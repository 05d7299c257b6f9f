"""Every node type: its config model (imported eagerly, it is light) and its
implementation (imported lazily, it may need optional packages).

To add a node type: write ``nodes/<type>/config.py`` with a model whose
``type`` is a ``Literal``, add it to :data:`NodeConfig`, and map the type to
its implementation in :data:`_IMPLEMENTATIONS`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from daemon.plugins import load_attr
from nodes.camera.config import CameraConfig
from nodes.chat.config import ChatConfig
from nodes.reference.config import ReferenceConfig
from nodes.sensors.config import SensorsConfig
from nodes.vision.config import VisionConfig
from nodes.voice.config import VoiceConfig

if TYPE_CHECKING:
    from daemon.node import Node

NodeConfig = Annotated[
    SensorsConfig | ReferenceConfig | ChatConfig | VoiceConfig | CameraConfig | VisionConfig,
    Field(discriminator="type"),
]

# type -> "module:Class"
_IMPLEMENTATIONS: dict[str, str] = {
    "sensors": "nodes.sensors.node:SensorsNode",
    "reference": "nodes.reference.node:ReferenceNode",
    "chat": "nodes.chat.node:ChatNode",
    "camera": "nodes.camera.node:CameraNode",
    "vision": "nodes.vision.node:VisionNode",
    "voice": "nodes.voice.node:VoiceNode",
}


def node_class(type_name: str) -> type[Node]:
    """The implementation class of a node type (imported on first use)."""
    cls: type[Node] = load_attr(_IMPLEMENTATIONS[type_name])
    return cls


def node_types() -> list[str]:
    return sorted(_IMPLEMENTATIONS)
