"""The built-in node types.  Importing this package registers each of them
(``daemon.plugins``): every ``nodes/<type>/__init__.py`` registers its own.

To add a node type: write ``nodes/<type>/config.py`` with a model whose
``type`` is a ``Literal`` (extending :class:`daemon.plugins.NodeConfigBase`),
register it in ``nodes/<type>/__init__.py`` with
:func:`daemon.plugins.register_node_type` (its implementation named as
``"nodes.<type>.node:Class"``, imported only when a node of it runs, and an
offer probe if it can run without being configured), and import the package
below.
"""

# Each package registers its type on import.
from nodes import camera, chat, reference, sensors, swarm, vision, voice

__all__ = ["camera", "chat", "reference", "sensors", "swarm", "vision", "voice"]
