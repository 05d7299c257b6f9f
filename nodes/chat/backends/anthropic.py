"""Claude through the official Anthropic SDK: streaming Messages API.

The API key comes from the environment (``ANTHROPIC_API_KEY`` or the
configured variable) or a key file; without one the backend is unavailable
(never faked).  The key is never logged.  SDK errors are converted to
:class:`~daemon.errors.TaskError` codes by HTTP status, which is stable
across SDK versions (newer SDKs add subclasses such as ``OverloadedError``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import anthropic

from daemon.errors import TaskError
from nodes.chat.backends.base import (
    BackendEnv,
    BackendUnavailable,
    ChatRequest,
    ChatResult,
    read_secret,
)
from nodes.chat.config import AnthropicBackendConfig

log = logging.getLogger(__name__)

MAX_ERROR_TEXT = 300


class AnthropicAccess(Protocol):
    """The config fields that say how to reach the API (chat backend, vision.describe)."""

    api_key_env: str
    api_key_file: Path | None
    base_url: str | None
    timeout: float
    max_retries: int


def anthropic_client(
    config: AnthropicAccess, environ: Mapping[str, str]
) -> anthropic.AsyncAnthropic:
    """An SDK client with the configured key; :class:`BackendUnavailable` without one."""
    key = read_secret(config.api_key_env, config.api_key_file, environ)
    if not key:
        where = f"${config.api_key_env}"
        if config.api_key_file:
            where += f" or {config.api_key_file}"
        raise BackendUnavailable(f"anthropic: no API key ({where} is empty)")
    return anthropic.AsyncAnthropic(
        api_key=key,
        base_url=config.base_url,
        timeout=config.timeout,
        max_retries=config.max_retries,
    )


class AnthropicBackend:
    type_name = "anthropic"
    max_concurrency = 8  # remote: requests run concurrently, the API rate-limits

    def __init__(self, config: AnthropicBackendConfig, env: BackendEnv) -> None:
        self.config = config
        self.env = env
        self.model = config.model
        self._client: anthropic.AsyncAnthropic | None = None

    async def start(self) -> None:
        self._client = anthropic_client(self.config, self.env.environ)
        log.info("anthropic backend ready: model %s", self.model)

    def languages(self) -> list[str]:
        return self.config.languages or ["*"]

    def attrs(self) -> dict[str, Any]:
        return {"remote": True, "json_schema": True}

    async def complete(self, request: ChatRequest) -> ChatResult:
        if self._client is None:
            raise TaskError("unavailable", "anthropic backend is not started")
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        if request.system:
            kwargs["system"] = request.system
        # Sent raw: SDK versions differ in which of these they take as parameters
        # (2.x dropped `temperature`; older ones lack `output_config`).
        if request.temperature is not None:
            extra["temperature"] = request.temperature
        if request.json_schema is not None:
            extra["output_config"] = {
                "format": {"type": "json_schema", "schema": request.json_schema}
            }
        if extra:
            kwargs["extra_body"] = extra
        if request.timeout is not None:
            kwargs["timeout"] = min(request.timeout, self.config.timeout)
        try:
            async with self._client.messages.stream(
                model=self.model,
                max_tokens=request.max_tokens,
                messages=request.messages,  # type: ignore[arg-type]
                **kwargs,
            ) as stream:
                async for text in stream.text_stream:
                    if text:
                        await request.emit(text)
                final = await stream.get_final_message()
        except anthropic.APIError as exc:
            raise convert_error(exc) from exc
        text = "".join(block.text for block in final.content if block.type == "text")
        usage = {
            "prompt_tokens": final.usage.input_tokens,
            "completion_tokens": final.usage.output_tokens,
        }
        return ChatResult(text, final.model, usage, final.stop_reason)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


def convert_error(exc: anthropic.APIError) -> TaskError:
    """An SDK error as a task error with a clear code and text (never the key)."""
    if isinstance(exc, anthropic.APITimeoutError):
        return TaskError("timeout", "Anthropic API did not answer in time")
    if isinstance(exc, anthropic.APIConnectionError):
        return TaskError("unavailable", f"cannot reach the Anthropic API: {_short(exc)}")
    status = getattr(exc, "status_code", None)
    detail = _api_message(exc)
    if status in (401, 403):
        return TaskError(
            "auth", f"Anthropic API refused the key ({status}): {detail}; check the API key"
        )
    if status == 429:
        return TaskError("rate_limited", f"Anthropic API rate limit: {detail}")
    if status == 529:
        return TaskError("unavailable", f"Anthropic API is overloaded (529), retry later: {detail}")
    if status in (400, 413, 422):
        return TaskError("bad_input", f"Anthropic API rejected the request ({status}): {detail}")
    if status == 404:
        return TaskError("backend_error", f"Anthropic API: not found (404; model name?): {detail}")
    if isinstance(status, int):
        return TaskError("backend_error", f"Anthropic API error {status}: {detail}")
    return TaskError("backend_error", f"Anthropic API error: {detail}")


def _api_message(exc: anthropic.APIError) -> str:
    body = exc.body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return _clip(f"{err.get('type', 'error')}: {err['message']}")
    return _short(exc)


def _short(exc: BaseException) -> str:
    return _clip(str(exc) or type(exc).__name__)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 3] + "..."
