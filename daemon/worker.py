"""Task execution on a node daemon (filled in by the orchestrator issue)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class TaskRun:
    """One assigned task as a node sees it."""

    task_id: str
    capability: str
    input: Any
