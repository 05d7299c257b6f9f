"""The chat node: the ``chat`` capability over one or more backends.

Task input (see docs/chat.md)::

    {"prompt": "..."}  or  {"messages": [{"role": "user", "content": "..."}, ...]}
    optional: system, max_tokens, temperature, json_schema, conversation_id, backend

Text streams to the requester as partial results ``{"delta": "..."}``; the
result is ``{"text", "model", "backend", "usage", "finish_reason"}`` plus
``"json"`` (the parsed object) when a ``json_schema`` was given.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from daemon.errors import MtorError, TaskError
from daemon.modelstore import ModelStore
from daemon.node import Node, NodeContext
from daemon.protocol.node import Capability
from daemon.worker import TaskRun, task_input
from nodes.chat.backends.base import (
    BackendEnv,
    BackendUnavailable,
    ChatBackend,
    ChatRequest,
    Message,
    make_backend,
)
from nodes.chat.config import ChatBackendConfig, ChatConfig
from nodes.chat.conversation import Conversations

MAX_TEXT: Final = 100_000  # characters of one message
MAX_TOKENS_CAP: Final = 32_768
# Retrying a backend whose server did not answer at start: capped backoff.
RETRY_FACTOR: Final = 2.0
RETRY_MAX_FACTOR: Final = 16.0
JSON_INSTRUCTION: Final = (
    "Answer only with a JSON object that matches this JSON schema, no other text:\n{schema}"
)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_TEXT)


class ChatInput(BaseModel):
    """The input of a ``chat`` task."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=200)
    system: str | None = Field(default=None, max_length=MAX_TEXT)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_CAP)
    temperature: float | None = Field(default=None, ge=0, le=2)
    json_schema: dict[str, Any] | None = None
    conversation_id: str | None = Field(default=None, min_length=1, max_length=128)
    backend: Literal["llama_cpp", "anthropic", "openai_compat"] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ChatInput:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.messages is not None:
            turns = [m for m in self.messages if m.role != "system"]
            if not turns or turns[-1].role != "user":
                raise ValueError("'messages' must end with a user message")
        return self


def parse_input(data: Any) -> ChatInput:
    if isinstance(data, str):
        data = {"prompt": data}
    return task_input(ChatInput, data, "chat input")


