"""``vision.describe``: an image and a question to Claude (Anthropic Messages API).

The image goes as a base64 ``image`` content block before the question's
``text`` block.  The API key comes from the environment or a key file (never
logged); without one the capability is not advertised.  API errors become
task errors with the chat backend's mapping.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import anthropic

from daemon.errors import TaskError
from nodes.chat.backends.anthropic import anthropic_client, convert_error
from nodes.chat.backends.base import BackendUnavailable
from nodes.vision.config import DescribeConfig
from nodes.vision.detect import DetectorUnavailable

log = logging.getLogger(__name__)


class AnthropicDescriber:
    type_name = "anthropic"

    def __init__(self, config: DescribeConfig) -> None:
        self.config = config
        self.model = config.model
        self._client: anthropic.AsyncAnthropic | None = None

    def start(self) -> None:
        try:
            self._client = anthropic_client(self.config, os.environ)
        except BackendUnavailable as exc:
            raise DetectorUnavailable(str(exc)) from exc

    async def describe(
        self,
        image_b64: str,
        media_type: str,
        question: str,
        max_tokens: int | None,
        timeout: float | None,
    ) -> dict[str, Any]:
        if self._client is None:
            raise TaskError("unavailable", "vision.describe is not started")
        content: list[dict[str, Any]] = [
            {
                "type": "image",
                "source": {"type": "base64", "media_type": media_type, "data": image_b64},
            },
            {"type": "text", "text": question},
        ]
        messages: Any = [{"role": "user", "content": content}]
        kwargs: dict[str, Any] = {}
        if timeout is not None:
            kwargs["timeout"] = min(timeout, self.config.timeout)
        try:
            reply = await self._client.messages.create(
                model=self.model,
                max_tokens=max_tokens or self.config.max_tokens,
                messages=messages,
                **kwargs,
            )
        except anthropic.APIError as exc:
            raise convert_error(exc) from exc
        text = "".join(b.text for b in reply.content if b.type == "text")
        return {
            "text": text,
            "model": reply.model,
            "usage": {
                "prompt_tokens": reply.usage.input_tokens,
                "completion_tokens": reply.usage.output_tokens,
            },
        }

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
