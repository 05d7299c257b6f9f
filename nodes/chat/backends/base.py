"""What a chat backend is: a small Protocol, the request it gets, what it returns."""

from __future__ import annotations

import os
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from daemon.errors import MtorError
from daemon.plugins import load_attr

if TYPE_CHECKING:
    from daemon.modelstore import ModelStore
    from nodes.chat.config import ChatBackendConfig

Message = dict[str, str]  # {"role": "user" | "assistant", "content": ...}


class BackendUnavailable(MtorError):
    """The backend cannot serve: missing package, model or key (``transient``: a
    server that did not answer, worth retrying later)."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass
class ChatRequest:
    """One completion: the whole conversation, already assembled by the node."""

    messages: list[Message]
    system: str | None
    max_tokens: int
    temperature: float | None  # None: the backend's default
    emit: Callable[[str], Awaitable[None]]  # streams a text delta to the requester
    json_schema: dict[str, Any] | None = None
    cancel_flag: threading.Event = field(default_factory=threading.Event)
    timeout: float | None = None  # seconds left before the task's deadline


@dataclass
class ChatResult:
    text: str
    model: str
    usage: dict[str, int] = field(default_factory=dict)
    finish_reason: str | None = None


class ChatBackend(Protocol):
    """A way to run chat completions.  ``start`` raises :class:`BackendUnavailable`."""

    type_name: str
    model: str
    max_concurrency: int

    @property
    def config(self) -> ChatBackendConfig: ...

    async def start(self) -> None: ...

    def languages(self) -> list[str]: ...

    def attrs(self) -> dict[str, Any]:
        """Advertised details: context length, tokens/s, ..."""
        ...

    async def complete(self, request: ChatRequest) -> ChatResult: ...

    async def close(self) -> None: ...


@dataclass
class BackendEnv:
    """What a backend may use of its node: the model store, the environment,
    and a way to re-announce capabilities when its state changes."""

    store: ModelStore
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    announce: Callable[[], Awaitable[None]] | None = None


_MODULES: dict[str, str] = {
    "llama_cpp": "nodes.chat.backends.llama_cpp:LlamaCppBackend",
    "anthropic": "nodes.chat.backends.anthropic:AnthropicBackend",
    "openai_compat": "nodes.chat.backends.openai_compat:OpenAICompatBackend",
}


def make_backend(config: ChatBackendConfig, env: BackendEnv) -> ChatBackend:
    """Instantiate a backend, importing its module (and optional package) lazily."""
    try:
        cls = load_attr(_MODULES[config.type])
    except ImportError as exc:
        raise BackendUnavailable(
            f"{config.type}: missing package {exc.name or exc} (install the `chat` extra)"
        ) from exc
    backend: ChatBackend = cls(config, env)
    return backend


def read_secret(env_name: str | None, file: Path | None, environ: Mapping[str, str]) -> str | None:
    """An API key from the environment, else from a file; None if neither has one."""
    if env_name and environ.get(env_name, "").strip():
        return environ[env_name].strip()
    if file is not None:
        try:
            value = file.expanduser().read_text().strip()
        except OSError as exc:
            raise BackendUnavailable(f"cannot read key file {file}: {exc.strerror}") from exc
        return value or None
    return None