class ChatNode(Node):
    type_name = "chat"
    config: ChatConfig

    def __init__(self, name: str, config: ChatConfig, ctx: NodeContext) -> None:
        super().__init__(name, config, ctx)
        self.backends: list[ChatBackend] = []
        self._pending: list[ChatBackendConfig] = []  # transient failures, retried in run()
        self.conversations = Conversations(
            max_conversations=config.max_conversations,
            max_messages=config.history_messages,
            max_chars=config.history_chars,
            ttl=config.conversation_ttl,
        )
        self._env: BackendEnv | None = None

    # ---------------------------------------------------------------- lifecycle

    def _backend_env(self) -> BackendEnv:
        if self._env is None:
            configured = self.config.models_dir or _configured_models_dir(self.ctx)
            environ = dict(os.environ)
            store = ModelStore.default(configured, environ)
            self._env = BackendEnv(store=store, environ=environ, announce=self.ctx.announce)
        return self._env

    async def setup(self) -> None:
        errors: list[str] = []
        for cfg in self.config.backends:
            error = await self._start_backend(cfg)
            if error:
                errors.append(error)
        if not self.backends and not self._pending:
            raise MtorError("no chat backend could start: " + "; ".join(errors))

    async def _start_backend(self, cfg: ChatBackendConfig) -> str | None:
        try:
            backend = make_backend(cfg, self._backend_env())
            await backend.start()
        except (BackendUnavailable, MtorError, OSError) as exc:
            if isinstance(exc, BackendUnavailable) and exc.transient:
                self._pending.append(cfg)
            self.log.warning("chat backend %s unavailable: %s", cfg.type, exc)
            return f"{cfg.type}: {exc}"
        self.backends.append(backend)
        return None

    async def run(self) -> None:
        delay = self.config.retry_delay
        while True:
            if not self._pending:
                await asyncio.Event().wait()  # nothing to retry: idle until cancelled
            await asyncio.sleep(delay)
            pending, self._pending = self._pending, []
            started = False
            for cfg in pending:
                started |= await self._start_backend(cfg) is None
            if started:
                await self.ctx.announce()
            delay = min(delay * RETRY_FACTOR, self.config.retry_delay * RETRY_MAX_FACTOR)

    async def close(self) -> None:
        """Close every backend (a local model is unloaded once no backend uses it)."""
        backends, self.backends, self._pending = self.backends, [], []
        for backend in backends:
            try:
                await backend.close()
            except Exception:
                self.log.exception("closing chat backend %s failed", backend.type_name)

    def capabilities(self) -> list[Capability]:
        return [
            Capability(
                name="chat",
                node=self.name,
                backend=b.type_name,
                model=b.model,
                languages=b.languages(),
                max_concurrency=b.max_concurrency,
                streaming=True,
                attrs={**b.attrs(), "conversations": True},
            )
            for b in self.backends
        ]

    # ---------------------------------------------------------------- tasks

    def _pick(self, run: TaskRun, inp: ChatInput) -> ChatBackend:
        wanted = inp.backend or run.constraints.get("backend")
        model = run.constraints.get("model")
        for backend in self.backends:
            if wanted and backend.type_name != wanted:
                continue
            if model and backend.model != model:
                continue
            return backend
        what = " ".join(x for x in (wanted, model) if x) or "any"
        raise TaskError("unavailable", f"no chat backend available here for {what}")

    async def execute(self, task: TaskRun) -> Any:
        inp = parse_input(task.input)
        backend = self._pick(task, inp)
        bcfg = backend.config

        system = inp.system
        turns: list[Message] = []
        if inp.prompt is not None:
            turns.append({"role": "user", "content": inp.prompt})
        for m in inp.messages or []:
            if m.role == "system":
                system = system or m.content
            else:
                turns.append({"role": m.role, "content": m.content})
        if system is None:
            system = bcfg.system if bcfg.system is not None else self.config.system
        if inp.json_schema is not None:
            instruction = JSON_INSTRUCTION.format(schema=json.dumps(inp.json_schema))
            system = f"{system}\n\n{instruction}" if system else instruction

        key = None
        history: list[Message] = []
        if inp.conversation_id is not None:
            key = self.conversations.key(task.user, inp.conversation_id)
            history = self.conversations.history(key)

        timeout = task.remaining()
        if timeout is not None and timeout <= 0:
            raise TaskError("timeout", "the task's deadline passed before it started")

        async def emit(delta: str) -> None:
            await task.partial({"delta": delta})

        request = ChatRequest(
            messages=history + turns,
            system=system,
            max_tokens=inp.max_tokens or bcfg.max_tokens,
            temperature=inp.temperature if inp.temperature is not None else bcfg.temperature,
            emit=emit,
            json_schema=inp.json_schema,
            cancel_flag=task.cancel_flag,
            timeout=timeout,
        )
        result = await backend.complete(request)
        output: dict[str, Any] = {
            "text": result.text,
            "model": result.model,
            "backend": backend.type_name,
            "usage": result.usage,
            "finish_reason": result.finish_reason,
        }
        if inp.json_schema is not None:
            output["json"] = _parse_json(result.text)
        if key is not None:
            self.conversations.append(key, [*turns, {"role": "assistant", "content": result.text}])
            output["conversation_id"] = inp.conversation_id
        return output


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise TaskError(
            "bad_output", f"the model's reply is not valid JSON ({exc.msg}): {text[:200]!r}"
        ) from exc


def _configured_models_dir(ctx: NodeContext) -> Path | None:
    # A top-level `models: {dir: ...}` config section, when the config has one.
    section = getattr(ctx.config, "models", None)
    value = getattr(section, "dir", None)
    return Path(value) if value else None
