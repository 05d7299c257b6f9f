"""Lazy plugin loading: node types and backends are named ``"package.module:Name"``
and imported on first use, so a missing optional package only disables that
plugin (the caller turns the :class:`ImportError` into its "unavailable" error)."""

from __future__ import annotations

import importlib
from typing import Any


def load_attr(spec: str) -> Any:
    """The object ``Name`` of ``"package.module:Name"``, importing the module if needed.

    :class:`ImportError` (a missing optional package) propagates to the caller.
    """
    module_name, _, name = spec.partition(":")
    return getattr(importlib.import_module(module_name), name)
