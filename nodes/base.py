"""The config base every node type extends."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class NodeConfigBase(BaseModel):
    """Fields every node entry in ``nodes:`` has."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="Set false to keep the entry but not run it.")
