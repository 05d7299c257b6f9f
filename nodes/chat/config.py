"""Configuration of the chat node and its backends (one model per ``type``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from nodes.base import NodeConfigBase


class _Backend(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(default=512, ge=1, description="Default reply length cap (tokens).")
    temperature: float | None = Field(
        default=None, ge=0, le=2, description="Default sampling temperature (None: the API's)."
    )
    system: str | None = Field(
        default=None, description="System prompt used when a task gives none (overrides node's)."
    )
    languages: list[str] | None = Field(
        default=None, description="Languages advertised (default: the model's, from the manifest)."
    )


class LlamaCppBackendConfig(_Backend):
    """A local GGUF model run in-process by llama.cpp (llama-cpp-python)."""

    type: Literal["llama_cpp"] = "llama_cpp"
    model: str = Field(
        default="smollm2-135m-instruct", description="Model name in models/manifest.yaml."
    )
    model_path: Path | None = Field(
        default=None, description="A GGUF file to use instead of a manifest model."
    )
    temperature: float | None = Field(
        default=0.7, ge=0, le=2, description="Default sampling temperature."
    )
    n_ctx: int = Field(default=2048, ge=128, description="Context window (tokens).")
    n_threads: int | None = Field(
        default=None, ge=1, description="CPU threads for inference (default: all cores)."
    )
    n_batch: int = Field(default=256, ge=1, description="Prompt evaluation batch size.")
    chat_format: str | None = Field(
        default=None, description="Override the model's own chat template (llama-cpp name)."
    )
    load: Literal["startup", "first_use"] = Field(
        default="startup", description="Load the model when the node starts, or on first task."
    )
    idle_unload: float | None = Field(
        default=None,
        gt=0,
        description="Unload the model after this many idle seconds (frees RAM; None: never).",
    )
    warmup_tokens: int = Field(
        default=16, ge=0, description="Tokens generated at load to measure tokens/s (0: skip)."
    )
    seed: int | None = Field(default=None, description="Sampling seed (None: random).")


class AnthropicBackendConfig(_Backend):
    """Claude through the official Anthropic SDK (Messages API, streaming)."""

    type: Literal["anthropic"] = "anthropic"
    model: str = Field(default="claude-haiku-4-5", description="Anthropic model id.")
    base_url: str | None = Field(
        default=None, description="API base URL (default: the SDK's; a proxy or test server)."
    )
    api_key_env: str = Field(
        default="ANTHROPIC_API_KEY", description="Environment variable holding the API key."
    )
    api_key_file: Path | None = Field(
        default=None, description="File holding the API key (used when the variable is unset)."
    )
    timeout: float = Field(default=60.0, gt=0, description="Request timeout (s).")
    max_retries: int = Field(
        default=2, ge=0, description="SDK retries on 429 / 5xx / overload (with backoff)."
    )


class OpenAICompatBackendConfig(_Backend):
    """Any server that speaks the OpenAI chat-completions API (Ollama, vLLM, ...)."""

    type: Literal["openai_compat"] = "openai_compat"
    base_url: str = Field(description="API base, e.g. http://127.0.0.1:11434/v1 (Ollama).")
    model: str = Field(description="Model name as the server knows it.")
    api_key_env: str | None = Field(
        default="OPENAI_API_KEY", description="Environment variable holding the key (optional)."
    )
    api_key_file: Path | None = Field(default=None, description="File holding the key.")
    timeout: float = Field(default=60.0, gt=0, description="Request timeout (s).")
    probe: bool = Field(
        default=True, description="Check at start that the server answers GET {base_url}/models."
    )


ChatBackendConfig = Annotated[
    LlamaCppBackendConfig | AnthropicBackendConfig | OpenAICompatBackendConfig,
    Field(discriminator="type"),
]


def _default_backends() -> list[ChatBackendConfig]:
    return [LlamaCppBackendConfig()]


class ChatConfig(NodeConfigBase):
    """The ``chat`` capability: one or more backends, each advertised if it works."""

    type: Literal["chat"] = "chat"
    backends: list[ChatBackendConfig] = Field(
        default_factory=_default_backends,
        min_length=1,
        description="Backends in order of preference; those that fail to start are skipped.",
    )
    system: str | None = Field(
        default="You are a helpful, concise assistant of a smart home.",
        description="Default system prompt (a task's `system` replaces it).",
    )
    models_dir: Path | None = Field(
        default=None, description="Models directory (default: $MTOR_MODELS_DIR or models/)."
    )
    history_messages: int = Field(
        default=16, ge=0, description="Messages kept per conversation (user + assistant)."
    )
    history_chars: int = Field(
        default=8000, ge=0, description="Characters of history kept per conversation."
    )
    max_conversations: int = Field(
        default=256, ge=1, description="Conversations remembered (least recently used dropped)."
    )
    conversation_ttl: float = Field(
        default=3600.0, gt=0, description="Forget a conversation idle this many seconds."
    )
    retry_delay: float = Field(
        default=30.0, gt=0, description="Retry a backend whose server was unreachable (s)."
    )
