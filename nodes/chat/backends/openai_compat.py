"""Any server speaking the OpenAI chat-completions API (Ollama, vLLM, llama.cpp's
server, Hugging Face TGI): a streaming ``POST {base_url}/chat/completions``
whose ``data:`` server-sent events carry ``chat.completion.chunk`` objects
until ``data: [DONE]``."""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx

from daemon.errors import TaskError
from nodes.chat.backends.base import (
    BackendEnv,
    BackendUnavailable,
    ChatRequest,
    ChatResult,
    read_secret,
)
from nodes.chat.config import OpenAICompatBackendConfig

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 5.0
MAX_ERROR_TEXT = 300


class OpenAICompatBackend:
    type_name = "openai_compat"
    max_concurrency = 4

    def __init__(self, config: OpenAICompatBackendConfig, env: BackendEnv) -> None:
        self.config = config
        self.env = env
        self.model = config.model
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        key = read_secret(self.config.api_key_env, self.config.api_key_file, self.env.environ)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        client = httpx.AsyncClient(
            base_url=self.config.base_url.rstrip("/") + "/",
            headers=headers,
            timeout=self.config.timeout,
        )
        if self.config.probe:
            try:
                resp = await client.get("models", timeout=PROBE_TIMEOUT)
            except httpx.HTTPError as exc:
                await client.aclose()
                raise BackendUnavailable(
                    f"openai_compat: {self.config.base_url} does not answer: {exc!r}",
                    transient=True,
                ) from exc
            if resp.status_code in (401, 403):
                await client.aclose()
                raise BackendUnavailable(
                    f"openai_compat: {self.config.base_url} refused the key ({resp.status_code})"
                )
        self._client = client
        log.info("openai_compat backend ready: %s model %s", self.config.base_url, self.model)

    def languages(self) -> list[str]:
        return self.config.languages or ["*"]

    def attrs(self) -> dict[str, Any]:
        return {"remote": True, "json_schema": True, "base_url": self.config.base_url}

    async def complete(self, request: ChatRequest) -> ChatResult:
        if self._client is None:
            raise TaskError("unavailable", "openai_compat backend is not started")
        messages = list(request.messages)
        if request.system:
            messages.insert(0, {"role": "system", "content": request.system})
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "stream": True,
            "max_tokens": request.max_tokens,
        }
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.json_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": request.json_schema, "strict": True},
            }
        timeout = self.config.timeout
        if request.timeout is not None:
            timeout = min(timeout, request.timeout)
        parts: list[str] = []
        model = self.model
        usage: dict[str, int] = {}
        finish: str | None = None
        try:
            async with self._client.stream(
                "POST", "chat/completions", json=body, timeout=timeout
            ) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    raise convert_status(resp.status_code, resp.text)
                async for line in resp.aiter_lines():
                    data = _sse_data(line)
                    if data is None:
                        continue
                    if data == "[DONE]":
                        break
                    chunk = _json(data)
                    if "error" in chunk:
                        raise TaskError("backend_error", f"server error: {_clip(str(chunk))}")
                    model = chunk.get("model") or model
                    if isinstance(chunk.get("usage"), dict):
                        usage = {k: v for k, v in chunk["usage"].items() if isinstance(v, int)}
                    for choice in chunk.get("choices") or []:
                        delta = (choice.get("delta") or {}).get("content")
                        if delta:
                            parts.append(delta)
                            await request.emit(delta)
                        finish = choice.get("finish_reason") or finish
        except httpx.TimeoutException as exc:
            raise TaskError("timeout", f"{self.config.base_url} did not answer in time") from exc
        except httpx.HTTPError as exc:
            raise TaskError(
                "unavailable", f"cannot reach {self.config.base_url}: {_clip(repr(exc))}"
            ) from exc
        if not usage:
            usage = {"completion_chunks": len(parts)}
        return ChatResult("".join(parts), model, usage, finish)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _sse_data(line: str) -> str | None:
    """The payload of an SSE ``data:`` line (None for comments, events, blanks)."""
    if not line.startswith("data:"):
        return None
    return line[5:].strip()


def _json(data: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as exc:
        raise TaskError("backend_error", f"server sent invalid JSON: {_clip(data)}") from exc
    if not isinstance(obj, dict):
        raise TaskError("backend_error", f"server sent unexpected data: {_clip(data)}")
    return obj


def convert_status(status: int, text: str) -> TaskError:
    detail = _clip(_error_message(text))
    if status in (401, 403):
        return TaskError("auth", f"server refused the key ({status}): {detail}")
    if status == 429:
        return TaskError("rate_limited", f"server rate limit: {detail}")
    if status in (400, 413, 422):
        return TaskError("bad_input", f"server rejected the request ({status}): {detail}")
    if status == 404:
        return TaskError("backend_error", f"not found (404; model or base_url?): {detail}")
    if status in (502, 503, 504, 529):
        return TaskError("unavailable", f"server unavailable ({status}): {detail}")
    return TaskError("backend_error", f"server error {status}: {detail}")


def _error_message(text: str) -> str:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return text
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    return text


def _clip(text: str) -> str:
    return text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 3] + "..."
