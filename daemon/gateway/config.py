"""Configuration of the HTTP gateway (the ``gateway:`` section)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class GatewayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field(
        default="127.0.0.1",
        min_length=1,
        max_length=255,
        description="Address to listen on (127.0.0.1: this machine only; 0.0.0.0: the LAN).",
    )
    port: int = Field(default=8080, ge=1, le=65535, description="TCP port of the HTTP server.")
    users_file: Path | None = Field(
        default=None,
        description="The orchestrator's users database, whose API tokens log people in "
        "(default: <orchestrator.state_dir>/users.json).",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="Web origins (https://host:port) whose pages may call the API; none by "
        "default (the dashboard is served from the gateway itself).",
    )
    ws_origins: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="Other web origins allowed to open the WebSocket (the gateway's own "
        "always is; a request without Origin is not a browser and needs its token anyway).",
    )
    max_body_bytes: int = Field(
        default=1 << 20, ge=1024, le=64 << 20, description="Largest JSON request body."
    )
    max_upload_bytes: int = Field(
        default=8 << 20,
        ge=1024,
        le=256 << 20,
        description="Largest multipart upload (audio for transcription).",
    )
    task_timeout: float = Field(
        default=120.0, gt=0, le=3600, description="Longest a request waits for its task (s)."
    )
    max_ws_clients: int = Field(
        default=200, ge=1, le=10_000, description="WebSocket clients at most."
    )
    docs: bool = Field(default=True, description="Serve the API docs page at /docs.")
