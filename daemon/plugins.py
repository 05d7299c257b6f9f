"""Plugins: node types register themselves here; implementations load lazily.

The core never imports a node type.  Each node package registers its type in
its ``__init__`` (:func:`register_node_type`: the config model, the
implementation as ``"package.module:Name"``, and how it offers itself on a
machine), as frigate's detectors do.  The registry is filled on the first
lookup by importing the plugin packages of :data:`PLUGIN_PACKAGES` by name
(the built-in ``nodes``), so ``import daemon.config`` stays free of them and
a missing optional package only disables the plugin that needs it (the
caller turns the :class:`ImportError` into its "unavailable" error).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Final, Union

from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler
from pydantic_core import CoreSchema

# Packages whose import registers node types (by name: the core has no import of them).
PLUGIN_PACKAGES: Final = ("nodes",)


class NodeConfigBase(BaseModel):
    """Fields every node entry in ``nodes:`` has; a node type's model narrows
    ``type`` to its own ``Literal`` (the tag ``nodes:`` entries are told apart by)."""

    model_config = ConfigDict(extra="forbid")

    type: str
    enabled: bool = Field(default=True, description="Set false to keep the entry but not run it.")


@dataclass(frozen=True, slots=True)
class Offer:
    """What a node type offers on this machine when no ``nodes:`` are configured:
    a default entry, or ``None`` and why not (a missing package or model)."""

    entry: NodeConfigBase | None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class NodeType:
    name: str
    config: type[NodeConfigBase]
    implementation: str  # "package.module:Name", imported on first use
    # Probe for "every node type that works here" (mtor up, mtor node without
    # `nodes:`); None: the type is only run when a config names it (camera).
    offer: Callable[[], Offer] | None = None


class _Registry:
    def __init__(self) -> None:
        self.types: dict[str, NodeType] = {}
        self.loaded = False
        self.lock = threading.RLock()


_registry: Final = _Registry()


def register_node_type(
    name: str,
    config: type[NodeConfigBase],
    implementation: str,
    offer: Callable[[], Offer] | None = None,
) -> None:
    """Add a node type (called by its package on import).  Registering one name
    twice with a different model is a programming error."""
    with _registry.lock:
        known = _registry.types.get(name)
        if known is not None and known.config is not config:
            raise RuntimeError(f"node type {name!r} is registered twice ({known.config.__name__})")
        _registry.types[name] = NodeType(name, config, implementation, offer)


def _ensure_loaded() -> None:
    if _registry.loaded:
        return
    with _registry.lock:
        if not _registry.loaded:
            for package in PLUGIN_PACKAGES:
                importlib.import_module(package)
            _registry.loaded = True


def node_types() -> dict[str, NodeType]:
    """Every registered node type by name (in registration order)."""
    _ensure_loaded()
    return dict(_registry.types)


def node_type(name: str) -> NodeType:
    types = node_types()
    if name not in types:
        raise KeyError(f"unknown node type {name!r} (known: {', '.join(sorted(types))})")
    return types[name]


def node_class(type_name: str) -> Any:
    """The implementation class of a node type, a :class:`daemon.node.Node`
    (imported on first use; not named here, which the node module imports)."""
    return load_attr(node_type(type_name).implementation)


def offers() -> dict[str, Offer]:
    """What each offering node type would run on this machine (probes packages and
    models; blocking).  The same probe serves ``mtor up`` and ``mtor node``."""
    return {name: t.offer() for name, t in node_types().items() if t.offer is not None}


class _RegisteredNodeConfig:
    """Pydantic metadata: validate as the union of every registered node config,
    told apart by ``type`` (the union is built when the schema is, not at import)."""

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        models = tuple(t.config for t in node_types().values())
        union = Annotated[Union[models], Field(discriminator="type")]  # type: ignore[valid-type]  # noqa: UP007
        return handler.generate_schema(union)


# A ``nodes:`` entry: any registered node type's config.  A model using it must be
# built lazily (``defer_build=True``) so that defining it does not load the plugins.
NodeEntry = Annotated[NodeConfigBase, _RegisteredNodeConfig()]


def load_attr(spec: str) -> Any:
    """The object ``Name`` of ``"package.module:Name"``, importing the module if needed.

    :class:`ImportError` (a missing optional package) propagates to the caller.
    """
    module_name, _, name = spec.partition(":")
    return getattr(importlib.import_module(module_name), name)
