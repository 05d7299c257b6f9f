"""``imagine``: text to image with an AUTOMATIC1111 Stable Diffusion web UI.

``POST {base_url}/sdapi/v1/txt2img`` with ``prompt``, ``negative_prompt``,
``steps``, ``width``, ``height``, ``seed``; the answer's ``images`` are base64
PNGs and ``info`` a JSON string with the seed actually used.  The image is
published as binary on a media topic (the node returns where).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
from typing import Any

import httpx

from daemon.errors import TaskError
from nodes.vision.config import ImagineConfig

log = logging.getLogger(__name__)


class Automatic1111:
    type_name = "automatic1111"

    def __init__(self, config: ImagineConfig) -> None:
        self.config = config
        self._client = httpx.AsyncClient(
            base_url=config.base_url.rstrip("/"), timeout=config.timeout
        )

    async def txt2img(self, params: dict[str, Any], timeout: float | None) -> tuple[bytes, int]:
        """The first image (PNG bytes) and the seed used."""
        body = {
            "steps": self.config.steps,
            "width": self.config.width,
            "height": self.config.height,
            **params,
            "batch_size": 1,
            "n_iter": 1,
        }
        try:
            resp = await self._client.post(
                "/sdapi/v1/txt2img", json=body, timeout=timeout or self.config.timeout
            )
        except httpx.TimeoutException as exc:
            raise TaskError("timeout", "automatic1111 did not answer in time") from exc
        except httpx.HTTPError as exc:
            raise TaskError("unavailable", f"cannot reach automatic1111: {exc}") from exc
        if resp.status_code == 422:
            raise TaskError("bad_input", f"automatic1111 rejected the request: {resp.text[:300]}")
        if resp.status_code != 200:
            raise TaskError(
                "backend_error", f"automatic1111 error {resp.status_code}: {resp.text[:300]}"
            )
        try:
            data = resp.json()
            png = base64.b64decode(data["images"][0], validate=True)
        except (ValueError, KeyError, IndexError, TypeError, binascii.Error) as exc:
            raise TaskError("bad_output", f"automatic1111 answer has no image: {exc}") from exc
        seed = int(params.get("seed", -1))
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            seed = int(json.loads(data.get("info") or "{}").get("seed", seed))
        return png, seed

    async def close(self) -> None:
        await self._client.aclose()
