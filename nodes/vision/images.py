"""Images as they travel in tasks: base64 JPEG/PNG in the task's JSON input.

The task protocol carries JSON (1 MiB per message), so an image rides as a
base64 string of its encoded bytes, capped at :data:`MAX_IMAGE_B64`
characters; the camera node downsizes and re-encodes a region that would not
fit (:func:`encode_jpeg_b64` with ``max_chars``).  Decoding is blocking
(OpenCV): callers run it off the event loop.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any, Final

import cv2
import numpy as np
import numpy.typing as npt

from daemon.errors import TaskError

Image = npt.NDArray[np.uint8]  # BGR, height x width x 3

# Base64 characters of one image in a task input: leaves room in the 1 MiB
# message for the rest of the JSON (~690 KB of JPEG).
MAX_IMAGE_B64: Final = 920_000
JPEG_QUALITY: Final = 85


@dataclass(frozen=True, slots=True)
class Detection:
    """One box in pixel coordinates of the image it was found in."""

    label: str
    score: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "score": round(float(self.score), 4),
            "box": [round(float(v), 1) for v in self.box],
        }


def decode_b64(data: str, *, max_chars: int = MAX_IMAGE_B64) -> Image:
    """A base64 JPEG/PNG (optionally a ``data:`` URL) as a BGR array; TaskError if bad."""
    if data.startswith("data:"):
        _, _, data = data.partition(",")
    if len(data) > max_chars:
        raise TaskError("bad_input", f"image is {len(data)} base64 chars, the cap is {max_chars}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise TaskError("bad_input", f"image is not valid base64: {exc}") from exc
    return decode_bytes(raw)


def decode_bytes(raw: bytes) -> Image:
    img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise TaskError("bad_input", "image could not be decoded (JPEG or PNG expected)")
    return img.astype(np.uint8, copy=False)


def encode_jpeg(img: Image, quality: int = JPEG_QUALITY) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return bytes(buf)


def encode_jpeg_b64(img: Image, *, max_chars: int = MAX_IMAGE_B64) -> str:
    """Base64 JPEG no longer than ``max_chars`` (downscaled until it fits)."""
    quality = JPEG_QUALITY
    while True:
        text = base64.b64encode(encode_jpeg(img, quality)).decode("ascii")
        if len(text) <= max_chars:
            return text
        h, w = img.shape[:2]
        size = (max(1, w * 3 // 4), max(1, h * 3 // 4))
        img = np.asarray(cv2.resize(img, size, interpolation=cv2.INTER_AREA), np.uint8)
        quality = max(60, quality - 5)


def media_type(raw: bytes) -> str:
    """The MIME type of encoded image bytes (by magic number)."""
    if raw[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if raw[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "image/webp"
    if raw[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    raise TaskError("bad_input", "unknown image format (JPEG, PNG, WebP or GIF expected)")
